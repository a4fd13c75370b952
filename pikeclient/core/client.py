"""The client interface every backend implements.

A backend implements one attempt of a chat call (``_complete`` and ``_acomplete``) and token counting;
this base class adds sampling defaults, the retry policy, timing and local token counting, the same
way for every backend.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from pikeclient.core.errors import ConfigError, ContextWindowError
from pikeclient.core.ratelimit import RateLimiter
from pikeclient.core.retry import RetryOutcome, RetryPolicy
from pikeclient.core.types import (
    ChatResult,
    Completion,
    Message,
    SamplingParams,
    TokenSource,
    Usage,
    content_text,
    user_message,
)

log = logging.getLogger(__name__)


class BaseLLMClient(abc.ABC):
    """One interface for every LLM backend.

    ``generate``/``agenerate`` take a prompt and return text; ``chat``/``achat`` take OpenAI-style
    messages and return a :class:`ChatResult` with finish reason, usage, latency and attempts.
    Sampling settings given per call override the client's defaults.
    """

    provider: ClassVar[str] = "unknown"
    # True when calls compute on this machine's CPU or GPU: the tracking process then finishes its
    # start-up before the first call instead of competing with the model for the cores.
    computes_locally: ClassVar[bool] = False

    def __init__(
        self,
        *,
        model: str,
        sampling: SamplingParams | Mapping[str, Any] | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        rate_limit: RateLimiter | Mapping[str, Any] | None = None,
        context_window: int | None = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("llm.model is empty: name the model to call")
        self.model = model
        self.sampling = sampling if isinstance(sampling, SamplingParams) else SamplingParams.from_mapping(sampling)
        self.retry = retry if isinstance(retry, RetryPolicy) else RetryPolicy(**dict(retry or {}))
        self.rate_limit = rate_limit if isinstance(rate_limit, RateLimiter) else RateLimiter(**dict(rate_limit or {}))
        self.context_window = context_window
        self._warned_usage = False  # a server's refused usage is said once per client, then only in records

    # -- public API -------------------------------------------------------------------------------

    def generate(self, prompt: str, **sampling: Any) -> str:
        """Complete ``prompt`` (sent as one user message) and return the text."""
        return self.chat(user_message(prompt), **sampling).text

    async def agenerate(self, prompt: str, **sampling: Any) -> str:
        """Async :meth:`generate`."""
        return (await self.achat(user_message(prompt), **sampling)).text

    def chat(self, messages: Sequence[Message], **sampling: Any) -> ChatResult:
        """Send chat ``messages``; retries transient failures under the client's retry policy."""
        messages, params = self._prepare(messages, sampling)
        quota, throttled = self._quota_tokens(messages, params), [0.0]

        def attempt() -> Completion:
            if self.rate_limit.active:
                waited = time.perf_counter()
                self.rate_limit.acquire(quota)
                throttled[0] += time.perf_counter() - waited
            return self._complete(messages, params)

        start = time.perf_counter()
        outcome = self.retry.call(attempt)
        return self._finish(messages, outcome, time.perf_counter() - start, throttled[0])

    async def achat(self, messages: Sequence[Message], **sampling: Any) -> ChatResult:
        """Async :meth:`chat`."""
        messages, params = self._prepare(messages, sampling)
        quota, throttled = self._quota_tokens(messages, params), [0.0]

        async def attempt() -> Completion:
            if self.rate_limit.active:
                waited = time.perf_counter()
                await self.rate_limit.aacquire(quota)
                throttled[0] += time.perf_counter() - waited
            return await self._acomplete(messages, params)

        start = time.perf_counter()
        outcome = await self.retry.acall(attempt)
        elapsed = time.perf_counter() - start
        usage = None
        if not _reported(outcome.value.usage) and self.count_source != "none":
            # Counting a long answer takes milliseconds of CPU; on the event loop it would delay the
            # timestamps of every other call in flight. The tokenizers release the GIL in a thread.
            usage = await asyncio.to_thread(self._usage, messages, outcome.value)
        return self._finish(messages, outcome, elapsed, throttled[0], usage)

    def check_context(self, messages: Sequence[Message], **sampling: Any) -> None:
        """Raise ContextWindowError when prompt plus ``max_tokens`` cannot fit the model's window."""
        if not self.context_window:
            return
        prompt = self.count_message_tokens(list(messages))
        limit = self.sampling.merged(sampling).max_tokens
        if prompt is not None and prompt + limit > self.context_window:
            raise ContextWindowError(f"prompt has {prompt} tokens; with max_tokens={limit} it exceeds the "
                                     f"{self.context_window}-token context window of {self.model}")

    @abc.abstractmethod
    def get_token_count(self, text: str) -> int | None:
        """Tokens in ``text`` for this client's model, or None when no tokenizer is known."""

    def count_message_tokens(self, messages: Sequence[Message]) -> int | None:
        """Prompt tokens of ``messages`` as the model sees them; backends refine the formatting."""
        counts = [self.get_token_count(content_text(m.get("content"))) for m in messages]
        return None if None in counts else sum(counts)

    @property
    def count_source(self) -> TokenSource:
        """What this client's own counts are: ``tokenizer`` (the model's own, exact), ``estimate`` or ``none``."""
        return "tokenizer"

    @property
    def measures_ttft(self) -> bool:
        """Whether calls report time to first token (and so TPOT): a streamed answer, or a local model
        that sees its own tokens come out."""
        return False

    @property
    def default_warmup(self) -> int:
        """Calls made and discarded before measuring when ``experiment.warmup`` is null."""
        return 0

    @property
    def warmup_sampling(self) -> dict[str, Any]:
        """Sampling overrides for warm-up calls (what pays the first calls' costs, at the least expense)."""
        return {}

    def prepare(self) -> None:
        """One-time set-up before measured calls (tokenizer tables are built on first use, ~0.3 s)."""
        self.get_token_count("warm up")

    def describe(self) -> dict[str, Any]:
        """What identifies this client's endpoint in records and tags (never credentials)."""
        return {"provider": self.provider, "model": self.model}

    def close(self) -> None:
        """Release connections and workers. Safe to call twice."""

    async def aclose(self) -> None:
        """Release what is bound to the running event loop (async connections); the client stays usable."""

    def __enter__(self) -> BaseLLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _complete(self, messages: list[Message], params: SamplingParams) -> Completion:
        """One attempt; raise a :class:`pikeclient.core.errors.LLMError` subclass on failure."""

    @abc.abstractmethod
    async def _acomplete(self, messages: list[Message], params: SamplingParams) -> Completion:
        """One attempt, async."""

    # -- shared steps -----------------------------------------------------------------------------

    def _prepare(self, messages: Sequence[Message], overrides: Mapping[str, Any]) -> tuple[list[Message], SamplingParams]:
        if not messages:
            raise ValueError("messages must not be empty")
        return list(messages), self.sampling.merged(overrides)

    def _quota_tokens(self, messages: list[Message], params: SamplingParams) -> int:
        """What a call counts against a tokens-per-minute quota: prompt tokens plus max_tokens."""
        if self.rate_limit.tokens is None:
            return 0
        return (self.count_message_tokens(messages) or 0) + params.max_tokens

    def _finish(self, messages: list[Message], outcome: RetryOutcome[Completion], elapsed: float,
                throttled: float = 0.0, usage: Usage | None = None) -> ChatResult:
        """Latency is the time in attempts from the send: retry waits, rate-limit waits, the client's
        time before the last attempt's request went out and its new connection's set-up are reported apart."""
        completion = outcome.value
        usage = usage or self._usage(messages, completion)
        return ChatResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=usage,
            latency_s=elapsed - outcome.backoff_s - throttled - (completion.send_delay_s or 0.0)
            - (completion.connect_s or 0.0),
            attempts=outcome.attempts,
            backoff_s=outcome.backoff_s,
            throttle_s=throttled,
            ttft_s=completion.ttft_s,
            itl_s=completion.itl_s,
            tpot_s=time_per_output_token(completion.decode_s, usage.completion_tokens),
            send_delay_s=completion.send_delay_s,
            connect_s=completion.connect_s,
            model=completion.model or self.model,
        )

    def _usage(self, messages: list[Message], completion: Completion) -> Usage:
        """The server's usage when complete and sane, otherwise this client's own count, labelled by its
        source; a server's usage that was refused stays named in ``server_error``."""
        usage = completion.usage
        if _reported(usage):
            return usage
        if usage.server_error is not None and not self._warned_usage:
            self._warned_usage = True
            log.warning("%s: the server's %s; such usage is never summed (records: usage.server_error), the "
                        "counts are %s", self.model, usage.server_error,
                        "none" if self.count_source == "none" else f"the client's own ({self.count_source})")
        own = self._own_count(messages, completion)
        return replace(own, server_error=usage.server_error) if usage.server_error else own

    def _own_count(self, messages: list[Message], completion: Completion) -> Usage:
        source = self.count_source
        if source == "none":
            return Usage(source="none")
        prompt = self.count_message_tokens(messages)
        answer = self.get_token_count(completion.text)
        if prompt is None or answer is None:
            return Usage(source="none")
        return Usage(prompt_tokens=prompt, completion_tokens=answer, source=source)


def _reported(usage: Usage) -> bool:
    return usage.source != "none" and usage.total_tokens is not None


def time_per_output_token(decode_s: float | None, completion_tokens: int | None) -> float | None:
    """TPOT: the time after the first output token divided by the tokens after it (as vLLM defines it)."""
    if decode_s is None or completion_tokens is None or completion_tokens < 2:
        return None
    return decode_s / (completion_tokens - 1)
