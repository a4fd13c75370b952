"""OpenAI backend against a real HTTP server on loopback."""

import asyncio
import time

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import AuthError, ConfigError, LLMConnectionError, LLMTimeoutError, ServerError
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY

FAST_RETRY = {"initial_delay": 0.001, "max_delay": 0.01}


def client(server, **kwargs) -> OpenAIClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return OpenAIClient(model="gpt-4o-mini", base_url=f"{server.url}/v1", **kwargs)


def test_chat_result_carries_usage_and_finish_reason(server, api_env):
    result = client(server).chat([{"role": "user", "content": "one two three"}])
    assert result.text == "You said: one two three"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.source) == (3, 5, "server")
    assert result.attempts == 1 and result.latency_s > 0


def test_generate_and_sampling_overrides_reach_the_server(server, api_env):
    c = client(server, sampling={"max_tokens": 3})
    assert c.generate("a b c d e") == "You said: a"
    assert c.generate("a b c d e", max_tokens=4) == "You said: a b"
    assert c.generate("a b STOP c", max_tokens=50, stop=["STOP"]) == "You said: a b "


def test_streaming_gives_time_to_first_token_and_server_usage(server, api_env):
    server.token_delay = 0.01
    result = client(server, stream=True).chat([{"role": "user", "content": "stream these words"}])
    assert result.text == "You said: stream these words"
    assert result.usage.source == "server" and result.usage.completion_tokens == 5
    assert 0 < result.ttft_s < result.latency_s


def test_async_streaming(server, api_env):
    async def main():
        c = client(server, stream=True)
        try:
            return await asyncio.gather(*(c.achat([{"role": "user", "content": f"n {i}"}]) for i in range(5)))
        finally:
            await c.aclose()

    results = asyncio.run(main())
    assert [r.text for r in results] == [f"You said: n {i}" for i in range(5)]


def test_429_waits_for_retry_after_measured_server_side(server, api_env):
    server.faults = FaultPlan(script=["429"], retry_after=0.3)
    result = client(server).chat([{"role": "user", "content": "hi"}])
    first, second = server.log
    assert (first.status, second.status) == (429, 200)
    assert second.time - first.time >= 0.3
    assert result.attempts == 2 and result.backoff_s == pytest.approx(0.3)


def test_retry_after_ms_header(server, api_env):
    server.faults = FaultPlan(script=["429"], retry_after=0.2, retry_after_header="retry-after-ms")
    client(server).chat([{"role": "user", "content": "hi"}])
    assert server.log[1].time - server.log[0].time >= 0.2


def test_5xx_and_drops_are_retried_and_sdk_retries_are_off(server, api_env):
    server.faults = FaultPlan(script=["500", "503", "drop"])
    result = client(server).chat([{"role": "user", "content": "hi"}])
    assert result.attempts == 4
    assert len(server.log) == 4  # the SDK added no attempts of its own


def test_gives_up_with_the_error_class_and_attempts(server, api_env):
    server.faults = FaultPlan(rates={"500": 1.0})
    with pytest.raises(ServerError) as caught:
        client(server, retry={**FAST_RETRY, "max_attempts": 3}).chat([{"role": "user", "content": "hi"}])
    assert caught.value.attempts == 3 and caught.value.status == 500
    assert len(server.log) == 3


def test_bad_key_is_not_retried(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with pytest.raises(AuthError) as caught:
        client(server).chat([{"role": "user", "content": "hi"}])
    assert caught.value.attempts == 1 and len(server.log) == 1


def test_cut_stream_is_a_connection_error_and_retried(server, api_env):
    server.faults = FaultPlan(script=["cut_stream"])
    result = client(server, stream=True).chat([{"role": "user", "content": "a b c d e f"}])
    assert result.attempts == 2 and result.text == "You said: a b c d e f"


def test_malformed_json_is_a_server_error(server, api_env):
    server.faults = FaultPlan(rates={"malformed": 1.0})
    with pytest.raises(ServerError, match="malformed"):
        client(server, retry={"max_attempts": 1}).chat([{"role": "user", "content": "hi"}])


def test_timeout_per_attempt(api_env):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={"hang": 1.0}, hang_s=5)) as srv:
        c = client(srv, timeout=0.2, retry={"max_attempts": 2, "initial_delay": 0.01})
        start = time.perf_counter()
        with pytest.raises(LLMTimeoutError) as caught:
            c.chat([{"role": "user", "content": "hi"}])
        assert caught.value.attempts == 2
        assert time.perf_counter() - start < 2


