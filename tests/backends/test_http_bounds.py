"""What every HTTP backend does with answers that are not answers, against the real loopback server:
one that never ends (a total per attempt, bounded memory), usage that is not a count, and HTTP 200 bodies
that are not chat completions (protocol errors, retried once). Sync and async, streamed and not."""

from __future__ import annotations

import asyncio
import time

import pytest

from pikeclient.backends.azure_meta_llama import AzureMetaLlamaClient
from pikeclient.backends.azure_openai import AzureOpenAIClient
from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError, LLMTimeoutError, ProtocolError
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY

HI = [{"role": "user", "content": "one two three"}]
FAST = {"initial_delay": 0.001, "max_delay": 0.01}

BACKENDS = {
    "openai": lambda srv, **k: OpenAIClient(model="gpt-4o-mini", base_url=f"{srv.url}/v1", **k),
    "openai-stream": lambda srv, **k: OpenAIClient(model="gpt-4o-mini", base_url=f"{srv.url}/v1", stream=True, **k),
    "azure_openai": lambda srv, **k: AzureOpenAIClient(azure_endpoint=srv.url, deployment="d", api_version="2024-10-21",
                                                       model="gpt-4o", **k),
    "azure_openai-stream": lambda srv, **k: AzureOpenAIClient(azure_endpoint=srv.url, deployment="d", stream=True,
                                                              api_version="2024-10-21", model="gpt-4o", **k),
    "azure_meta_llama": lambda srv, **k: AzureMetaLlamaClient(endpoint=srv.url, **k),
    "aml_score": lambda srv, **k: AzureMetaLlamaClient(endpoint=f"{srv.url}/score", api="aml_score", **k),
}


@pytest.fixture
def keys(api_env):
    return API_KEY


def call(client, mode):
    """One chat call, blocking or on an event loop (the async client is closed on the same loop)."""
    if mode == "sync":
        return client.chat(HI)

    async def main():
        try:
            return await client.achat(HI)
        finally:
            await client.aclose()

    return asyncio.run(main())


# -- item 5: an answer that never ends -------------------------------------------------------------

@pytest.mark.timeout(120)  # before llm.total_timeout, each of these ran until the test's own timeout
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_endless_answer_ends_as_a_timeout_at_the_total(backend, mode, keys):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={"endless": 1.0})) as server:
        client = BACKENDS[backend](server, timeout=5, total_timeout=0.5, retry={"max_attempts": 1})
        start = time.perf_counter()
        with pytest.raises(LLMTimeoutError, match=r"no complete answer within llm.total_timeout=0.5 s") as caught:
            call(client, mode)
        assert time.perf_counter() - start >= 0.5  # a chunk every 10 ms: llm.timeout=5 was never met
        assert caught.value.kind == "timeout" and caught.value.attempts == 1 and len(server.log) == 1


@pytest.mark.timeout(120)
def test_the_default_total_comes_from_the_timeout_and_max_tokens_and_is_retried_as_a_timeout(keys):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={"endless": 1.0})) as server:
        client = BACKENDS["openai-stream"](server, timeout=0.2, sampling={"max_tokens": 2},
                                           retry={**FAST, "max_attempts": 2})
        start = time.perf_counter()
        with pytest.raises(LLMTimeoutError) as caught:
            client.chat(HI)
    assert "llm.total_timeout=0.7 s (null: llm.timeout=0.2 + 0.25 s x max_tokens=2)" in str(caught.value)
    assert caught.value.attempts == 2 and len(server.log) == 2
    assert time.perf_counter() - start >= 1.4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", ["openai", "openai-stream", "azure_meta_llama"])
def test_an_answer_larger_than_max_tokens_allows_is_cut_as_a_protocol_error(backend, mode, keys):
    # 64 KiB pieces as fast as the client reads them: without a bound, ~100 MB a second piled up.
    flood = FaultPlan(rates={"endless": 1.0}, endless_s=0.0, endless_piece="x" * 65536)
    with FakeLLMServer(api_key=API_KEY, faults=flood) as server:
        client = BACKENDS[backend](server, total_timeout=100, sampling={"max_tokens": 16}, retry={**FAST})
        with pytest.raises(ProtocolError, match=r"more than 1179648 bytes, more than max_tokens allows") as caught:
            call(client, mode)
    assert caught.value.attempts == 2 and len(server.log) == 2  # a protocol error is retried once


@pytest.mark.parametrize("backend", ["openai", "azure_meta_llama"])
def test_a_slow_answer_within_the_total_is_kept(backend, keys):
    with FakeLLMServer(api_key=API_KEY, latency=0.3) as server:
        result = BACKENDS[backend](server, timeout=5, total_timeout=3).chat(HI)
    assert result.text == "You said: one two three" and result.attempts == 1


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["openai", "azure_meta_llama"])
def test_bad_totals_and_timeouts_are_refused(backend, value, server, keys):
    with pytest.raises(ConfigError, match=r"llm.total_timeout=.* must be > 0 seconds"):
        BACKENDS[backend](server, total_timeout=value)
    with pytest.raises(ConfigError, match=r"llm.timeout=.* must be > 0 seconds"):
        BACKENDS[backend](server, timeout=value)


# -- item 8: usage that is not a count ---------------------------------------------------------------

BAD_USAGE = {
    "negative": {"prompt_tokens": -150, "completion_tokens": -21, "total_tokens": -171},
    "absurd": {"prompt_tokens": 10**15, "completion_tokens": 10**15, "total_tokens": 2 * 10**15},
    "strings": {"prompt_tokens": "many", "completion_tokens": "few", "total_tokens": "lots"},
    "not_an_object": "lots",
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", ["openai", "openai-stream", "azure_meta_llama"])
@pytest.mark.parametrize("case", sorted(BAD_USAGE))
def test_usage_that_is_not_a_count_is_refused_and_the_answer_kept(case, backend, mode, keys, caplog):
    with FakeLLMServer(api_key=API_KEY, usage=BAD_USAGE[case]) as server:
        result = call(BACKENDS[backend](server), mode)
    assert result.text == "You said: one two three" and result.attempts == 1
    usage = result.usage
    assert usage.server_error is not None and "usage is not" in usage.server_error
    if backend == "azure_meta_llama":  # no tokenizer named: not counted
        assert (usage.source, usage.total_tokens) == ("none", None)
    else:  # tiktoken's encoding of gpt-4o-mini: the model's own
        assert usage.source == "tokenizer" and 0 < usage.total_tokens < 100
    assert "never summed" in caplog.text


# -- item 13: HTTP 200 that is no chat completion ------------------------------------------------------

NO_ANSWER = [(fault, backend) for fault in ("html", "empty_choices", "null_content") for backend in sorted(BACKENDS)
             if (fault, backend) != ("null_content", "aml_score")]  # a scoring answer has no message to null


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("fault", "backend"), NO_ANSWER)
def test_a_200_that_is_no_answer_is_a_protocol_error_retried_once(fault, backend, mode, keys):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={fault: 1.0})) as server:
        with pytest.raises(ProtocolError) as caught:
            call(BACKENDS[backend](server, retry=FAST), mode)
    assert caught.value.kind == "protocol" and caught.value.attempts == 2 and len(server.log) == 2


def test_a_protocol_error_then_an_answer_succeeds(server, keys):
    server.faults = FaultPlan(script=["html"])
    result = BACKENDS["azure_meta_llama"](server, retry=FAST).chat(HI)
    assert result.attempts == 2 and result.text == "You said: one two three"
