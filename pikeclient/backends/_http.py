"""HTTP failures to pikeclient errors: shared by the backends that speak HTTP (SDK or direct)."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from pikeclient.errors import LLMConnectionError, LLMError, LLMTimeoutError, ServerError, error_for_status
from pikeclient.retry import parse_retry_after


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
