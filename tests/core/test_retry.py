import asyncio
import email.utils
import time

import pytest

from pikeclient.core.errors import (
    AuthError,
    BadRequestError,
    LLMConnectionError,
    ProtocolError,
    RateLimitError,
    ServerError,
)
from pikeclient.core.retry import RetryPolicy, parse_retry_after, should_retry


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "-10"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "garbage", "retry-after": "2"}, 2.0),
        ({}, None),
        (None, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= parse_retry_after({"retry-after": when}) <= 30
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (RateLimitError("x", status=429), True),
        (ServerError("x", status=503), True),
        (LLMConnectionError("x"), True),
        (AuthError("x", status=401), False),
        (BadRequestError("x", status=400), False),
        (ValueError("not ours"), False),
        (ProtocolError("HTTP 200 with text/html"), True),
    ],
)
def test_should_retry(error, retry):
    assert should_retry(error) is retry


def test_a_protocol_error_is_retried_once_per_call_whatever_failed_before():
    policy = RetryPolicy(max_attempts=6, initial_delay=0.001)
    with pytest.raises(ProtocolError) as caught:
        policy.call(failing([ProtocolError("html"), ProtocolError("html"), ProtocolError("html")]))
    assert caught.value.attempts == 2
    # A server error first does not use up the protocol error's one retry.
    outcome = policy.call(failing([ServerError("a", status=500), ProtocolError("html"), ServerError("b", status=503)]))
    assert (outcome.value, outcome.attempts) == ("ok", 4)
    with pytest.raises(ProtocolError) as caught:
        policy.call(failing([ProtocolError("html"), ServerError("a", status=500), ProtocolError("no choices")]))
    assert caught.value.attempts == 3

    async def main():
        pending = [ProtocolError("html")] * 3

        async def call():
            raise pending.pop()

        await policy.acall(call)

    with pytest.raises(ProtocolError) as caught:
        asyncio.run(main())
    assert caught.value.attempts == 2


def failing(errors):
    """A callable failing with ``errors`` in turn, then answering "ok"."""
    pending = list(errors)

    def call():
        if pending:
            raise pending.pop(0)
        return "ok"

    return call


def test_retries_transient_then_succeeds_and_counts_attempts():
    policy = RetryPolicy(max_attempts=4, initial_delay=0.001, jitter=False)
    outcome = policy.call(failing([ServerError("a", status=500), LLMConnectionError("b")]))
    assert (outcome.value, outcome.attempts) == ("ok", 3)
    assert outcome.backoff_s == pytest.approx(0.001 + 0.002)


def test_server_delay_is_honoured():
    policy = RetryPolicy(initial_delay=0.001, max_retry_after=0.05)
    assert policy.wait_seconds(1, RateLimitError("x", retry_after=0.02)) == 0.02
    start = time.perf_counter()
    outcome = policy.call(failing([RateLimitError("x", status=429, retry_after=0.05)]))
    assert time.perf_counter() - start >= 0.05
    assert outcome.backoff_s == pytest.approx(0.05)


@pytest.mark.parametrize("cap", [0.0, 1.0])
def test_a_retry_never_goes_out_before_the_servers_retry_after(cap):
    # Above the cap the call gives up as rate_limit at once; it never retries early.
    policy = RetryPolicy(initial_delay=0.001, max_retry_after=cap)
    with pytest.raises(RateLimitError, match="more than retry.max_retry_after") as caught:
        policy.call(failing([RateLimitError("x", status=429, retry_after=2)] * 3))
    assert caught.value.attempts == 1 and caught.value.backoff_s == 0.0


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=False)
    assert [policy.wait_seconds(n, None) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    jittered = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5)
    assert all(0 <= jittered.wait_seconds(3, None) <= 4 for _ in range(50))


def test_non_retryable_fails_at_once_with_attempts():
    with pytest.raises(AuthError) as caught:
        RetryPolicy(initial_delay=0.001).call(failing([AuthError("bad key", status=401)]))
    assert caught.value.attempts == 1


def test_gives_up_after_max_attempts():
    errors = [ServerError(str(i), status=500) for i in range(5)]
    with pytest.raises(ServerError) as caught:
        RetryPolicy(max_attempts=3, initial_delay=0.001).call(failing(errors))
    assert caught.value.attempts == 3


def test_deadline_stops_retrying():
    policy = RetryPolicy(max_attempts=10, initial_delay=0.2, jitter=False, deadline=0.3)
    with pytest.raises(ServerError) as caught:
        policy.call(failing([ServerError(str(i), status=500) for i in range(10)]))
    assert caught.value.attempts < 10


def test_async_path_counts_the_same():
    async def main():
        pending = [RateLimitError("x", retry_after=0.01)]

        async def call():
            if pending:
                raise pending.pop()
            return "ok"

        return await RetryPolicy(initial_delay=0.001).acall(call)

    outcome = asyncio.run(main())
    assert (outcome.value, outcome.attempts) == ("ok", 2)


def test_single_attempt_policy_never_retries():
    with pytest.raises(ServerError) as caught:
        RetryPolicy(max_attempts=1).call(failing([ServerError("a", status=500)]))
    assert (caught.value.attempts, caught.value.backoff_s) == (1, 0.0)


def test_deadline_counts_the_first_attempt():
    def slow_failure():
        time.sleep(0.25)
        raise ServerError("slow", status=500)

    policy = RetryPolicy(max_attempts=5, initial_delay=0.1, jitter=False, deadline=0.3)
    with pytest.raises(ServerError) as caught:
        policy.call(slow_failure)
    assert caught.value.attempts == 1  # 0.25 s spent + 0.1 s wait would start past the 0.3 s deadline


def test_first_failure_is_logged_and_programming_errors_pass_through(caplog):
    caplog.set_level("INFO", logger="pikeclient.core.retry")
    RetryPolicy(initial_delay=0.001).call(failing([ServerError("boom", status=503)]))
    assert "attempt 1 failed (ServerError: boom)" in caplog.text
    calls = []

    def buggy():
        calls.append(1)
        raise KeyError("not an LLM error")

    with pytest.raises(KeyError):
        RetryPolicy(initial_delay=0.001).call(buggy)
    assert calls == [1]


def test_async_non_retryable_and_give_up_count_attempts():
    async def attempts_of(policy, errors):
        pending = list(errors)

        async def call():
            raise pending.pop(0)

        try:
            await policy.acall(call)
        except (AuthError, ServerError) as error:
            return type(error), error.attempts

    policy = RetryPolicy(max_attempts=3, initial_delay=0.001)
    assert asyncio.run(attempts_of(policy, [AuthError("no", status=401)])) == (AuthError, 1)
    assert asyncio.run(attempts_of(policy, [ServerError(str(i), status=500) for i in range(3)])) == (ServerError, 3)


@pytest.mark.parametrize("bad", [{"max_attempts": 0}, {"initial_delay": -1}, {"multiplier": 0.5}, {"deadline": 0},
                                 {"initial_delay": float("nan")}, {"max_delay": float("nan")},
                                 {"multiplier": float("nan")}, {"deadline": float("nan")}, {"deadline": float("inf")}])
def test_bad_policy_values(bad):
    with pytest.raises(ValueError, match="out of range"):
        RetryPolicy(**bad)
