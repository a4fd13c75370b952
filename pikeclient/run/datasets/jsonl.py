"""``dataset=prompts`` (and ``qa``): a JSONL file, one object a line, read line by line:

- ``{"id", "prompt"}`` or ``{"id", "messages"}``, each with optional ``expectations`` (what a good answer
  looks like: :mod:`pikeclient.eval.expectations`);
- OpenAI batch-request lines, ``{"custom_id", "method", "url", "body": {"messages": [...]}}`` (the file a
  Batch API job takes): ``custom_id`` is the id; the body's other fields (model, sampling) are the run's own.

Every line is checked before any call; ``conversations=true`` plays each line's messages turn by turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import user_message
from pikeclient.eval.expectations import Expectations
from pikeclient.run.dataset import PromptItem, check_messages, check_text, is_blank, resolve_path
from pikeclient.run.datasets.base import Unit
from pikeclient.run.datasets.chat import ChatReader, turns
from pikeclient.run.datasets.files import json_lines, open_file


@dataclass
class JsonlDataset(ChatReader):
    kind = "jsonl"
    NO_PATH = "name a JSONL prompt file (or use dataset=synthetic)"

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        file = open_file(resolve_path(str(self.path)))
        seen: dict[str, str] = {}
        for lineno, (where, data) in enumerate(json_lines(file), start=1):
            item = parse_line(data, where, default_id=where.rpartition(":")[2] or str(lineno))
            if item.id in seen:
                raise ConfigError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = where.rpartition(":")[2]
            yield turns(item.id, item.messages) if self.conversations else [item]


def parse_line(data: Any, where: str, default_id: str) -> PromptItem:
    """One line's item, checked; ``where`` (file:line) starts every message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    if isinstance(data.get("body"), dict) and "custom_id" in data:  # an OpenAI batch-request line
        data = {"id": data["custom_id"], "messages": data["body"].get("messages")}
    item_id = str(data.get("id", default_id))
    check_text(item_id, where)
    expectations = Expectations.parse(data["expectations"], where) if "expectations" in data else None
    if "messages" in data:
        return PromptItem(item_id, check_messages(data["messages"], where), expectations=expectations)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: needs a 'prompt' string or a 'messages' list")
    check_text(prompt, where)
    if is_blank(prompt):
        raise ConfigError(f"{where}: empty prompt")
    return PromptItem(item_id, tuple(user_message(prompt)), expectations=expectations)
