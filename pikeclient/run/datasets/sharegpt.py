"""``dataset=sharegpt``: ShareGPT conversations, a JSON array or JSONL of
``{"id", "conversations": [{"from": "human" | "gpt" | "system", "value"}]}``, streamed.

Single-turn (the default), as ``vllm bench serve`` sends ShareGPT: each conversation's first human turn,
asking for as many tokens as the recorded answer has (counted with the client's tokenizer; or
``output_tokens`` for all). ``conversations=true``: every human turn, played in order with the run's own
answers as history (``load=sessions``); each turn asks for its recorded answer's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message
from pikeclient.run.dataset import PromptItem, check_messages, check_text, resolve_path
from pikeclient.run.datasets.base import Unit
from pikeclient.run.datasets.chat import ChatReader, first_exchange, turns
from pikeclient.run.datasets.files import json_objects, open_file

# ShareGPT's speakers and the chat roles they are; other names seen in the wild map the same way.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ShareGPTDataset(ChatReader):
    """``path``: the file; ``output_tokens``: what every request asks for (null: its recorded answer's length)."""

    output_tokens: int | None = None
    kind = "sharegpt"
    NO_PATH = "name a ShareGPT JSON or JSONL file"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_tokens is not None and self.output_tokens < 1:
            raise ConfigError(f"dataset.output_tokens={self.output_tokens} is out of range: allowed >= 1 (or null)")

    @property
    def needs_client(self) -> bool:
        return True  # the recorded answers are measured with the client's tokenizer

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        file = open_file(resolve_path(str(self.path)))
        lengths = self.answer_tokens(client, self.output_tokens is None, "dataset=sharegpt (the recorded answers' "
                                     "lengths; or give dataset.output_tokens)")
        for position, (where, data) in enumerate(json_objects(file)):
            conversation_id, messages = _conversation(data, where, position)
            if messages is None:
                continue  # no question in it: nothing to send
            if self.conversations:
                yield turns(conversation_id, messages, lengths, self.output_tokens)
                continue
            head, answer = first_exchange(messages)
            wanted = self.output_tokens
            if wanted is None and answer is not None and lengths is not None:
                wanted = max(1, lengths(answer) or 1)
            yield [PromptItem(conversation_id, head, max_tokens=wanted)]


def _conversation(data: Any, where: str, position: int) -> tuple[str, tuple[Message, ...] | None]:
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise ConfigError(f"{where}: expected an object with a 'conversations' list (ShareGPT)")
    conversation_id = str(data.get("id", position))
    check_text(conversation_id, where)
    messages = []
    for turn in data["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConfigError(f"{where}: each turn needs 'from' and a 'value' string")
        role = ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise ConfigError(f"{where}: unknown speaker {turn.get('from')!r} (known: {', '.join(ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return conversation_id, None
    return conversation_id, check_messages(messages, where)
