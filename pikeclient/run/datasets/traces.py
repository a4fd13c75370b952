"""Traces of sizes and times (``load=replay``): prompts are synthesized to the sizes each request had,
measured with the client's own tokenizer as :mod:`pikeclient.run.synthetic` does.

- :class:`MooncakeTrace`: Mooncake's JSONL (``timestamp`` in ms, ``input_length``, ``output_length``,
  ``hash_ids``). Each hash id stands for one block of ``block_size`` tokens, the same text wherever the id
  appears, so requests that share hash ids share that prefix (what a server's prefix cache sees).
  Prompts are built when they are sent, from the blocks: a trace of long prompts is not held whole.
- :class:`TimedTrace`: a CSV or JSONL of a time, input tokens and output tokens per request
  (``time`` or ``time_s`` in seconds, ``timestamp`` or ``timestamp_ms`` in ms; ``input_tokens`` or
  ``input_length``; ``output_tokens`` or ``output_length``; BurstGPT's ``Timestamp``, ``Request tokens``
  and ``Response tokens``). Every prompt is its own (no prefix shared).

Times are kept relative to the trace's first request (in seconds: ``PromptItem.at``); the requests are
sent in the order of their times.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import user_message
from pikeclient.run.dataset import LazyItems, PromptItem, resolve_path
from pikeclient.run.datasets.base import DatasetReader, Unit, require_counts
from pikeclient.run.datasets.files import csv_rows, json_lines, open_file
from pikeclient.run.synthetic import exact_text, text_of, word_costs

log = logging.getLogger(__name__)

SIZED = "load.trace (its prompts are sized with the model's tokenizer)"


class Request(NamedTuple):
    at: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


@dataclass
class _Trace(DatasetReader):
    path: str | None = None

    def source(self) -> str:
        return str(resolve_path(str(self.path), "load.trace"))

    @property
    def name(self) -> str:
        return Path(str(self.path)).stem

    @property
    def needs_client(self) -> bool:
        return True

    @classmethod
    def for_replay(cls, path: str, replay: Any) -> DatasetReader:
        return cls(path=path)

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        return ([item] for item in self.read(client))


def _sorted(requests: list[Request], where: str) -> list[Request]:
    if not requests:
        raise ConfigError(f"load.trace: {where} holds no requests")
    first = min(r.at for r in requests)
    return sorted((r._replace(at=r.at - first) for r in requests), key=lambda r: r.at)


def _count(value: Any, key: str, where: str, low: int = 1) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: {key}={value!r} is not a token count >= {low}")
    return value


def _time(value: Any, key: str, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={value!r} is not a time") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{where}: {key}={value!r} is not a time >= 0")
    return seconds


@dataclass
class MooncakeTrace(_Trace):
    block_size: int = 512
    kind = "mooncake"

    @classmethod
    def recognizes(cls, first: dict[str, Any]) -> bool:
        return "hash_ids" in first

    @classmethod
    def for_replay(cls, path: str, replay: Any) -> DatasetReader:
        return cls(path=path, block_size=replay.block_size)

    def read(self, client: BaseLLMClient | None = None) -> Sequence[PromptItem]:
        counter = require_counts(client, SIZED)
        path = open_file(resolve_path(str(self.path), "load.trace"), "load.trace")
        requests = []
        for where, data in json_lines(path):
            if not isinstance(data, dict) or not isinstance(data.get("hash_ids"), list):
                raise ConfigError(f"{where}: expected a Mooncake request (timestamp, input_length, output_length, "
                                  "hash_ids)")
            ids = tuple(_count(h, "hash_ids[]", where, low=0) for h in data["hash_ids"])
            requests.append(Request(_time(data.get("timestamp"), "timestamp", where) / 1000,
                                    _count(data.get("input_length"), "input_length", where),
                                    _count(data.get("output_length"), "output_length", where), ids))
        return MooncakePrompts(_sorted(requests, str(path)), _Blocks(counter, self.block_size))


class _Blocks:
    """The text of each hash id's block: ``block_size`` words the tokenizer reads as one token each, made
    once per id (seeded by it) and shared by every request that names the id."""

    def __init__(self, client: BaseLLMClient, block_size: int) -> None:
        self.client, self.block_size = client, block_size
        self.costs = word_costs(client)
        self.words: dict[int | str, list[str]] = {}
        # What the chat template adds around a message: the budget of a prompt's text is the rest.
        probe = "hello"
        self.overhead = (client.count_message_tokens(user_message(probe)) or 0) - (client.get_token_count(probe) or 0)

    def block(self, key: int | str) -> list[str]:
        if key not in self.words:
            rng = random.Random(f"mooncake:{key}")
            self.words[key] = exact_text(self.client, self.block_size, rng, self.costs).split(" ")
        return self.words[key]

    def text(self, request: Request, index: int) -> str:
        budget = max(1, request.input_tokens - max(0, self.overhead))
        pieces, position = [], 0
        while budget > 0:  # the named blocks, then blocks of this request's own for any rest
            key = request.hash_ids[position] if position < len(request.hash_ids) else f"{index}/{position}"
            words = self.block(key)[:budget]
            pieces.append(" ".join(words))
            budget -= len(words)
            position += 1
        return " ".join(pieces)


class MooncakePrompts(LazyItems):
    """A Mooncake trace's prompts, each built when it is used: the trace's sizes and the shared blocks are
    all that is held."""

    def __init__(self, requests: list[Request], blocks: _Blocks) -> None:
        self.requests, self.blocks = requests, blocks

    def __len__(self) -> int:
        return len(self.requests)

    def _item(self, index: int) -> PromptItem:
        request = self.requests[index]
        text = self.blocks.text(request, index)
        return PromptItem(f"mooncake-{index}", tuple(user_message(text)), max_tokens=request.output_tokens,
                          at=request.at)


# Column names a timed trace may use, and the seconds one unit of each time column is.
TIME_COLUMNS = {"time": 1.0, "time_s": 1.0, "Timestamp": 1.0, "timestamp": 0.001, "timestamp_ms": 0.001}
INPUT_COLUMNS = ("input_tokens", "input_length", "Request tokens")
OUTPUT_COLUMNS = ("output_tokens", "output_length", "Response tokens")


@dataclass
class TimedTrace(_Trace):
    kind = "trace"

    @classmethod
    def recognizes(cls, first: dict[str, Any]) -> bool:
        return all(any(name in first for name in names) for names in (TIME_COLUMNS, INPUT_COLUMNS, OUTPUT_COLUMNS))

    def read(self, client: BaseLLMClient | None = None) -> list[PromptItem]:
        counter = require_counts(client, SIZED)
        path = open_file(resolve_path(str(self.path), "load.trace"), "load.trace")
        rows = csv_rows(path) if path.suffix.lower() == ".csv" else json_lines(path)
        requests, empty = [], 0
        for where, row in rows:
            if not isinstance(row, dict) or not self.recognizes(row):
                raise ConfigError(f"{where}: expected a time ({', '.join(TIME_COLUMNS)}), input tokens "
                                  f"({', '.join(INPUT_COLUMNS)}) and output tokens ({', '.join(OUTPUT_COLUMNS)})")
            time_key = next(k for k in TIME_COLUMNS if k in row)
            input_key, output_key = (next(k for k in names if k in row) for names in (INPUT_COLUMNS, OUTPUT_COLUMNS))
            output = _count(row[output_key], output_key, where, low=0)
            empty += output == 0
            requests.append(Request(_time(row[time_key], time_key, where) * TIME_COLUMNS[time_key],
                                    _count(row[input_key], input_key, where), max(1, output)))
        if empty:  # BurstGPT logs failed requests with no response tokens
            log.warning("load.trace: %d requests had 0 output tokens; they ask for 1", empty)
        costs = word_costs(counter)
        rng = random.Random(f"trace:{path.name}")
        return [PromptItem(f"trace-{i}", tuple(user_message(text_of(counter, r.input_tokens, rng, f"{i}: ", costs))),
                           max_tokens=r.output_tokens, at=r.at) for i, r in enumerate(_sorted(requests, str(path)))]