def test_connection_refused_is_a_connection_error(api_env):
    with FakeLLMServer() as srv:
        url = f"{srv.url}/v1"
    c = OpenAIClient(model="gpt-4o", base_url=url, retry={"max_attempts": 2, "initial_delay": 0.001})
    with pytest.raises(LLMConnectionError):
        c.chat([{"role": "user", "content": "hi"}])


def test_two_clients_with_different_endpoints_in_one_process(api_env, monkeypatch):
    monkeypatch.setenv("SECOND_KEY", "sk-second")
    with FakeLLMServer(api_key=API_KEY) as one, FakeLLMServer(api_key="sk-second") as two:
        a = client(one)
        b = OpenAIClient(model="gpt-4o", base_url=f"{two.url}/v1", api_key_env="SECOND_KEY")
        assert a.generate("x") == b.generate("x") == "You said: x"
        assert (len(one.log), len(two.log)) == (1, 1)


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        OpenAIClient(model="gpt-4o")


def test_server_without_key(server):
    server.api_key = None
    assert OpenAIClient(model="llama", base_url=f"{server.url}/v1", api_key_env=None).generate("x") == "You said: x"


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x/v1", "http://"])
def test_bad_base_url(url, api_env):
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIClient(model="gpt-4o", base_url=url)


def test_local_token_count_when_server_reports_none(api_env):
    # A stream without a usage chunk (llama.cpp ignores include_usage): counted with gpt-4o's own encoding.
    with FakeLLMServer(api_key=API_KEY, report_usage=False) as server:
        c = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", stream=True)
        result = c.chat([{"role": "user", "content": "hello world"}])
    assert result.usage.source == "tokenizer"
    assert result.usage.completion_tokens == c.get_token_count(result.text)


def test_prepare_leaves_no_one_time_work_to_the_first_measured_call(api_env):
    # The SDK imports its resources, types and transport lazily, and the first parse builds type caches:
    # ~0.2-0.4 s inside the first call's TTFT on this machine, and a stall of every call in flight.
    import sys

    with FakeLLMServer(api_key=API_KEY) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", stream=True)
        client.prepare()
        before = set(sys.modules)
        asyncio.run(client.achat([{"role": "user", "content": "hello"}]))
    assert sorted(set(sys.modules) - before) == []


