"""Dataset readers on small sample files (tests/data/workloads/): ShareGPT, JSONL with batch lines and
content parts, Hugging Face datasets (Parquet, CSV, a saved folder), filters, samples, shared prefixes."""

import json
import statistics
from pathlib import Path

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import content_text
from pikeclient.run import dataset as dataset_module
from pikeclient.run.cache import cache_key, request_digest
from pikeclient.run.datasets import build_dataset, files
from pikeclient.run.datasets.hf import HFDataset
from pikeclient.run.datasets.jsonl import JsonlDataset
from pikeclient.run.datasets.sharegpt import ShareGPTDataset
from pikeclient.run.datasets.synthetic import SyntheticDataset

DATA = Path(__file__).resolve().parents[1] / "data" / "workloads"


@pytest.fixture
def client(api_env):
    return OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1")  # counts with tiktoken; never called


def recorded(conversation_id, answer_index):
    [conversation] = [c for c in json.loads((DATA / "sharegpt.json").read_text()) if c["id"] == conversation_id]
    return conversation["conversations"][answer_index]["value"]


def test_sharegpt_single_turn_asks_for_the_recorded_answers_length(client):
    items = ShareGPTDataset(path=str(DATA / "sharegpt.json")).read(client)
    assert [i.id for i in items] == ["conv-a", "conv-b", "conv-c", "conv-e"]  # conv-d asks nothing
    by_id = {i.id: i for i in items}
    assert by_id["conv-a"].messages == ({"role": "user", "content": "What is the capital of France?"},)
    assert by_id["conv-a"].max_tokens == client.get_token_count(recorded("conv-a", 1))
    assert [m["role"] for m in by_id["conv-b"].messages] == ["system", "user"]  # the system prompt comes along
    assert by_id["conv-c"].prompt == "Tell me a short joke about cats."  # the model's greeting before it is dropped
    assert by_id["conv-c"].max_tokens == client.get_token_count(recorded("conv-c", 2))
    assert all(i.session is None and i.turn is None for i in items)
    fixed = ShareGPTDataset(path=str(DATA / "sharegpt.json"), output_tokens=16).read(client)
    assert {i.max_tokens for i in fixed} == {16}


def test_sharegpt_jsonl_and_a_json_array_read_in_small_windows_agree(client, tmp_path, monkeypatch):
    lines = tmp_path / "sharegpt.jsonl"
    lines.write_text("".join(json.dumps(c) + "\n" for c in json.loads((DATA / "sharegpt.json").read_text())))
    whole = ShareGPTDataset(path=str(DATA / "sharegpt.json")).read(client)
    monkeypatch.setattr(files, "CHUNK", 7)  # every element spans many windows
    assert ShareGPTDataset(path=str(DATA / "sharegpt.json")).read(client) == whole
    assert ShareGPTDataset(path=str(lines)).read(client) == whole


def test_sharegpt_conversations_are_turns_with_the_recorded_lengths(client):
    items = ShareGPTDataset(path=str(DATA / "sharegpt.json"), conversations=True).read(client)
    conv_c = [i for i in items if i.session == "conv-c"]
    assert [(i.id, i.turn) for i in conv_c] == [("conv-c#1", 1), ("conv-c#2", 2), ("conv-c#3", 3)]
    assert [i.prompt for i in conv_c] == ["Tell me a short joke about cats.", "Another one, please.", "Thanks!"]
    assert [i.max_tokens for i in conv_c[:2]] == [client.get_token_count(recorded("conv-c", k)) for k in (2, 4)]
    assert conv_c[2].max_tokens is None  # the last question has no recorded answer: the run's max_tokens
    assert all(len(i.messages) == 1 for i in conv_c)  # a turn carries its own message; the run adds the history
    conv_b = [i for i in items if i.session == "conv-b"]
    assert [m["role"] for m in conv_b[0].messages] == ["system", "user"]
    sample = ShareGPTDataset(path=str(DATA / "sharegpt.json"), conversations=True, sample=2, seed=3).read(client)
    assert len({i.session for i in sample}) == 2  # conversations are sampled whole
    assert all(len([i for i in sample if i.session == s]) == len([i for i in items if i.session == s])
               for s in {i.session for i in sample})


def test_jsonl_reads_batch_lines_and_content_parts(client):
    items = JsonlDataset(path=str(DATA / "chat.jsonl")).read()
    assert [i.id for i in items] == ["batch-1", "batch-2", "parts-1", "chat-1"]
    assert [m["role"] for m in items[0].messages] == ["system", "user"] and items[0].max_tokens is None
    parts = items[2]
    assert isinstance(parts.messages[0]["content"], list)  # sent as written
    assert parts.prompt == "Say hello in French."  # records carry the text
    as_text = [{"role": "user", "content": "Say hello in French."}]
    assert client.count_message_tokens(list(parts.messages)) == client.count_message_tokens(as_text)
    params = client.sampling
    assert request_digest(parts.messages, params) == request_digest(parts.messages, params)
    assert cache_key({"model": "m"}, parts.messages, params) != cache_key({"model": "m"}, as_text, params)


def test_jsonl_conversations_split_at_the_answers():
    items = JsonlDataset(path=str(DATA / "chat.jsonl"), conversations=True).read()
    chat = [i for i in items if i.session == "chat-1"]
    assert [(i.turn, i.prompt) for i in chat] == [(1, "Hi there."), (2, "Fine, thanks. What day is it?")]
    assert [m["role"] for m in chat[0].messages] == ["system", "user"]


