"""How long, and how much, one attempt of an HTTP call may take.

``llm.timeout`` bounds each wait for the server (connecting, every read): an answer that keeps coming,
a chunk every 10 ms forever, never meets it, and ran for minutes. So an attempt also has a total,
``llm.total_timeout``: from the attempt's start to the answer's last byte, after which it ends as a
``timeout`` error (retried as timeouts are; ``retry.deadline`` bounds the whole call, waits included).
Left null, it is ``llm.timeout + 0.25 s x max_tokens``: the first byte may take ``llm.timeout``, and
the answer may then come as slowly as 4 tokens a second. Its body may also not grow past what
``max_tokens`` allows (1 MiB + 8 KiB a token, streaming's JSON around each token included): more is
no answer to this request, a ``protocol`` error, and memory stays bounded.

Both are checked as the body arrives (a response hook wraps the HTTP body stream, the SDKs' too); an
async attempt is also cut at the second by ``asyncio.timeout``, a blocking one on the next bytes or
within ``llm.timeout`` of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import httpx2

from pikeclient.core.errors import ConfigError, LLMTimeoutError, ProtocolError

SECONDS_PER_TOKEN = 0.25  # the slowest answer a default total allows: 4 tokens a second after the first byte
MIN_BODY_BYTES = 1 << 20
BYTES_PER_TOKEN = 8 << 10  # a streamed token carries ~200-500 bytes of JSON (Azure's filter results the most)


@dataclass(frozen=True)
class Bounds:
    """One attempt's limits: ``seconds`` from ``start`` (perf_counter), ``max_bytes`` of body received."""

    seconds: float
    max_bytes: int
    setting: str  # how ``seconds`` was chosen, for the error's message
    start: float = field(default_factory=time.perf_counter)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def check(self, received: int) -> None:
        """Raise once the attempt is past its total or its body past its size."""
        if time.perf_counter() > self.deadline:
            raise self.timeout_error()
        if received > self.max_bytes:
            raise ProtocolError(f"the server sent more than {self.max_bytes} bytes, more than max_tokens allows: "
                                "an answer that does not end (or not an answer to this request)")

    def timeout_error(self) -> LLMTimeoutError:
        return LLMTimeoutError(f"no complete answer within {self.setting}; the server was still sending or silent")


def check_timeouts(timeout: float, total_timeout: float | None) -> None:
    """``llm.timeout`` and ``llm.total_timeout``: finite seconds > 0 (NaN and inf are no timeouts)."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"llm.timeout={timeout} must be > 0 seconds (a finite number)")
    if total_timeout is not None and not (math.isfinite(total_timeout) and total_timeout > 0):
        raise ConfigError(f"llm.total_timeout={total_timeout} must be > 0 seconds (a finite number), or null: "
                          f"llm.timeout + {SECONDS_PER_TOKEN:g} s x max_tokens")


def attempt_bounds(total_timeout: float | None, timeout: float, max_tokens: int) -> Bounds:
    """The bounds of an attempt starting now, asking for ``max_tokens``."""
    max_bytes = MIN_BODY_BYTES + BYTES_PER_TOKEN * max_tokens
    if total_timeout is not None:
        return Bounds(total_timeout, max_bytes, f"llm.total_timeout={total_timeout:g} s")
    seconds = timeout + SECONDS_PER_TOKEN * max_tokens
    return Bounds(seconds, max_bytes, f"llm.total_timeout={seconds:g} s (null: llm.timeout={timeout:g} + "
                                      f"{SECONDS_PER_TOKEN:g} s x max_tokens={max_tokens})")


_BOUNDS: ContextVar[Bounds | None] = ContextVar("pikeclient_bounds", default=None)


@contextlib.contextmanager
def bounded(bounds: Bounds | None) -> Iterator[None]:
    """Within it, every HTTP response this task (or thread) receives is held to ``bounds``."""
    token = _BOUNDS.set(bounds)
    try:
        yield
    finally:
        _BOUNDS.reset(token)


@contextlib.asynccontextmanager
async def abounded(bounds: Bounds | None) -> AsyncIterator[None]:
    """:func:`bounded`, and the attempt is cancelled at its deadline even while the server is silent."""
    if bounds is None:
        yield
        return
    with bounded(bounds):
        cutoff = asyncio.timeout_at(asyncio.get_running_loop().time() + bounds.deadline - time.perf_counter())
        try:
            async with cutoff:
                yield
        except TimeoutError as error:
            if not cutoff.expired():
                raise
            raise bounds.timeout_error() from error


class _BoundedStream(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, bounds: Bounds) -> None:
        self._stream, self._bounds, self._received = stream, bounds, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._received += len(chunk)
            self._bounds.check(self._received)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class _ABoundedStream(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, bounds: Bounds) -> None:
        self._stream, self._bounds, self._received = stream, bounds, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            self._received += len(chunk)
            self._bounds.check(self._received)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def on_response(response: httpx2.Response) -> None:
    """Response hook: hold the body to the attempt's bounds (before the client reads any of it)."""
    bounds = _BOUNDS.get()
    if bounds is not None:
        response.stream = _BoundedStream(response.stream, bounds)  # type: ignore[arg-type]


async def aon_response(response: httpx2.Response) -> None:
    bounds = _BOUNDS.get()
    if bounds is not None:
        response.stream = _ABoundedStream(response.stream, bounds)  # type: ignore[arg-type]
