"""``load=replay``: send a trace's requests at the trace's times (``load.trace``), scaled by ``load.time_scale``.

The trace is also the run's dataset: its requests' sizes (or, for an earlier run's records, its prompts)
decide what is sent. Which format a trace has is read from the file (:data:`TRACES`, first match):

- a Mooncake trace (JSONL: ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``);
- pikeclient's own ``records.jsonl`` (an earlier run's send times and prompts);
- a timed trace, CSV or JSONL: a time, input tokens and output tokens a request (BurstGPT's columns too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem, resolve_path
from pikeclient.run.datasets.base import DatasetReader
from pikeclient.run.datasets.files import csv_rows, json_lines, open_file
from pikeclient.run.datasets.replayed import RecordsTrace
from pikeclient.run.datasets.traces import MooncakeTrace, TimedTrace

TRACES = (MooncakeTrace, RecordsTrace, TimedTrace)  # tried in this order on the trace's first request


@dataclass(frozen=True)
class Replay:
    """Open loop: each request of ``trace`` is due ``time_scale`` x its time in the trace after the start
    (2: half speed; 0.5: twice as fast). ``block_size``: the tokens a Mooncake hash id stands for."""

    trace: str
    time_scale: float = 1.0
    max_in_flight: int = 1024
    block_size: int = 512
    name = "replay"
    open_loop = True
    SETTINGS: ClassVar[tuple[str, ...]] = ("trace", "time_scale", "max_in_flight", "block_size")

    def schedule(self, todo: Iterable[tuple[int, PromptItem]]) -> Iterator[tuple[tuple[int, PromptItem], float]]:
        """Each request at its time in the trace; a resumed run starts at its first unsent request's time."""
        first = None
        for index, item in todo:
            at = item.at or 0.0
            first = at if first is None else first
            yield (index, item), (at - first) * self.time_scale

    def rate_of(self, items: Sequence[PromptItem]) -> float | None:
        """The trace's mean rate as played (requests per second), None for a trace of one instant."""
        times = [item.at or 0.0 for item in items]
        span = (max(times) - min(times)) * self.time_scale if times else 0.0
        return (len(times) - 1) / span if span > 0 else None

    def describe(self) -> str:
        scale = f" x{self.time_scale:g}" if self.time_scale != 1 else ""
        return f"{self.name}({Path(self.trace).name}{scale})"

    def prompts(self) -> DatasetReader:
        """The reader of the trace's format: the run's prompts and their times."""
        path = open_file(resolve_path(self.trace, "load.trace"), "load.trace")
        first = _first_request(path)
        for reader in TRACES:
            if reader.recognizes(first):
                return reader.for_replay(str(path), self)
        raise ConfigError(f"load.trace={self.trace!r}: not a trace pikeclient reads (its first request has "
                          f"{', '.join(sorted(first)) or 'nothing'}); see docs/workloads.md")

    @classmethod
    def build(cls, trace: str | None = None, time_scale: float | None = None, max_in_flight: int | None = None,
              block_size: int | None = None, **_: Any) -> Replay:
        if not trace:
            raise ConfigError("load.trace is not set: load=replay needs a trace file (Mooncake JSONL, a CSV or JSONL "
                              "of times and token counts, or an earlier run's records.jsonl)")
        time_scale = 1.0 if time_scale is None else time_scale
        if not 0 < time_scale < math.inf:
            raise ConfigError(f"load.time_scale={time_scale} is out of range: allowed a finite number > 0 (2: half "
                              "speed)")
        block_size = 512 if block_size is None else block_size
        if block_size < 1:
            raise ConfigError(f"load.block_size={block_size} is out of range: allowed >= 1 (tokens a hash id stands "
                              "for)")
        return cls(trace, time_scale, 1024 if max_in_flight is None else max_in_flight, block_size)


def _first_request(path: Path) -> dict[str, Any]:
    rows = csv_rows(path) if path.suffix.lower() == ".csv" else json_lines(path)
    for where, first in rows:
        if not isinstance(first, dict):
            raise ConfigError(f"{where}: expected a JSON object (a trace's request)")
        return first
    raise ConfigError(f"load.trace: {path} holds no requests")
