"""Shared by the backends that speak HTTP (SDK or direct): their HTTP clients, when a request really
went out (the wire clock), the bounds of an attempt (``_bounds``), and HTTP failures to pikeclient errors."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

import httpx2

from pikeclient.backends._bounds import aon_response, on_response
from pikeclient.core.errors import (
    LLMConnectionError,
    LLMError,
    LLMTimeoutError,
    ProtocolError,
    ServerError,
    error_for_status,
)
from pikeclient.core.request_id import HEADER as REQUEST_ID_HEADER
from pikeclient.core.request_id import current_request_id
from pikeclient.core.retry import parse_retry_after

S = TypeVar("S")
A = TypeVar("A")


# -- the wire clock ---------------------------------------------------------------------------------
# Building a request (the SDK's validation, JSON, headers) and waiting for a connection or for the
# event loop are the client's time, not the server's: with 64 calls starting together they were
# 30-40 ms of a measured TTFT here. The HTTP transport reports when it starts connecting or writing a
# request (httpcore's ``trace`` extension); an attempt's latency and TTFT start there.

_SENT: ContextVar[list[float] | None] = ContextVar("pikeclient_sent", default=None)
_SENDING = frozenset({"connection.connect_tcp.started", "connection.connect_unix_socket.started",
                      "http11.send_request_headers.started", "http2.send_request_headers.started"})


@contextlib.contextmanager
def wire_clock() -> Iterator[list[float]]:
    """Within it, the first request sent from this task (or thread) appends when it began to go out."""
    sent: list[float] = []
    token = _SENT.set(sent)
    try:
        yield sent
    finally:
        _SENT.reset(token)


def _on_request(request: httpx2.Request) -> None:
    _tag(request)
    sent = _SENT.get()
    if sent is None:
        return

    def trace(event: str, info: dict[str, Any]) -> None:
        if event in _SENDING:
            sent.append(time.perf_counter())
            request.extensions.pop("trace", None)  # the first is all it needs: spare the transport the rest

    request.extensions["trace"] = trace


async def _aon_request(request: httpx2.Request) -> None:
    _tag(request)
    sent = _SENT.get()
    if sent is None:
        return

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in _SENDING:
            sent.append(time.perf_counter())
            request.extensions.pop("trace", None)

    request.extensions["trace"] = trace


def _tag(request: httpx2.Request) -> None:
    """The call's id on each of its requests (``pikeclient.core.request_id``), unless one is set already."""
    value = current_request_id()
    if value is not None and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = value


# ``event_hooks=`` for an httpx client (the SDKs' included) that reads the wire clock and holds every
# answer to its attempt's bounds.
SYNC_HOOKS = {"request": [_on_request], "response": [on_response]}
ASYNC_HOOKS = {"request": [_aon_request], "response": [aon_response]}


def send_delay(start: float, sent: list[float]) -> float | None:
    """The client's time before the request went out (None: the transport did not say)."""
    return max(0.0, sent[0] - start) if sent else None


class LazyClients(Generic[S, A]):
    """A sync and an async HTTP client, each made on first use and closed on request.

    The async one belongs to the event loop that first used it; ``aclose`` releases it (at the end of
    an ``asyncio.run``), and the next use makes a new one.
    """

    def __init__(self, make_sync: Callable[[], S], make_async: Callable[[], A]) -> None:
        self._make_sync, self._make_async = make_sync, make_async
        self._sync: S | None = None
        self._async: A | None = None

    @property
    def sync(self) -> S:
        if self._sync is None:
            self._sync = self._make_sync()
        return self._sync

    @property
    def aio(self) -> A:
        if self._async is None:
            self._async = self._make_async()
        return self._async

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()  # type: ignore[attr-defined]
            self._sync = None

    async def aclose(self) -> None:
        if self._async is not None:
            client, self._async = self._async, None
            await (getattr(client, "aclose", None) or client.close)()


def transport_error(error: Exception) -> LLMError | None:
    """Timeouts, refused or dropped connections and unreadable bodies; None for anything else."""
    if isinstance(error, httpx2.TimeoutException):
        return LLMTimeoutError(f"timed out: {error}")
    if isinstance(error, httpx2.TransportError):
        return LLMConnectionError(f"connection failed: {error}")
    if isinstance(error, json.JSONDecodeError):
        return ServerError(f"malformed response: {error}")
    return None


def json_body(response: httpx2.Response) -> Any:
    """The JSON of a body read whole; None for an empty one or an error page that is not JSON.

    A 2xx that is not JSON is a :class:`ProtocolError` (an HTML page from a proxy), unless it says it is
    JSON: then it was cut short, a server error like a dropped connection.
    """
    if not response.content:
        return None
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if response.status_code >= 400:
            return None  # the status says what went wrong; status_error falls back to its reason phrase
        content_type = response.headers.get("content-type", "")
        if "json" in content_type:
            raise ServerError(f"malformed response: {error}") from error
        raise ProtocolError(f"the server answered HTTP {response.status_code} with {content_type or 'no content type'}"
                            f", not JSON: {response.text[:120]!r}") from error


def status_error(status: int, headers: Any, body: Any, fallback: str) -> LLMError:
    """The error for a non-2xx answer, with the server's message and requested delay."""
    return error_for_status(status, server_message(body) or fallback, parse_retry_after(dict(headers or {})))


def server_message(body: Any) -> str | None:
    """``{"error": {"message": ...}}`` (OpenAI, Azure), ``{"message": ...}`` or ``{"error": "..."}``."""
    if not isinstance(body, dict):
        return None
    inner = body.get("error", body)
    if isinstance(inner, str):
        return inner
    if isinstance(inner, dict) and inner.get("message"):
        return str(inner["message"])
    return None
