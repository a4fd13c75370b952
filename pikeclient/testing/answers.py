"""The loopback server's answers: routes, messages, and the deterministic reply with its usage."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pikeclient.core.tokens import TiktokenCounter
from pikeclient.core.types import content_text

COUNTS = ("words", "tiktoken")


def route_of(method: str, path: str) -> str | None:
    if method != "POST":
        return None
    if path.endswith("/v1/chat/completions"):
        return "openai"
    if path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
        return "azure_openai"
    if path.endswith("/chat/completions"):
        return "azure_inference"
    if path.endswith("/score"):
        return "aml_score"
    return None


def messages_of(route: str, payload: dict) -> list[dict]:
    if route == "aml_score":
        return list(payload.get("input_data", {}).get("input_string", []))
    return list(payload.get("messages", []))


def prompt_of(route: str, payload: dict) -> str:
    users = [content_text(m.get("content")) for m in messages_of(route, payload) if m.get("role") == "user"]
    return users[-1] if users else ""


@dataclass(frozen=True)
class Answer:
    """The deterministic answer: "You said: <last user message>", cut at stop strings and max tokens.

    Usage counts ``words`` (one whitespace-separated word a token, so that tests predict usage exactly)
    or ``tiktoken`` (as OpenAI counts a chat: the model's encoding, per-message overhead included; what
    ``python -m pikeclient.testing.server`` reports, so that a stand-in run reports real token counts).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    model: str
    completion_tokens: int

    @classmethod
    def build(cls, route: str, payload: dict, count: str = "words", answers: Mapping[str, str] | None = None) -> Answer:
        """``answers``: canned answers; the first key found in the last user message picks its answer."""
        params = payload.get("input_data", {}).get("parameters", {}) if route == "aml_score" else payload
        limit = params.get("max_completion_tokens") or params.get("max_tokens") or params.get("max_new_tokens") or 256
        prompt = prompt_of(route, payload)
        canned = next((answer for key, answer in (answers or {}).items() if key in prompt), None)
        words = (canned if canned is not None else "You said: " + prompt).split()
        text, reason = " ".join(words[:limit]), "length" if len(words) > limit else "stop"
        if canned is not None and reason == "stop":
            text = canned  # as written: its line breaks too (JSON, lists)
        for stop in _as_list(params.get("stop")):
            if stop and stop in text:
                text, reason = text[: text.index(stop)], "stop"
        model = str(payload.get("model") or "fake-model")
        messages = [{**m, "content": content_text(m.get("content"))} for m in messages_of(route, payload)]
        if count == "tiktoken":
            counter = TiktokenCounter(model)
            return cls(text, reason, counter.count_messages(messages), model, counter.count(text))
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return cls(text, reason, prompt_tokens, model, len(text.split()))

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def completion(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.text}
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
            "usage": self.usage(),
        }

    def stream_chunks(self, include_usage: bool) -> Iterable[dict[str, Any]]:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model}
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        words = self.text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]}
        if include_usage:
            yield {**base, "choices": [], "usage": self.usage()}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
