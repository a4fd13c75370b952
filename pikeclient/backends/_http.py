"""HTTP failures to pikeclient errors: shared by the backends that speak HTTP (SDK or direct)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import httpx2

from pikeclient.core.errors import LLMConnectionError, LLMError, LLMTimeoutError, ServerError, error_for_status
from pikeclient.core.retry import parse_retry_after

S = TypeVar("S")
A = TypeVar("A")


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
