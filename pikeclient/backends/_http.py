"""Shared by the backends that speak HTTP (SDK or direct): their HTTP clients, when a request really
went out (the wire clock), the bounds of an attempt (``_bounds``), and HTTP failures to pikeclient errors."""

from __future__ import annotations

import asyncio
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
# 30-40 ms of a measured TTFT here. The HTTP transport reports when it starts connecting and when it
# starts writing a request (httpcore's ``trace`` extension; over aiohttp, see AioHTTPTransport); an
# attempt's latency and TTFT start as its request's first bytes are written. A new connection's set-up
# (TCP, TLS, and the event loop's turns in between: at 64 connections opened together, 35 ms each here,
# measured against a packet capture) is recorded apart (``connect_s``), as the client's time before it
# (``send_delay_s``) is.

_CLOCK: ContextVar[WireClock | None] = ContextVar("pikeclient_wire_clock", default=None)
_CONNECTING = frozenset({"connection.connect_tcp.started", "connection.connect_unix_socket.started"})
_WRITING = frozenset({"http11.send_request_headers.started", "http2.send_request_headers.started"})


class WireClock:
    """When an attempt's transport began a new connection (if it made one) and began writing the request
    (``perf_counter`` seconds; None until it did)."""

    __slots__ = ("connecting", "sent")

    def __init__(self) -> None:
        self.connecting: float | None = None
        self.sent: float | None = None

    def connect(self) -> None:
        if self.connecting is None and self.sent is None:
            self.connecting = time.perf_counter()

    def write(self) -> None:
        if self.sent is None:
            self.sent = time.perf_counter()

    def send_delay(self, start: float) -> float | None:
        """The client's time from ``start`` until the transport began connecting or writing (None: it did neither)."""
        began = self.connecting if self.connecting is not None else self.sent
        return None if began is None else max(0.0, began - start)

    @property
    def connect_s(self) -> float | None:
        """A new connection's set-up, until the request's first bytes were written (None: a kept connection)."""
        if self.connecting is None or self.sent is None:
            return None
        return max(0.0, self.sent - self.connecting)


@contextlib.contextmanager
def wire_clock() -> Iterator[WireClock]:
    """Within it, the first request sent from this task (or thread) stamps the clock it yields."""
    clock = WireClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


def _on_request(request: httpx2.Request) -> None:
    _tag(request)
    clock = _CLOCK.get()
    if clock is None or clock.sent is not None:
        return

    def trace(event: str, info: dict[str, Any]) -> None:
        if event in _CONNECTING:
            clock.connect()
        elif event in _WRITING:
            clock.write()
            request.extensions.pop("trace", None)  # the send is all it needs: spare the transport the rest

    request.extensions["trace"] = trace


async def _aon_request(request: httpx2.Request) -> None:
    _tag(request)
    clock = _CLOCK.get()
    if clock is None or clock.sent is not None:
        return

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in _CONNECTING:
            clock.connect()
        elif event in _WRITING:
            clock.write()
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

    @property
    def made(self) -> S | A:
        """A client made already (for what both share, such as the base URL), else the sync one: making a
        client costs ~20 ms (its TLS context), which an async run's first calls would wait for."""
        return self._async if self._async is not None else self.sync

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


# -- aiohttp under an httpx2 client ------------------------------------------------------------------
# The SDK's default transport (httpx2 over httpcore) spends ~0.5 ms of CPU per request on its connection
# pool and HTTP/1.1 machinery, as much as the rest of a call. aiohttp does the same work in C; under
# the SDK's own httpx2 client (base URL, headers, auth, event hooks, error classes unchanged) it halves
# a call's CPU against a fast server. openai ships such a transport (``DefaultAioHttpClient``), but it
# reads no wire clock and reports a server that drops the connection as a connect *timeout*; this one
# stamps the wire clock as a new connection begins or the request's bytes are written, and maps each
# failure to the httpx2 error a httpcore transport raises for it.

try:
    import aiohttp  # the openai SDK imports it too (its own aiohttp transport), where installed
except ImportError:  # pragma: no cover - mlflow depends on aiohttp; without it requests go through httpcore
    aiohttp = None  # type: ignore[assignment]


async def _connecting(*_: Any) -> None:
    clock = _CLOCK.get()
    if clock is not None:
        clock.connect()  # a new connection begins (as httpcore's connect_tcp.started)


async def _writing(*_: Any) -> None:
    clock = _CLOCK.get()
    if clock is not None:
        clock.write()  # the request's bytes are written now


def aiohttp_transport(limits: httpx2.Limits) -> AioHTTPTransport | None:
    """A transport over aiohttp for an httpx2.AsyncClient; None (httpx2's own) where aiohttp is not installed."""
    return AioHTTPTransport(limits) if aiohttp is not None else None