def test_an_async_runs_first_call_starts_no_thread_and_describing_it_makes_no_sync_client(api_env):
    # The async SDK's first request found out the platform in a thread it started (~2 ms), and describe()
    # made the sync SDK client for its base URL (~20 ms, its TLS context): both on the measured calls' clock.
    import threading

    with FakeLLMServer(api_key=API_KEY) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        client.prepare()

        async def first_call() -> tuple[dict, set[str]]:
            described = client.describe()
            before = {thread.name for thread in threading.enumerate()}
            await client.achat([{"role": "user", "content": "hello"}])
            return described, {thread.name for thread in threading.enumerate()} - before

        described, new_threads = asyncio.run(first_call())
    assert new_threads == set()
    assert described["endpoint"] == f"{server.url}/v1/"
    assert client._clients._sync is None  # nothing of this run was sync
    assert client.describe() == described


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_time_before_the_send_is_reported_apart(api_env, stream):
    # 32 calls started together: each waits for the SDK to build the ones before it. That wait is the
    # client's (send_delay_s); latency and TTFT count from the request going out, so neither can be
    # shorter than what the server itself took (its own clock, the same CLOCK_MONOTONIC).
    with FakeLLMServer(latency=0.05, token_delay=0.005, keep_timings=True) as server:
        c = client(server, stream=stream)
        c.prepare()

        async def together():
            return await asyncio.gather(*(c.achat([{"role": "user", "content": f"call {i} a b c"}])
                                          for i in range(32)))

        results = asyncio.run(together())
        sync = c.chat([{"role": "user", "content": "call sync a b c"}])
        timings = {t.prompt: t for t in server.timings}
    for i, result in enumerate([*results, sync]):
        assert result.send_delay_s is not None and result.send_delay_s >= 0
        assert result.latency_s >= 0.05
        if stream:
            served = timings[f"call {i} a b c" if i < 32 else "call sync a b c"]
            assert result.ttft_s >= served.first - served.received
    assert max(r.send_delay_s for r in results) > min(r.send_delay_s for r in results)


def test_a_new_connections_set_up_is_recorded_apart_and_a_kept_one_has_none(api_env):
    # Latency and TTFT count from the request's first bytes written; a call that had to open a connection
    # (TCP, and the event loop's turns until the request could be written) says how long that took.
    with FakeLLMServer(latency=0.02, keep_timings=True) as server:
        c = client(server)
        c.prepare()

        async def two_in_turn():
            return [await c.achat([{"role": "user", "content": f"async {i}"}]) for i in range(2)]

        first, kept = asyncio.run(two_in_turn())
        sync_first = c.chat([{"role": "user", "content": "sync 0"}])
        sync_kept = c.chat([{"role": "user", "content": "sync 1"}])
    for opened, reused in ((first, kept), (sync_first, sync_kept)):
        assert opened.connect_s is not None and opened.connect_s >= 0
        assert reused.connect_s is None
        assert opened.latency_s >= 0.02 and reused.latency_s >= 0.02
        assert opened.send_delay_s is not None and reused.send_delay_s is not None


def test_async_calls_go_over_aiohttp_with_the_sdks_headers(server, api_env):
    # The async SDK client sends through aiohttp (half the CPU of httpx2's own transport): the key, the
    # call's request id and the JSON body arrive as they would through httpx2.
    from pikeclient.backends._http import AioHTTPTransport
    from pikeclient.core.request_id import request_id

    c = client(server)
    assert isinstance(c.async_sdk._client._transport, AioHTTPTransport)

    async def call():
        with request_id("0123abcd"):
            return await c.achat([{"role": "user", "content": "over aiohttp"}], max_tokens=7)

    assert asyncio.run(call()).text == "You said: over aiohttp"
    received = server.log[-1]
    assert received.headers.get("authorization") == f"Bearer {API_KEY}"
    assert received.headers.get("x-request-id") == "0123abcd"
    assert received.body["max_tokens"] == 7 and received.body["messages"][0]["content"] == "over aiohttp"


def test_a_client_serves_one_asyncio_run_after_another_without_warnings(server, api_env, recwarn, caplog):
    # Each asyncio.run ends its loop; the aiohttp session made in it is closed with it (never "unclosed").
    import gc

    gc.collect()  # what earlier tests left is theirs, not this test's
    recwarn.clear()
    caplog.clear()
    c = client(server, stream=True)
    assert asyncio.run(c.agenerate("one")) == "You said: one"
    assert asyncio.run(c.agenerate("two")) == "You said: two"
    del c  # as at the end of a script that never closed it
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
    assert "Unclosed" not in caplog.text


def test_a_dropped_connection_is_a_connection_error_not_a_timeout(server, api_env):
    server.faults = FaultPlan(script=["drop"])
    with pytest.raises(LLMConnectionError):
        asyncio.run(client(server, retry={"max_attempts": 1}).achat([{"role": "user", "content": "hi"}]))
