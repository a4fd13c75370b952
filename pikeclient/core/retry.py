"""The one retry mechanism every backend goes through (built on tenacity).

Four small pieces, after the openai SDK's own retry code: parse the server's delay, decide whether to
retry, compute the wait, and sleep (the only difference between the sync and async paths). The first
attempt runs outside tenacity's loop, which is built only after a failure and then decides exactly as
for every later attempt: a call that succeeds at once costs no more than the SDK call itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import tenacity

from pikeclient.core.errors import (
    LLMConnectionError,
    LLMError,
    LLMTimeoutError,
    ProtocolError,
    RateLimitError,
    ServerError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks us to wait, or None when it says nothing usable.

    Reads ``retry-after-ms`` and Azure's ``x-ms-retry-after-ms`` first, then ``retry-after`` as seconds
    or as an HTTP date. Negative, infinite and unparseable values count as nothing.
    """
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        seconds = _finite_seconds(lower.get(name), scale=0.001)
        if seconds is not None:
            return seconds
    value = lower.get("retry-after")
    seconds = _finite_seconds(value, scale=1.0)
    if seconds is not None or value is None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _finite_seconds(value: str | None, scale: float) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) * scale
    except (TypeError, ValueError):
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return number


def should_retry(error: BaseException, protocol_failures: int = 1) -> bool:
    """Transient failures are retried; a bad request or bad credentials never are.

    ``protocol_failures``: how many attempts of this call failed with a :class:`ProtocolError` so far.
    """
    if isinstance(error, ProtocolError):  # a 200 that is no answer (an HTML page, no choices): once only
        return protocol_failures <= 1
    if isinstance(error, RateLimitError):  # 429: quota, comes back after a wait
        return True
    if isinstance(error, LLMTimeoutError):  # 408 or our own per-attempt timeout
        return True
    if isinstance(error, ServerError):  # >= 500 and 409 conflicts
        return True
    if isinstance(error, LLMConnectionError):  # refused, reset, dropped mid-answer
        return True
    return False  # 400, 401, 403, 404, context window, local model errors


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed call.

    Waits grow as ``initial_delay * multiplier**n`` up to ``max_delay``, with full jitter; a delay the
    server asks for (Retry-After) is honoured instead. A retry never goes out before the server's
    Retry-After: when it asks for more than ``max_retry_after``, the call gives up (as ``rate_limit``)
    instead of retrying early. ``deadline`` bounds a whole call, waits included.
    """

    max_attempts: int = 4
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 20.0
    jitter: bool = True
    max_retry_after: float = 60.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        # Written as "not allowed" so that NaN, which compares false with everything, is refused too.
        if not self.max_attempts >= 1:
            raise ValueError(f"max_attempts={self.max_attempts} is out of range: allowed >= 1")
        for name in ("initial_delay", "max_delay", "max_retry_after"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: allowed >= 0")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier={self.multiplier} is out of range: allowed >= 1")
        if self.deadline is not None and not 0 < self.deadline < math.inf:
            raise ValueError(f"deadline={self.deadline} is out of range: allowed > 0 seconds, finite (null: none)")

    def wait_seconds(self, attempt: int, error: BaseException | None) -> float:
        """Delay before the attempt after ``attempt`` (1-based)."""
        server = getattr(error, "retry_after", None)
        if server is not None:
            return server  # over max_retry_after, _stop gives up instead
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return random.uniform(0, ceiling) if self.jitter else ceiling

    def call(self, fn: Callable[[], T]) -> RetryOutcome[T]:
        """Run ``fn`` under this policy (blocking)."""
        tracker = _Tracker()
        attempt = tracker.count(fn)
        try:  # the first attempt runs bare: most calls succeed, and tenacity's loop costs ~0.1 ms a call
            return tracker.outcome(attempt())
        except Exception as error:  # noqa: BLE001 - tenacity decides below, as for every later attempt
            tracker.first_failure = error
        retrying = tenacity.Retrying(sleep=tracker.sleep, **self._tenacity_args(tracker))
        return tracker.outcome(retrying(attempt))

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> RetryOutcome[T]:
        """Run the coroutine factory ``fn`` under this policy; ``deadline`` cuts even a running attempt."""
        tracker = _Tracker()
        deadline = asyncio.timeout(self.deadline)
        try:
            async with deadline:
                value = await self._aretry(tracker, tracker.acount(fn))
        except TimeoutError as error:
            if not deadline.expired():
                raise
            timeout = LLMTimeoutError(f"no answer within retry.deadline={self.deadline:g} s (every attempt and wait)")
            tracker.stamp(timeout)
            raise timeout from error
        return tracker.outcome(value)

    async def _aretry(self, tracker: _Tracker, attempt: Callable[[], Awaitable[T]]) -> T:
        try:  # bare first attempt, as in call()
            return await attempt()
        except Exception as error:  # noqa: BLE001 - tenacity decides below
            tracker.first_failure = error
        retrying = tenacity.AsyncRetrying(sleep=tracker.asleep, **self._tenacity_args(tracker))
        return await retrying(attempt)

    def _tenacity_args(self, tracker: _Tracker) -> dict:
        return {
            "stop": lambda state: self._stop(state.attempt_number, tracker.elapsed() + state.upcoming_sleep,
                                             state.outcome.exception()),
            "wait": lambda state: self.wait_seconds(state.attempt_number, state.outcome.exception()),
            "retry": tenacity.retry_if_exception(lambda error: should_retry(error, tracker.protocol_failures)),
            "before_sleep": _log_retry,
            "retry_error_callback": tracker.give_up,
        }

    def _stop(self, attempts: int, seconds_at_next: float, error: BaseException | None = None) -> bool:
        """No attempt after the last allowed one, nor one past the deadline, nor one the server asked
        us to delay longer than ``max_retry_after``."""
        server = getattr(error, "retry_after", None)
        if server is not None and server > self.max_retry_after:
            error.args = (f"{error.args[0]} (the server asked to wait {server:g} s, more than "
                          f"retry.max_retry_after={self.max_retry_after:g})",)
            return True
        return attempts >= self.max_attempts or (self.deadline is not None and seconds_at_next >= self.deadline)


@dataclass(frozen=True)
class RetryOutcome(Generic[T]):
    """A successful call's value with the attempts it took and the time spent waiting between them."""

    value: T
    attempts: int
    backoff_s: float


