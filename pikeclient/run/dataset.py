"""What a run sends: :class:`PromptItem` (one request, or one turn of a conversation), a dataset repeated
lazily (:class:`Repeated`), and the checks every reader applies to messages.

The readers themselves (a JSONL prompt file, ShareGPT, Hugging Face datasets, synthetic prompts, traces)
live in :mod:`pikeclient.run.datasets`, one small class each.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, overload

from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, content_text
from pikeclient.eval.expectations import Expectations

PACKAGE_SCHEME = "pkg://"
ROLES = ("system", "user", "assistant", "developer")


@dataclass(frozen=True)
class PromptItem:
    """One request of a dataset. ``session`` and ``turn`` (1-based) place it in a conversation, whose
    earlier turns' real answers are sent before it (``load=sessions``); ``at`` is when a trace sent it
    (seconds from the trace's start, ``load=replay``)."""

    id: str
    messages: tuple[Message, ...]
    repeat: int = 0  # which pass over the dataset (experiment.repeats)
    max_tokens: int | None = None  # the output length this prompt asks for (synthetic prompts, traces, ShareGPT)
    expectations: Expectations | None = None  # what a good answer looks like (None: nothing said)
    session: str | None = None  # the conversation this turn belongs to
    turn: int | None = None
    at: float | None = None

    @property
    def prompt(self) -> str:
        """The last user message: what a person reads as "the prompt" in records."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return content_text(users[-1] if users else self.messages[-1]["content"])

    def sampling_overrides(self) -> dict[str, Any]:
        """What this prompt asks of sampling beyond the run's settings: an exact output length
        (``max_tokens``, and ``min_tokens`` where the backend enforces it) for synthetic prompts."""
        return {"max_tokens": self.max_tokens, "min_tokens": self.max_tokens} if self.max_tokens else {}


class LazyItems(Sequence[PromptItem]):
    """Items made when they are used (``_item``), not held: a subclass gives ``__len__`` and ``_item``."""

    def _item(self, index: int) -> PromptItem:
        raise NotImplementedError

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
        return self._item(index)


class Repeated(LazyItems):
    """A dataset ``repeats`` times over, each pass numbered (records carry ``repeat``), made on demand:
    a million repeats of ten prompts cost nothing until a limit lets them be sent.

    A trace's passes follow each other: pass k is sent k trace lengths (plus one mean gap) later."""

    def __init__(self, items: Sequence[PromptItem], repeats: int) -> None:
        self.items = items
        self.repeats = repeats

    @functools.cached_property
    def period(self) -> float:
        """How long after a pass of a trace the next one starts: the trace's span and one mean gap."""
        times = [item.at or 0.0 for item in self.items]
        span = max(times) - min(times) if times else 0.0
        return span + (span / (len(times) - 1) if len(times) > 1 else 1.0)

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def _item(self, index: int) -> PromptItem:
        repeat, position = divmod(index, len(self.items))
        return self._pass(self.items[position], repeat)

    def __iter__(self) -> Iterator[PromptItem]:
        for repeat in range(self.repeats):
            for item in self.items:
                yield self._pass(item, repeat)

    def _pass(self, item: PromptItem, repeat: int) -> PromptItem:
        if not repeat:
            return item
        at = None if item.at is None else item.at + repeat * self.period
        return replace(item, repeat=repeat, at=at)


def resolve_path(path: str, key: str = "dataset.path") -> Path:
    """A file path, or ``pkg://package/file`` for data shipped inside a package (like Hydra's pkg://)."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path).expanduser()
    package, _, name = path.removeprefix(PACKAGE_SCHEME).partition("/")
    try:
        return Path(str(resources.files(package).joinpath(name)))
    except (ModuleNotFoundError, TypeError, ValueError):
        raise ConfigError(f"{key}={path!r}: no installed package {package!r}") from None


def load_prompts(path: str, limit: int | None = None) -> list[PromptItem]:
    """A JSONL prompt file's prompts, checked (:class:`pikeclient.run.datasets.jsonl.JsonlDataset`)."""
    from pikeclient.run.datasets.jsonl import JsonlDataset

    return JsonlDataset(path=path, limit=limit).read()


def is_blank(text: str) -> bool:
    """No visible character: whitespace, zero-width spaces and other format characters only."""
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate ("\ud800") decodes from JSON but cannot be sent
        raise ConfigError(f"{where}: invalid Unicode (a lone surrogate at character {error.start})") from None


def check_messages(messages: object, where: str) -> tuple[Message, ...]:
    """Chat messages as a dataset gives them, checked: each a role and a content (a string, or OpenAI's list
    of text parts, kept as given so that the request is sent as written)."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or not _is_content(message.get("content")):
            raise ConfigError(f"{where}: each message needs a 'role' and a 'content' string (or a list of text "
                              "parts)")
        if message["role"] not in ROLES:
            raise ConfigError(f"{where}: unknown role {message['role']!r}")
        check_text(content_text(message["content"]), where)
    if all(is_blank(content_text(m["content"])) for m in messages):
        raise ConfigError(f"{where}: empty prompt")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def _is_content(content: object) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and bool(content) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content)
