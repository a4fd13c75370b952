"""PikeClientLLM under PIKE-RAG's real base class, built as PIKE-RAG's workflows build it, against the
loopback server: sampling, PIKE-RAG's cache and round switch, thread pools, failures after retries."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pikeclient.core.errors import ConfigError, ServerError
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, files_containing
from tests.integrations.conftest import MODEL, server_args, traces_of, tracked_run

QUESTION = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is Paris?"}]
CONFIG = {"model": MODEL, "temperature": 0}


def ask(client, text: str, **llm_config) -> str:
    messages = [{"role": "user", "content": text}]
    return client.generate_content_with_messages(messages, **(llm_config or CONFIG))


def test_built_as_workflows_build_it_it_answers_through_pikeclient(build, server, tmp_path):
    client = build(server_args(server, tmp_path))
    assert client.generate_content_with_messages(QUESTION, **CONFIG) == "You said: Where is Paris?"
    body = server.log[-1].body
    assert body["model"] == MODEL and body["temperature"] == 0 and body["messages"] == QUESTION
    assert client.client.provider == "openai" and client.stats.calls == 1 and client.stats.measured == 1


def test_azure_openai_with_the_variables_pikerags_env_sets(build, server, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.url)  # AZURE_OPENAI_API_KEY: set by api_env
    client = build({"llm": "azure_openai", "overrides": ["llm.deployment=my-gpt4o"]}, {"model": "gpt-4o"})
    assert client.generate_content_with_messages(QUESTION, model="gpt-4o") == "You said: Where is Paris?"
    assert server.log[-1].path.startswith("/openai/deployments/my-gpt4o/chat/completions")
    assert client.client.describe()["model"] == "gpt-4o" and client.stats.token_sources == {"server": 1}


def test_llm_config_becomes_pikeclient_sampling_hf_names_included(build, server, tmp_path):
    llm_config = {"model": MODEL, "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 3, "stop": ["END"], "seed": 7}
    client = build(server_args(server, tmp_path), llm_config)
    assert client.generate_content_with_messages(QUESTION, **llm_config) == "You said: Where"
    body = server.log[-1].body
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"], body["seed"]) == (0.3, 0.9, 3,
                                                                                                    ["END"], 7)
    greedy = {"model": MODEL, "do_sample": False, "temperature": 0.8}  # transformers ignores it: greedy
    client.generate_content_with_messages(QUESTION, **greedy)
    assert server.log[-1].body["temperature"] == 0


def test_a_call_for_another_model_than_the_client_was_built_for_fails(build, server, tmp_path):
    client = build(server_args(server, tmp_path))
    with pytest.raises(ValueError, match="llm_config.model='gpt-4'"):
        client.generate_content_with_messages(QUESTION, model="gpt-4", temperature=0)
    assert server.request_count == 0


def test_pikerags_cache_serves_repeats_as_cache_hits_and_keeps_them_on_disk(build, server, tmp_path):
    cache = tmp_path / "logs" / "qa_round0.db"
    first = build(server_args(server, tmp_path), location=str(cache))
    assert ask(first, "capital of France") == ask(first, "capital of France") == "You said: capital of France"
    assert server.request_count == 1
    assert (first.stats.calls, first.stats.measured, first.stats.cache_hits) == (2, 1, 1)
    assert "You said: capital of France" in cache.read_text()  # auto_dump: saved as it was set
    # A new client on the same file (the next run of the workflow) is served from it, not the server.
    again = build(server_args(server, tmp_path), location=str(cache))
    assert ask(again, "capital of France") == "You said: capital of France"
    assert server.request_count == 1 and again.stats.cache_hits == 1
    # Another backend behind the same llm_config is never served the first one's answers.
    other = build(server_args(server, tmp_path, "llm.model=another-model"), location=str(cache))
    assert ask(other, "capital of France") == "You said: capital of France"
    assert server.request_count == 2 and other.stats.cache_hits == 0


def test_round_switch_opens_a_new_cache_and_saves_the_last_one(build, server, tmp_path):
    logs = tmp_path / "logs"
    client = build(server_args(server, tmp_path), auto_dump=False)  # QA: no cache until the first round
    ask(client, "one")
    client.update_cache_location(str(logs / "qa_round0.db"))
    ask(client, "two")
    client.update_cache_location(str(logs / "qa_round1.db"))
    assert "You said: two" in (logs / "qa_round0.db").read_text()  # saved when the round ended
    ask(client, "two")  # a new round asks again
    client.update_cache_location(str(logs / "qa_round0.db"))
    ask(client, "two")  # round 0's answer, read back
    assert server.request_count == 3
    assert (client.stats.calls, client.stats.cache_hits) == (4, 1)


def test_one_client_shared_by_a_thread_pool_attaches_every_answer_to_its_prompt(build, server, tmp_path):
    client = build(server_args(server, tmp_path, tracking=True), location=str(tmp_path / "logs" / "qa_round0.db"))
    prompts = [f"question number {i}" for i in range(48)]
    for _ in range(2):  # the second pass is served by the cache, from 8 threads as well
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda p: ask(client, p), prompts))
        assert answers == [f"You said: {p}" for p in prompts]
    assert server.request_count == 48
    assert (client.stats.calls, client.stats.measured, client.stats.cache_hits) == (96, 48, 48)
    client.close()
    run = tracked_run(tmp_path / "runs")
    assert (run.data.metrics["calls/total"], run.data.metrics["calls/cache_hits"]) == (96, 48)
    spans = [t.data.spans[0] for t in traces_of(tmp_path / "runs", run)]
    assert len(spans) == 48  # one per call made; none for the cache's answers
    assert all(s.outputs["text"] == "You said: " + s.inputs["messages"][-1]["content"] for s in spans)


def test_called_from_inside_a_running_event_loop(build, server, tmp_path):
    """A notebook's thread runs a loop: no asyncio.run there, and pickledb's coroutines are run elsewhere."""
    client = build(server_args(server, tmp_path), location=str(tmp_path / "logs" / "qa_round0.db"))

    async def notebook_cell() -> list[str]:
        return [ask(client, "inside a loop"), ask(client, "inside a loop")]

    assert asyncio.run(notebook_cell()) == ["You said: inside a loop"] * 2
    assert server.request_count == 1 and client.stats.cache_hits == 1


@pytest.fixture
def failing_server():
    """Three answers fail with HTTP 500, then the server answers."""
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(script=["500", "500", "500"])) as srv:
        yield srv


def test_a_failure_after_retries_is_an_empty_answer_logged_counted_and_not_cached(build, failing_server, tmp_path,
                                                                               caplog):
    args = server_args(failing_server, tmp_path, "retry.initial_delay=0.01", max_attempt=3)
    client = build(args, location=str(tmp_path / "logs" / "qa_round0.db"))
    with caplog.at_level(logging.ERROR):
        assert ask(client, "will fail") == ""
    assert failing_server.request_count == 3  # pikeclient's attempts, and no other loop around them
    message = "LLM call failed after 3 attempt(s), server: HTTP 500"
    assert any(message in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert message in (tmp_path / "logs" / "client.log").read_text()  # PIKE-RAG's own client log
    assert (client.stats.errors["server"], client.stats.retries, client.stats.measured) == (1, 2, 0)
    assert ask(client, "will fail") == "You said: will fail"  # not cached: asked again, and answered
    client.close()
    assert client.stats.error_count == 1


def test_on_error_raise_gives_the_error_to_pikerag(build, failing_server, tmp_path):
    client = build(server_args(failing_server, tmp_path, "retry.max_attempts=1", on_error="raise"))
    with pytest.raises(ServerError, match="HTTP 500"):
        ask(client, "will fail")
    assert client.stats.errors["server"] == 1


@pytest.mark.parametrize("args, llm_config, message", [
    ({"llm": None}, None, "args.llm: name a shipped llm config"),
    ({"llm": "openai", "unit_wait_time": 5}, None, "args.unit_wait_time: pikeclient retries"),
    ({"llm": "openai", "client_config": {}}, None, "args.client_config: unknown argument of PikeClientLLM"),
    ({"llm": "openai", "on_error": "ignore"}, None, "args.on_error='ignore': allowed empty, raise"),
    ({"llm": "no_such_backend"}, None, "cannot compose"),
    ({"llm": "openai", "overrides": ["retry.max_atempts=3"]}, None, "cannot compose"),
    ({"llm": "openai", "tracking": {"experiment": "x"}}, None, "args.tracking.experiment: unknown key"),
    ({"llm": "openai"}, {"model": MODEL, "presence_penalty": 0.5}, "llm_config.presence_penalty: not a sampling"),
    ({"llm": "openai"}, {"model": MODEL, "temperature": 5}, "temperature=5 is out of range"),
    ({"llm": "openai"}, {"model": MODEL, "n": 3}, "llm_config.n=3"),
])
def test_bad_arguments_fail_at_construction_with_one_line(build, server, tmp_path, args, llm_config, message):
    if args.get("llm") == "openai":
        args = {**server_args(server, tmp_path), **{k: v for k, v in args.items() if k != "overrides"},
                "overrides": [*server_args(server, tmp_path)["overrides"], *args.get("overrides", [])]}
    with pytest.raises(ConfigError) as raised:
        build(args, llm_config)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert server.request_count == 0 and not (tmp_path / "runs" / "mlflow.db").exists()


def test_no_key_is_written_anywhere(build, server, tmp_path):
    client = build(server_args(server, tmp_path, tracking=True), location=str(tmp_path / "logs" / "qa_round0.db"))
    ask(client, "hello")
    client.close()
    assert files_containing(tmp_path, API_KEY) == []
    assert Path(tmp_path / "runs" / "mlflow.db").exists()


def test_an_unusable_tracking_store_fails_before_any_call_and_leaves_nothing(build, server, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="tracking") as raised:
        build(server_args(server, tmp_path, tracking={"tracking_uri": f"sqlite:///{blocker}/mlflow.db"}))
    assert "\n" not in str(raised.value) and server.request_count == 0
    assert list((tmp_path / "logs" / "pikeclient").glob("*")) == []  # no records folder left behind
