"""Result and parameter types shared by every backend.

Everything here is a small frozen dataclass: raw SDK objects never leave their backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Message = Mapping[str, Any]
"""An OpenAI-style chat message: ``{"role": "user", "content": "..."}``; ``content`` may also be OpenAI's list
of parts (``[{"type": "text", "text": "..."}]``, as GuideLLM sends it): :func:`content_text` reads either."""

TokenSource = Literal["server", "tokenizer", "estimate", "none"]
TOKEN_SOURCES: tuple[TokenSource, ...] = ("server", "tokenizer", "estimate", "none")

# One call's token count above this is no count: 10x the largest context window on offer (10M tokens).
# A server that says 10**15 would otherwise make a cost of billions.
MAX_CALL_TOKENS = 100_000_000


@dataclass(frozen=True)
class Usage:
    """Token usage of one call and where the numbers came from.

    ``source`` says where the numbers came from: ``"server"`` (the endpoint's usage report),
    ``"tokenizer"`` (counted exactly with the model's own tokenizer), ``"estimate"`` (counted with an
    encoding made for another model: close, not exact) or ``"none"`` (not counted). ``server_error``
    says what the server reported instead of sane counts (negative, absurd, not integers): such a
    report is never used, and the counts are the client's own or none.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    source: TokenSource = "none"
    server_error: str | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "source": self.source, "total_tokens": self.total_tokens, "server_error": self.server_error}

    @classmethod
    def from_server(cls, report: Any) -> Usage:
        """A server's usage report (a mapping, or an object with the OpenAI fields), checked.

        No report, or one without both counts: not reported. Counts that are not non-negative integers
        up to :data:`MAX_CALL_TOKENS` (a string of digits counts as its number, as the openai SDK reads it)
        are refused: no counts, and ``server_error`` quotes what came.
        """
        if report is None:
            return cls()
        if isinstance(report, Mapping):
            prompt, completion = report.get("prompt_tokens"), report.get("completion_tokens")
        elif hasattr(report, "prompt_tokens") or hasattr(report, "completion_tokens"):
            prompt, completion = getattr(report, "prompt_tokens", None), getattr(report, "completion_tokens", None)
        else:
            return cls(server_error=f"usage is not an object: {_quote(report)}")
        if prompt is None or completion is None:
            return cls()
        counts = {"prompt_tokens": _digits(prompt), "completion_tokens": _digits(completion)}
        bad = [f"{name}={_quote(raw)}" for (name, value), raw in zip(counts.items(), (prompt, completion))
               if not is_token_count(value)]
        if bad:
            return cls(server_error=f"usage is not a token count: {', '.join(bad)}")
        return cls(counts["prompt_tokens"], counts["completion_tokens"], "server")


def is_token_count(value: Any) -> bool:
    """A count one call can have: an integer (not a bool, not a float) in [0, MAX_CALL_TOKENS]."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CALL_TOKENS


def _digits(value: Any) -> Any:
    """``"150"`` is read as 150, as the openai SDK reads it before pikeclient sees it; anything else as is."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one successful attempt (before retry and timing are added)."""

    text: str
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    ttft_s: float | None = None
    model: str | None = None
    # Streaming only: mean gap between output chunks after the first, and the time from the first
    # output chunk to the end of the attempt (what TPOT divides by the tokens after the first).
    itl_s: float | None = None
    decode_s: float | None = None
    # HTTP backends: the attempt's client time before its request went out (building it, waiting for
    # a connection or for the event loop), and a new connection's set-up (None: a kept one); TTFT and
    # latency count from the request's first bytes written.
    send_delay_s: float | None = None
    connect_s: float | None = None


@dataclass(frozen=True)
class ChatResult:
    """The outcome of one chat call, retries included.

    ``latency_s`` is the time spent in attempts (retry and rate-limit waits are ``backoff_s`` and
    ``throttle_s``), the last attempt counted from when its request went out: the client's own time
    before that (building the request, waiting for a connection or for the event loop) is
    ``send_delay_s`` (HTTP backends; None where nothing is sent), and a new connection's set-up (TCP,
    TLS) is ``connect_s`` (None when the request went on a kept connection). Streaming calls also carry ``ttft_s``
    (first output text, from the send), ``itl_s`` (mean gap between output chunks after the first) and
    ``tpot_s`` ((time after the first output chunk) / (completion tokens - 1)).
    """

    text: str
    finish_reason: str | None
    usage: Usage
    latency_s: float
    attempts: int = 1
    backoff_s: float = 0.0
    throttle_s: float = 0.0
    ttft_s: float | None = None
    itl_s: float | None = None
    tpot_s: float | None = None
    send_delay_s: float | None = None
    connect_s: float | None = None
    model: str | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        # Built field by field: dataclasses.asdict deep-copies every value (~0.05 ms a call).
        data = {f.name: getattr(self, f.name) for f in _RESULT_FIELDS}
        data["usage"] = self.usage.to_dict()
        return data


_RESULT_FIELDS = fields(ChatResult)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. A client holds defaults; each call may override some of them."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    # At least this many output tokens, where the backend can enforce it (vLLM, llama.cpp, local
    # models): synthetic prompts ask for an exact output length with min_tokens = max_tokens.
    min_tokens: int | None = None

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0, 2.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is out of range: allowed (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is out of range: allowed >= 1")
        if self.min_tokens is not None and not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is out of range: allowed [0, max_tokens]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is out of range: allowed >= 1")
        if self.stop is not None:  # a string, a list or a tuple: always a tuple of non-empty strings
            object.__setattr__(self, "stop", normalize_stop(self.stop))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a config mapping, ignoring keys that are not sampling settings."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    def merged(self, overrides: Mapping[str, Any]) -> SamplingParams:
        """Per-call overrides on top of the client's defaults; unknown names are an error."""
        if not overrides:
            return self
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return replace(self, **overrides)


def normalize_stop(stop: str | Sequence[str]) -> tuple[str, ...] | None:
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    return tuple(s for s in items if s) or None


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: allowed [{low:g}, {high:g}]")


def user_message(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def content_text(content: Any) -> str:
    """A message's text: a string, or OpenAI's list of parts (``[{type: text, text}]``) joined."""
    if isinstance(content, list | tuple):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


def text_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """``messages`` with every content as plain text: what a chat template or a token count reads."""
    return [{**m, "content": content_text(m.get("content"))} if not isinstance(m.get("content"), str) else dict(m)
            for m in messages]
