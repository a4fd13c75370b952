"""pikeclient: one client interface for many LLM backends, with Hydra configs and MLflow tracking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pikeclient.client import BaseLLMClient
from pikeclient.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    ContextWindowError,
    LLMConnectionError,
    LLMError,
    LLMTimeoutError,
    PikeError,
    RateLimitError,
    ServerError,
)
from pikeclient.retry import RetryPolicy
from pikeclient.types import ChatResult, SamplingParams, Usage

if TYPE_CHECKING:
    from pikeclient.factory import create_client

__all__ = [
    "AuthError", "BadRequestError", "BaseLLMClient", "ChatResult", "ConfigError", "ContextWindowError",
    "LLMConnectionError", "LLMError", "LLMTimeoutError", "PikeError", "RateLimitError", "RetryPolicy",
    "SamplingParams", "ServerError", "Usage", "create_client",
]


def __getattr__(name: str) -> Any:
    # Hydra is only needed to build clients from config; import it when that is asked for.
    if name == "create_client":
        from pikeclient.factory import create_client

        return create_client
    raise AttributeError(f"module 'pikeclient' has no attribute {name!r}")
