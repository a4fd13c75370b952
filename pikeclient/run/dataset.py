"""Prompt sets: JSONL files with one ``{"id", "prompt"}`` or ``{"id", "messages"}`` object a line, each with an
optional ``expectations`` object (what a good answer looks like: :mod:`pikeclient.eval.expectations`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, overload

from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, user_message
from pikeclient.eval.expectations import Expectations

PACKAGE_SCHEME = "pkg://"


@dataclass(frozen=True)
class PromptItem:
    id: str
    messages: tuple[Message, ...]
    repeat: int = 0  # which pass over the dataset (experiment.repeats)
    max_tokens: int | None = None  # the output length this prompt asks for (synthetic prompts)
    expectations: Expectations | None = None  # what a good answer looks like (None: nothing said)

    @property
    def prompt(self) -> str:
        """The last user message: what a person reads as "the prompt" in records."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else self.messages[-1]["content"]

    def sampling_overrides(self) -> dict[str, Any]:
        """What this prompt asks of sampling beyond the run's settings: an exact output length
        (``max_tokens``, and ``min_tokens`` where the backend enforces it) for synthetic prompts."""
        return {"max_tokens": self.max_tokens, "min_tokens": self.max_tokens} if self.max_tokens else {}


class Repeated(Sequence[PromptItem]):
    """A dataset ``repeats`` times over, each pass numbered (records carry ``repeat``), made on demand:
    a million repeats of ten prompts cost nothing until a limit lets them be sent."""

    def __init__(self, items: Sequence[PromptItem], repeats: int) -> None:
        self.items = items
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    @overload
    def __getitem__(self, index: int) -> PromptItem: ...

    @overload
    def __getitem__(self, index: slice) -> list[PromptItem]: ...

    def __getitem__(self, index: int | slice) -> PromptItem | list[PromptItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        repeat, position = divmod(index, len(self.items))
        item = self.items[position]
        return replace(item, repeat=repeat) if repeat else item

    def __iter__(self) -> Iterator[PromptItem]:
        for repeat in range(self.repeats):
            for item in self.items:
                yield replace(item, repeat=repeat) if repeat else item


def resolve_path(path: str) -> Path:
    """A file path, or ``pkg://package/file`` for data shipped inside a package (like Hydra's pkg://)."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path).expanduser()
    package, _, name = path.removeprefix(PACKAGE_SCHEME).partition("/")
    try:
        return Path(str(resources.files(package).joinpath(name)))
    except (ModuleNotFoundError, TypeError, ValueError):
        raise ConfigError(f"dataset.path={path!r}: no installed package {package!r}") from None


def load_prompts(path: str, limit: int | None = None) -> list[PromptItem]:
    """Read and check every line first, so a bad file fails before any call is made."""
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"dataset.path: no such file: {file}")
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(file.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        item = _parse_line(raw, f"{file}:{lineno}", default_id=str(lineno))
        if item.id in seen:
            raise ConfigError(f"{file}:{lineno}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = lineno
        items.append(item)
    if not items:
        raise ConfigError(f"dataset.path: {file} holds no prompts")
    return items[:limit] if limit else items


def _parse_line(raw: bytes, where: str, default_id: str) -> PromptItem:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not UTF-8 (byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    item_id = str(data.get("id", default_id))
    _check_text(item_id, where)
    expectations = Expectations.parse(data["expectations"], where) if "expectations" in data else None
    if "messages" in data:
        return PromptItem(item_id, _check_messages(data["messages"], where), expectations=expectations)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: needs a 'prompt' string or a 'messages' list")
    _check_text(prompt, where)
    if is_blank(prompt):
        raise ConfigError(f"{where}: empty prompt")
    return PromptItem(item_id, tuple(user_message(prompt)), expectations=expectations)


def is_blank(text: str) -> bool:
    """No visible character: whitespace, zero-width spaces and other format characters only."""
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate ("\ud800") decodes from JSON but cannot be sent
        raise ConfigError(f"{where}: invalid Unicode (a lone surrogate at character {error.start})") from None


def _check_messages(messages: object, where: str) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ConfigError(f"{where}: each message needs a 'role' and a 'content' string")
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise ConfigError(f"{where}: unknown role {message['role']!r}")
        _check_text(message["content"], where)
    if all(is_blank(m["content"]) for m in messages):
        raise ConfigError(f"{where}: empty prompt")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)