class _Tracker:
    """Counts attempts and time slept for one call; tenacity's own statistics are per-object.

    ``first_failure`` holds the error of the bare first attempt once it failed: tenacity's loop, built
    only then, gets it back as its attempt 1 (raised again, not counted twice).
    """

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.attempts = 0
        self.backoff_s = 0.0
        self.protocol_failures = 0
        self.first_failure: Exception | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def replay_first_failure(self) -> None:
        if self.first_failure is not None:
            error, self.first_failure = self.first_failure, None
            raise error

    def count(self, fn: Callable[[], T]) -> Callable[[], T]:
        def attempt() -> T:
            self.replay_first_failure()
            self.attempts += 1
            try:
                return fn()
            except LLMError as error:
                self.failed(error)
                raise

        return attempt

    def acount(self, fn: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        async def attempt() -> T:
            self.replay_first_failure()
            self.attempts += 1
            try:
                return await fn()
            except LLMError as error:
                self.failed(error)
                raise

        return attempt

    def sleep(self, seconds: float) -> None:
        self.backoff_s += seconds
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self.backoff_s += seconds
        await asyncio.sleep(seconds)

    def failed(self, error: LLMError) -> None:
        self.protocol_failures += isinstance(error, ProtocolError)
        self.stamp(error)

    def stamp(self, error: LLMError) -> None:
        error.attempts = self.attempts
        error.backoff_s = self.backoff_s

    @staticmethod
    def give_up(state: tenacity.RetryCallState) -> None:
        raise state.outcome.exception()

    def outcome(self, value: T) -> RetryOutcome[T]:
        return RetryOutcome(value=value, attempts=self.attempts, backoff_s=self.backoff_s)


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception()
    delay = state.next_action.sleep if state.next_action else 0.0
    log.info("attempt %d failed (%s: %s); retrying in %.2fs", state.attempt_number, type(error).__name__, error, delay)