def test_length_filters_and_samples(client):
    reader = {"path": str(DATA / "sharegpt.json"), "output_tokens": 4}
    every = {i.id: client.count_message_tokens(list(i.messages)) for i in ShareGPTDataset(**reader).read(client)}
    low, high = sorted(every.values())[1], sorted(every.values())[-2]
    kept = ShareGPTDataset(**reader, min_input_tokens=low, max_input_tokens=high).read(client)
    assert {i.id for i in kept} == {k for k, n in every.items() if low <= n <= high}
    first = ShareGPTDataset(**reader, sample=2, seed=1).read(client)
    assert first == ShareGPTDataset(**reader, sample=2, seed=1).read(client)  # seeded
    order = list(every)
    assert [order.index(i.id) for i in first] == sorted(order.index(i.id) for i in first)  # kept in file order
    seeds = {tuple(i.id for i in ShareGPTDataset(**reader, sample=2, seed=s).read(client)) for s in range(8)}
    assert len(seeds) > 1
    assert [i.id for i in ShareGPTDataset(**reader, limit=2).read(client)] == order[:2]
    with pytest.raises(ConfigError, match="holds no prompts that pass dataset.min_input_tokens"):
        ShareGPTDataset(**reader, min_input_tokens=10_000).read(client)


@pytest.mark.parametrize(("spec", "message"), [
    ({"path": "x", "sample": 0}, "dataset.sample=0 is out of range: allowed >= 1"),
    ({"path": "x", "min_input_tokens": 9, "max_input_tokens": 3}, "dataset.min_input_tokens=9 > dataset.max_input"),
    ({"path": None}, "dataset.path is not set"),
    ({"path": "x", "limit": "two"}, "dataset.limit='two': expected an integer or null"),
    ({"path": "x", "bogus": 1}, "dataset.bogus: unknown argument of JsonlDataset"),
])
def test_bad_reader_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_dataset({"_target_": "pikeclient.run.datasets.jsonl.JsonlDataset", **spec})


def test_bad_sharegpt_files(client, tmp_path):
    cases = {
        '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}': "the JSON array ends early",
        '[{"id": "a", "conversations": [{"from": "robot", "value": "hi"}]}]': "unknown speaker 'robot'",
        '[{"id": "a", "turns": []}]': "element 0: expected an object with a 'conversations' list",
        '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, 3]': "element 1: expected a JSON object",
        '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]} {"id": "b"}]': "expected ','",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            ShareGPTDataset(path=str(path), output_tokens=4).read(client)


@pytest.fixture
def parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "rows.jsonl").read_text().splitlines()]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_hf_reads_parquet_with_its_columns_mapped(parquet, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    items = HFDataset(path=str(parquet), prompt_column="question", output_tokens_column="answer_tokens",
                      id_column="qid").read()
    assert [(i.id, i.prompt, i.max_tokens) for i in items][:2] == [("r0", "Why is the sky blue?", 12),
                                                                   ("r1", "Name two rivers in Africa.", 6)]
    chats = HFDataset(path=str(parquet), messages_column="chat").read()
    assert [i.id for i in chats] == ["0", "1", "2", "3"]
    assert [m["role"] for m in chats[1].messages] == ["system", "user"]
    turns = HFDataset(path=str(parquet), messages_column="chat", conversations=True).read()
    assert [(i.session, i.turn) for i in turns if i.session == "2"] == [("2", 1), ("2", 2)]
    with pytest.raises(ConfigError, match="dataset.prompt_column='text': no such column .* question"):
        HFDataset(path=str(parquet), prompt_column="text").read()


def test_hf_reads_csv_json_and_a_saved_dataset_folder(parquet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer_tokens\nWhat is tea?,5\nWhat is coffee?,7\n")
    assert [(i.prompt, i.max_tokens) for i in HFDataset(path=str(csv), prompt_column="question",
                                                         output_tokens_column="answer_tokens").read()] == [
        ("What is tea?", 5), ("What is coffee?", 7)]
    jsonl = HFDataset(path=str(DATA / "rows.jsonl"), prompt_column="question", id_column="qid", sample=2).read()
    assert len(jsonl) == 2
    saved = tmp_path / "saved"
    datasets.Dataset.from_parquet(str(parquet)).save_to_disk(str(saved))
    assert [i.id for i in HFDataset(path=str(saved), prompt_column="question", id_column="qid").read()] == [
        "r0", "r1", "r2", "r3"]
    with pytest.raises(ConfigError, match="datasets cannot read it"):
        HFDataset(path=str(tmp_path / "no-such-dataset-here")).read()


def test_shared_prefixes_share_exactly_the_tokens_asked_for(api_env, tiny_model):
    client = OpenAIClient(model="my-llama", base_url="http://127.0.0.1:9/v1", tokenizer=tiny_model)
    items = SyntheticDataset(count=9, input_tokens=120, output_tokens=8, prefix_tokens=48, prefix_groups=3,
                             seed=2).read(client)
    systems = [i.messages[0]["content"] for i in items]
    assert all(i.messages[0]["role"] == "system" for i in items)
    assert all(client.get_token_count(s) == 48 for s in systems)  # exactly the prefix asked for
    assert [systems.index(s) for s in systems] == [0, 1, 2] * 3  # prompt i has prefix i mod 3
    assert len(set(systems)) == 3  # the groups' prefixes differ
    users = [content_text(i.messages[1]["content"]) for i in items]
    assert len(set(users)) == 9  # after the prefix, every prompt is its own
    sizes = [client.count_message_tokens(list(i.messages)) for i in items]
    assert all(120 <= n <= 128 for n in sizes)  # the whole prompt, prefix included, at the size asked for
    assert statistics.fmean(sizes) < 126


def test_load_prompts_still_reads_a_prompt_file():
    items = dataset_module.load_prompts("pkg://pikeclient/data/prompts.jsonl", limit=3)
    assert len(items) == 3 and all(isinstance(i.prompt, str) for i in items)
