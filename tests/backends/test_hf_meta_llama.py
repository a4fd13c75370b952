"""Local transformers backend on a tiny Llama built by the tests (save_pretrained, from_pretrained)."""

import asyncio

import pytest

pytest.importorskip("transformers")

from pikeclient.backends.hf_meta_llama import HFLocalClient  # noqa: E402
from pikeclient.backends.smoke_llama import build_tiny_llama  # noqa: E402
from pikeclient.core.errors import BadRequestError, ConfigError  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return HFLocalClient(model=tiny_model, sampling={"max_tokens": 16}, batch_size=4)


def test_greedy_is_deterministic_and_respects_max_new_tokens(llm):
    first, second = llm.chat(MESSAGES), llm.chat(MESSAGES)
    assert first.text == second.text and first.text
    assert first.usage.completion_tokens <= 16 and first.finish_reason in ("length", "stop")
    assert llm.chat(MESSAGES, max_tokens=3).usage.completion_tokens <= 3


def test_token_counts_are_exact(llm):
    result = llm.chat(MESSAGES)
    templated = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert result.usage.prompt_tokens == len(llm.tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert result.usage.source == "tokenizer"
    assert llm.get_token_count("hello world") == len(llm.tokenizer("hello world", add_special_tokens=False)["input_ids"])


def test_completion_tokens_leave_out_the_end_of_sequence_token(llm):
    # Servers (llama.cpp, vLLM) do not count the EOS token; the same answer counts the same here.
    from pikeclient.backends.hf_meta_llama import _StepTimer
    from pikeclient.core.types import SamplingParams

    words = llm.tokenizer("hello there friend", add_special_tokens=False)["input_ids"]
    eos = next(iter(llm._eos_ids))
    ended = llm._completion([*words, eos], 7, SamplingParams(), _StepTimer())
    assert ended.usage.completion_tokens == len(words) and ended.finish_reason == "stop"
    cut = llm._completion(words, 7, SamplingParams(max_tokens=len(words)), _StepTimer())
    assert cut.usage.completion_tokens == len(words) and cut.finish_reason == "length"


def test_batched_equals_one_at_a_time(llm):
    prompts = [[{"role": "user", "content": f"Explain item {i}" + " please" * i}] for i in range(7)]
    single = [llm.chat(p).text for p in prompts]

    async def batched():
        return await asyncio.gather(*(llm.achat(p) for p in prompts))

    assert [r.text for r in asyncio.run(batched())] == single


def test_stop_strings_cut_the_text(llm):
    full = llm.chat(MESSAGES, max_tokens=16).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop
    cut = llm.chat(MESSAGES, max_tokens=16, stop=[stop])
    assert stop not in cut.text and full.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(llm):
    a = llm.chat(MESSAGES, temperature=1.0, seed=7).text
    b = llm.chat(MESSAGES, temperature=1.0, seed=7).text
    assert a == b


def test_model_without_chat_template(tmp_path):
    path = build_tiny_llama(tmp_path / "no-template", chat_template=None)
    c = HFLocalClient(model=str(path), sampling={"max_tokens": 4})
    assert isinstance(c.generate("plain prompts still work"), str)
    with pytest.raises(BadRequestError, match="no chat template"):
        c.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])


def test_bad_model_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        HFLocalClient(model=str(tmp_path / "missing"))


def test_time_to_first_token_is_measured(llm):
    result = llm.chat(MESSAGES)
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.latency_s


def test_stream_yields_the_same_text_as_chat(llm):
    pieces = list(llm.stream(MESSAGES))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.chat(MESSAGES).text


def test_out_of_memory_is_a_model_error_and_not_retried(llm, monkeypatch):
    import torch

    from pikeclient.core.errors import ModelError

    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(llm.lm, "generate", boom)
    with pytest.raises(ModelError, match="out of memory"):
        llm.chat(MESSAGES)
    assert len(calls) == 1


def test_context_window_is_checked_before_generation(llm):
    from pikeclient.core.errors import ContextWindowError

    with pytest.raises(ContextWindowError, match="context window"):
        llm.chat([{"role": "user", "content": "word " * 2000}])


@pytest.fixture(scope="module")
def smol(smollm2):
    client = HFLocalClient(model=smollm2, sampling={"max_tokens": 16})
    yield client
    client.close()


def test_real_model_answers_and_does_not_count_the_end_of_sequence_token(smol):
    result = smol.chat(MESSAGES)
    assert "Paris" in result.text and result.finish_reason == "stop"
    # As servers count: the answer's tokens, without the end-of-sequence token that ended it.
    assert result.usage.completion_tokens == smol.get_token_count(result.text)


def test_gguf_file_loads_model_and_tokenizer_from_the_file(smol, models_dir):
    from pikeclient.backends.smollm2 import SMOLLM2

    folder = models_dir / f"{SMOLLM2.name}-gguf"
    direct = HFLocalClient(model=str(folder), gguf_file=SMOLLM2.gguf_name, sampling={"max_tokens": 16})
    try:
        assert direct.chat(MESSAGES).text == smol.chat(MESSAGES).text
    finally:
        direct.close()


def test_missing_gguf_file_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load tokenizer") as caught:
        HFLocalClient(model=str(tmp_path), gguf_file="missing.gguf")
    assert "\n" not in str(caught.value)


def test_a_short_answer_batched_with_a_long_one_has_its_own_tpot(smol):
    # Both go in one batch; the short answer ends steps before the batch does. Its latency ends with
    # the batch (that is when the caller gets it), its TPOT counts its own steps only.
    async def together():
        return await asyncio.gather(smol.achat(MESSAGES, max_tokens=64),
                                    smol.achat([{"role": "user", "content": "Write a long story about a dog."}],
                                               max_tokens=64))

    short, long = asyncio.run(together())
    assert short.finish_reason == "stop" and long.usage.completion_tokens > short.usage.completion_tokens + 4
    assert short.tpot_s is not None and long.tpot_s is not None
    assert short.tpot_s * (short.usage.completion_tokens - 1) < short.latency_s - short.ttft_s
