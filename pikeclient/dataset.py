"""Prompt sets: JSONL files with one ``{"id", "prompt"}`` or ``{"id", "messages"}`` object a line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pikeclient.errors import ConfigError
from pikeclient.types import Message, user_message

PACKAGE_SCHEME = "pkg://"


@dataclass(frozen=True)
class PromptItem:
    id: str
    messages: tuple[Message, ...]

    @property
    def prompt(self) -> str:
        """The last user message: what a person reads as "the prompt" in records."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def resolve_path(path: str) -> Path:
    """A file path, or ``pkg://package/file`` for data shipped inside a package (like Hydra's pkg://)."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path).expanduser()
    package, _, name = path.removeprefix(PACKAGE_SCHEME).partition("/")
    return Path(str(resources.files(package).joinpath(name)))


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
    if "messages" in data:
        return PromptItem(item_id, _check_messages(data["messages"], where))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: needs a 'prompt' string or a 'messages' list")
    if not prompt.strip():
        raise ConfigError(f"{where}: empty prompt")
    return PromptItem(item_id, tuple(user_message(prompt)))


def _check_messages(messages: object, where: str) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ConfigError(f"{where}: each message needs a 'role' and a 'content' string")
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise ConfigError(f"{where}: unknown role {message['role']!r}")
    if not any(m["content"].strip() for m in messages):
        raise ConfigError(f"{where}: empty prompt")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)
