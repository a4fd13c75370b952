"""Readers of recorded chats (a JSONL prompt file, ShareGPT, a Hugging Face dataset): a chat is one request,
or, with ``conversations=true``, a conversation played turn by turn (``load=sessions``).

A conversation's turns are its user messages (with the system messages before them); each turn is sent
with the run's real answers to the earlier turns, never the recorded ones. The recorded answer's length
may be what the turn asks for (``max_tokens``), as ``vllm bench serve`` does for ShareGPT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, content_text
from pikeclient.run.dataset import PromptItem, is_blank, resolve_path
from pikeclient.run.datasets.base import DatasetReader, Unit, require_counts

AnswerTokens = Callable[[Message], "int | None"]


@dataclass
class ChatReader(DatasetReader):
    """``path``: the file (``pkg://package/file`` for one shipped inside a package); ``conversations``: play
    each chat turn by turn (needs ``load=sessions``) instead of sending it whole."""

    conversations: bool = False
    path: str | None = None
    NO_PATH: ClassVar[str] = "name a data file"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError(f"dataset.path is not set: {self.NO_PATH}")

    def source(self) -> str:
        return str(resolve_path(str(self.path)))

    @property
    def name(self) -> str:
        return Path(str(self.path)).stem

    def answer_tokens(self, client: BaseLLMClient | None, wanted: bool, what: str) -> AnswerTokens | None:
        """How many tokens a recorded answer has, as the client counts them (None: the lengths are not used)."""
        if not wanted:
            return None
        counter = require_counts(client, what)
        return lambda answer: counter.get_token_count(content_text(answer.get("content")))


def turns(conversation: str, messages: Sequence[Message], answer_tokens: AnswerTokens | None = None,
          fixed: int | None = None) -> Unit:
    """The turns of a conversation: each user message (with the system and user messages before it since the
    last answer), asking for the recorded answer's length (``answer_tokens``) or ``fixed`` tokens.

    An answer before the first question (a ShareGPT conversation that starts with the model) is dropped."""
    items: Unit = []
    head: list[Message] = []

    def close(answer: Message | None) -> None:
        wanted = fixed
        if wanted is None and answer is not None and answer_tokens is not None:
            wanted = max(1, answer_tokens(answer) or 1)
        items.append(PromptItem(f"{conversation}#{len(items) + 1}", tuple(head), max_tokens=wanted,
                                session=conversation, turn=len(items) + 1))

    for message in messages:
        if message.get("role") != "assistant":
            head.append(message)
        elif _asks(head):
            close(message)
            head = []
    if _asks(head):
        close(None)
    return items


def first_exchange(messages: Sequence[Message]) -> tuple[tuple[Message, ...], Message | None]:
    """The messages up to the first user message, and the answer recorded after it (ShareGPT's single turn)."""
    head: list[Message] = []
    for position, message in enumerate(messages):
        if message.get("role") == "assistant":
            if _asks(head):
                return tuple(head), message
            continue
        head.append(message)
        if message.get("role") == "user":
            following = messages[position + 1] if position + 1 < len(messages) else None
            answer = following if following is not None and following.get("role") == "assistant" else None
            return tuple(head), answer
    return tuple(head), None


def _asks(head: Sequence[Message]) -> bool:
    return any(m.get("role") == "user" and not is_blank(content_text(m.get("content"))) for m in head)
