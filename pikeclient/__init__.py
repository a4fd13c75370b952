"""pikeclient: one client interface for many LLM backends, with Hydra configs and MLflow tracking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import (
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
from pikeclient.core.retry import RetryPolicy
from pikeclient.core.types import ChatResult, SamplingParams, Usage

if TYPE_CHECKING:
    from pikeclient.backends.azure_meta_llama import AzureMetaLlamaClient
    from pikeclient.backends.azure_openai import AzureOpenAIClient
    from pikeclient.backends.hf_meta_llama import HFLocalClient
    from pikeclient.backends.openai import OpenAIClient
    from pikeclient.config.factory import compose, create_client

# Imported on first use: the SDKs, Hydra and torch cost seconds, and API users never need torch.
_LAZY = {
    "OpenAIClient": "pikeclient.backends.openai",
    "AzureOpenAIClient": "pikeclient.backends.azure_openai",
    "AzureMetaLlamaClient": "pikeclient.backends.azure_meta_llama",
    "HFLocalClient": "pikeclient.backends.hf_meta_llama",
    "compose": "pikeclient.config.factory",
    "create_client": "pikeclient.config.factory",
}

__all__ = [
    "AuthError", "AzureMetaLlamaClient", "AzureOpenAIClient", "BadRequestError", "BaseLLMClient", "ChatResult",
    "ConfigError", "ContextWindowError", "HFLocalClient", "LLMConnectionError", "LLMError", "LLMTimeoutError",
    "OpenAIClient", "PikeError", "RateLimitError", "RetryPolicy", "SamplingParams", "ServerError", "Usage",
    "compose", "create_client",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pikeclient' has no attribute {name!r}")
