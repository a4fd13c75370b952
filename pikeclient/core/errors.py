"""pikeclient's error hierarchy.

Only backends translate SDK or HTTP failures into these classes; everything above a backend (retry,
experiment runner, tracking) sees nothing else. ``kind`` is the stable name used in records and metrics.
"""

from __future__ import annotations

from typing import ClassVar


class PikeError(Exception):
    """Base class of every error pikeclient raises on purpose."""


class ConfigError(PikeError):
    """A bad configuration or input file; the message is one line that names the problem."""


class LLMError(PikeError):
    """A failed call to a model backend."""

    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1
        self.backoff_s = 0.0


class RateLimitError(LLMError):
    kind = "rate_limit"


class LLMTimeoutError(LLMError):
    kind = "timeout"


class ServerError(LLMError):
    kind = "server"


class LLMConnectionError(LLMError):
    kind = "connection"


class AuthError(LLMError):
    kind = "auth"


class BadRequestError(LLMError):
    kind = "bad_request"


class ContextWindowError(BadRequestError):
    kind = "context_window"


class ProtocolError(LLMError):
    """The endpoint answered, but not in the chat protocol: HTTP 200 with an HTML page (a proxy's login or
    error page), JSON without ``choices`` or content, a body far larger than ``max_tokens`` allows.

    Retried once (a gateway's blip), not like a server error: an endpoint that answers this way usually
    does so every time, and each retry is one more request it bills or logs.
    """

    kind = "protocol"


class InterruptedStreamError(LLMError):
    """The server ended a stream cleanly but before the answer's end (llama.cpp's interrupt_requests).

    Not retried: such a server cuts streams whenever requests queue, and retries only add to the queue.
    """

    kind = "interrupted"


class ModelError(LLMError):
    """A local model failed deterministically (out of memory, unloadable checkpoint)."""

    kind = "model"


_CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context window", "too many tokens")


def error_for_status(status: int, message: str, retry_after: float | None = None) -> LLMError:
    """Map an HTTP status (and the server's message) to the matching error class."""
    cls: type[LLMError]
    if status == 429:
        cls = RateLimitError
    elif status == 408:
        cls = LLMTimeoutError
    elif status in (401, 403):
        cls = AuthError
    elif status == 409 or status >= 500:
        # 409 is a lock/conflict on the provider's side: transient like a 5xx.
        cls = ServerError
    elif any(marker in message.lower() for marker in _CONTEXT_MARKERS):
        cls = ContextWindowError
    else:
        cls = BadRequestError
    return cls(f"HTTP {status}: {message}", status=status, retry_after=retry_after)


def one_line(error: BaseException) -> str:
    """An error's whole message on one line: the real cause is often below the first line."""
    return " ".join(str(error).split()) or type(error).__name__
