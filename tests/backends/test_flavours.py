"""Server flavours (parameter names, extra_body) and how streams that end early are named, on loopback."""

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError, ContextWindowError, InterruptedStreamError, ProtocolError
from pikeclient.testing.server import FaultPlan

HI = [{"role": "user", "content": "a b c d e f g h"}]


def client(server, **kwargs) -> OpenAIClient:
    return OpenAIClient(model="m", base_url=f"{server.url}/v1", api_key_env=None,
                        retry={"initial_delay": 0.001, "max_delay": 0.01}, **kwargs)


@pytest.fixture
def open_server(server):
    server.api_key = None
    return server


def test_openai_flavour_sends_vllm_names(open_server):
    client(open_server, sampling={"repetition_penalty": 1.3, "top_k": 5}).chat(HI)
    body = open_server.log[-1].body
    assert (body["repetition_penalty"], body["top_k"]) == (1.3, 5) and "repeat_penalty" not in body


def test_llamacpp_flavour_renames_and_neutralises_server_defaults(open_server):
    client(open_server, flavour="llamacpp", max_tokens_field="max_completion_tokens").chat(HI, max_tokens=7)
    body = open_server.log[-1].body
    # llama.cpp ignores max_completion_tokens and would apply repeat_penalty 1.1, top_k 40, min_p 0.05
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body
    assert (body["repeat_penalty"], body["top_k"], body["min_p"]) == (1.0, 0, 0.0)
    client(open_server, flavour="llamacpp", sampling={"repetition_penalty": 1.3}).chat(HI)
    body = open_server.log[-1].body
    assert body["repeat_penalty"] == 1.3 and "repetition_penalty" not in body


def test_extra_body_reaches_the_server_and_wins_over_a_neutral_value(open_server):
    client(open_server, flavour="llamacpp", extra_body={"mirostat_mode": 2, "min_p": 0.1}).chat(HI)
    body = open_server.log[-1].body
    assert (body["mirostat_mode"], body["min_p"], body["top_k"]) == (2, 0.1, 0)


@pytest.mark.parametrize(("key", "instead"), [
    ("model", "llm.model"), ("messages", "the dataset"), ("temperature", "sampling.temperature"),
    ("max_tokens", "sampling.max_tokens"), ("max_completion_tokens", "sampling.max_tokens"),
    ("top_p", "sampling.top_p"), ("stop", "sampling.stop"), ("seed", "sampling.seed"), ("top_k", "sampling.top_k"),
    ("repetition_penalty", "sampling.repetition_penalty"), ("repeat_penalty", "sampling.repetition_penalty"),
    ("min_tokens", "sampling.min_tokens"), ("stream", "llm.stream"), ("stream_options", "llm.stream"),
    ("n", "experiment.repeats"),
])
def test_extra_body_may_not_shadow_a_field_pikeclient_sets(key, instead, open_server):
    with pytest.raises(ConfigError, match=rf"llm.extra_body.{key}: pikeclient sets this field itself; use {instead}"):
        client(open_server, extra_body={key: 1})
    assert open_server.log == []


def test_unknown_flavour_is_a_config_error():
    with pytest.raises(ConfigError, match="llm.flavour='tgi': allowed openai, vllm, llamacpp, ollama"):
        OpenAIClient(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, flavour="tgi")


def test_interrupted_stream_is_named_and_not_retried(open_server):
    open_server.faults = FaultPlan(script=["interrupt"])
    with pytest.raises(InterruptedStreamError, match="--interrupt_requests False") as caught:
        client(open_server, stream=True).chat(HI)
    assert caught.value.attempts == 1 and caught.value.kind == "interrupted" and len(open_server.log) == 1


def test_empty_event_stream_is_a_context_window_error_not_retried(open_server):
    open_server.faults = FaultPlan(script=["empty_stream"])
    with pytest.raises(ContextWindowError, match="empty event stream") as caught:
        client(open_server, stream=True).chat(HI)
    assert caught.value.attempts == 1 and len(open_server.log) == 1


def test_dropped_stream_is_still_a_retried_connection_error(open_server):
    open_server.faults = FaultPlan(script=["cut_stream"])
    assert client(open_server, stream=True).chat(HI).attempts == 2


def test_json_where_a_stream_was_expected_is_a_protocol_error_retried_once(open_server):
    open_server.faults = FaultPlan(script=["malformed"])
    assert client(open_server, stream=True).chat(HI).attempts == 2
    open_server.faults = FaultPlan(rates={"malformed": 1.0})
    with pytest.raises(ProtocolError, match="application/json where an event stream was expected") as caught:
        client(open_server, stream=True).chat(HI)
    assert caught.value.attempts == 2
