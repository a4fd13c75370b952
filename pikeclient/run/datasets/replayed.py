"""An earlier run's ``records.jsonl`` as a trace (``load=replay load.trace=.../records.jsonl``): its requests,
sent again at the times they were sent then.

The requests are rebuilt exactly from the earlier run's own dataset (its ``run.json`` beside the records
names it), each checked against the digest its record carries; a turn of a multi-turn session is sent with
the history it had (its session's earlier turns and their recorded answers). Without ``run.json`` the
records' prompts are all there is: each is sent as one user message, and a warning says so.

Times: each request's send time after the first of its process; the parts of a resumed run follow each
other without the pause between them. Answers read from the response cache were never sent: left out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, SamplingParams, user_message
from pikeclient.run.dataset import PromptItem, Repeated, resolve_path
from pikeclient.run.datasets.files import json_lines, open_file
from pikeclient.run.datasets.traces import _Trace
from pikeclient.tracking.job_file import read_job_file

log = logging.getLogger(__name__)


@dataclass
class RecordsTrace(_Trace):
    kind = "records"

    @classmethod
    def recognizes(cls, first: dict[str, Any]) -> bool:
        return "request_digest" in first or {"index", "start_time", "prompt"} <= set(first)

    def read(self, client: BaseLLMClient | None = None) -> list[PromptItem]:
        path = open_file(resolve_path(str(self.path), "load.trace"), "load.trace")
        records = [r for where, r in json_lines(path) if _sent(r, where)]
        if not records:
            raise ConfigError(f"load.trace: {path} holds no request that was sent")
        earlier = _earlier_prompts(path.parent, client)
        times = _send_times(records)
        items, history = [], {}
        for record, at in sorted(zip(records, times, strict=True), key=lambda pair: pair[1]):
            item = _item(record, earlier, path)
            key = (record.get("session_id"), record.get("repeat", 0))
            if record.get("session_id") is not None:  # a turn: sent with its session's history as it was then
                before = history.setdefault(key, [])
                item = replace(item, messages=(*before, *item.messages), session=None, turn=None)
                before[:] = [*item.messages, {"role": "assistant", "content": record.get("response") or ""}]
            items.append(replace(item, at=at, repeat=0))
        return items


def _sent(record: Any, where: str) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("index"), int) or "start_time" not in record:
        raise ConfigError(f"{where}: not a pikeclient record (index, start_time)")
    return not record.get("cached")


def _send_times(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each record's send time after its process's first, the processes placed back to back."""
    spans: dict[Any, list[float]] = {}
    for record in records:
        span = spans.setdefault(record.get("session", 0), [record["start_time"], record["start_time"]])
        span[0], span[1] = min(span[0], record["start_time"]), max(span[1], record["start_time"])
    offset, starts = 0.0, {}
    for process, (first, last) in sorted(spans.items(), key=lambda pair: pair[1][0]):
        starts[process] = offset - first
        offset += last - first
    return [record["start_time"] + starts[record.get("session", 0)] for record in records]


def _earlier_prompts(job_dir: Path, client: BaseLLMClient | None) -> tuple[Sequence[PromptItem], SamplingParams] | None:
    """The earlier run's prompts (its dataset, repeated as it ran) and sampling; None without its run.json."""
    job = read_job_file(job_dir) or {}
    config = job.get("config")
    if not isinstance(config, Mapping):
        log.warning("load.trace: no run.json beside %s: each record's prompt is sent as one user message (system "
                    "messages and a turn's history are not in records)", job_dir)
        return None
    from pikeclient.run.datasets import build_dataset
    from pikeclient.run.shapes.replay import Replay

    load = config.get("load") or {}
    if load.get("kind") == "replay":  # the earlier run replayed a trace: its prompts are the trace's
        settings = {k: load.get(k) for k in Replay.SETTINGS}
        reader = Replay.build(**{k: v for k, v in settings.items() if v is not None}).prompts()
    else:
        reader = build_dataset(config.get("dataset") or {})
    items = reader.read(client)
    repeats = int((config.get("experiment") or {}).get("repeats") or 1)
    return Repeated(items, repeats), SamplingParams.from_mapping(config.get("sampling") or {})


def _item(record: Mapping[str, Any], earlier: tuple[Sequence[PromptItem], SamplingParams] | None,
          path: Path) -> PromptItem:
    if earlier is None:
        messages: tuple[Message, ...] = tuple(user_message(str(record.get("prompt") or "")))
        return PromptItem(str(record.get("id")), messages, max_tokens=record.get("requested_output_tokens"))
    from pikeclient.run.resume import item_digest

    prompts, base = earlier
    index = record["index"]
    if not 0 <= index < len(prompts) or prompts[index].id != record.get("id"):
        raise ConfigError(f"load.trace: {path} holds prompt {record.get('id')!r} at {index}, which the run's dataset "
                          "no longer has there")
    item = prompts[index]
    digest = record.get("request_digest")
    if digest is not None and digest != item_digest(item, base):
        raise ConfigError(f"load.trace: prompt {item.id!r} (index {index}) changed since {path} was recorded (its "
                          "messages or sampling differ)")
    return item