class AioHTTPTransport(httpx2.AsyncBaseTransport):
    """httpx2's async transport interface over an aiohttp session, made on first use in the running loop.

    A session belongs to its event loop: used from another loop (a second ``asyncio.run``), a new one
    is made. Each is closed by ``aclose``, or else when ``asyncio.run`` ends its loop (it closes the
    async generators still open, :func:`_closed_with_the_loop` among them), so no "unclosed session"
    warning follows a script that never closes its client.
    """

    def __init__(self, limits: httpx2.Limits, verify: bool = True) -> None:
        self._limits = limits
        self._ssl = httpx2.create_ssl_context(verify=verify)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard: Any = None

    async def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None:
            if self._loop is loop:
                return self._session
            _abandon(self._session)  # its loop has ended, and its connections with it
        # On a kept connection the clock starts as the first bytes are written (``on_request_chunk_sent`` runs
        # just before the write, in the same task), not when the connection is taken: before Python 3.12
        # aiohttp writes the request in a task of its own, which a busy loop runs milliseconds later (13 ms
        # at 64 streams, measured against a packet capture): that wait is the client's (send_delay_s), not TTFT.
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_start.append(_connecting)
        trace.on_request_chunk_sent.append(_writing)
        connector = aiohttp.TCPConnector(limit=self._limits.max_connections or 0, ssl=self._ssl,
                                         keepalive_timeout=self._limits.keepalive_expiry or 5.0)
        # Proxies and .netrc are httpx2's to read (trust_env): with aiohttp's own, every request would look
        # for a .netrc file in a thread.
        self._session = aiohttp.ClientSession(connector=connector, trace_configs=[trace], trust_env=False)
        self._loop = loop
        self._guard = _closed_with_the_loop(self._session)
        await self._guard.__anext__()
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = await self._open()
        timeout = request.extensions.get("timeout", {})
        try:
            data: Any = request.content or None
        except httpx2.RequestNotRead:
            data = request.stream
        url = request.url
        if url.userinfo:  # httpx2 has made it the Basic header; httpcore, too, sends no user:key@ on the wire
            url = url.copy_with(userinfo=b"")
        try:
            response = await session.request(
                request.method, str(url), headers=request.headers.multi_items(), data=data,
                allow_redirects=False, auto_decompress=False, compress=False,  # httpx2 decodes, as with httpcore
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout.get("pool"),
                                              sock_connect=timeout.get("connect"), sock_read=timeout.get("read")))
        except Exception as error:  # noqa: BLE001 - re-raised as the httpx2 error the SDK translates
            raise _httpx_error(error, request) from error
        return httpx2.Response(response.status, headers=response.raw_headers, stream=_AioHTTPStream(response, request),
                               request=request, extensions={"http_version": b"HTTP/1.1",
                                                            "reason_phrase": (response.reason or "").encode()})

    async def aclose(self) -> None:
        if self._session is None:
            return
        session, guard, self._session, self._guard = self._session, self._guard, None, None
        if self._loop is asyncio.get_running_loop():
            await guard.aclose()  # closes the session
        else:
            _abandon(session)


async def _closed_with_the_loop(session: aiohttp.ClientSession) -> Any:
    try:
        yield
    finally:
        await session.close()


def _abandon(session: aiohttp.ClientSession) -> None:
    """Let go of a session whose event loop has ended (its sockets are gone with it), without warnings."""
    connector = session.connector
    session.detach()
    if connector is not None:
        with contextlib.suppress(Exception):
            connector._close()  # the synchronous part of close(): marks it closed, closes what it still can


class _AioHTTPStream(httpx2.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response, self._request = response, request

    async def __aiter__(self) -> Any:
        try:
            async for chunk in self._response.content.iter_any():  # as it arrives, as httpcore reads it
                yield chunk
        except Exception as error:  # noqa: BLE001 - re-raised as the httpx2 error the SDK translates
            raise _httpx_error(error, self._request) from error

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # the connection goes back to the pool
        else:
            self._response.close()  # an unread rest: the connection cannot serve another request


def _httpx_error(error: Exception, request: httpx2.Request) -> Exception:
    """The httpx2 error a httpcore transport raises for what ``error`` (from aiohttp) says."""
    message = str(error) or type(error).__name__
    if isinstance(error, aiohttp.SocketTimeoutError):  # silence while reading (sock_read)
        return httpx2.ReadTimeout(message, request=request)
    if isinstance(error, TimeoutError):  # connecting, or waiting for a connection
        return httpx2.ConnectTimeout(message, request=request)
    if isinstance(error, aiohttp.ClientConnectorError):  # refused, unreachable, no such host
        return httpx2.ConnectError(message, request=request)
    if isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):  # dropped, or cut short
        return httpx2.RemoteProtocolError(message, request=request)
    if isinstance(error, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return httpx2.UnsupportedProtocol(message, request=request)
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return httpx2.ReadError(message, request=request)
    return error
