"""The calls another framework makes through a pikeclient client, recorded as ``run.py`` records its own.

A framework (PIKE-RAG) decides when to call and from which threads; this module only records: one
record per call in the runner's format (``pikeclient.run.runner.record_answer``/``record_error``), the
run's statistics (``RunStats``), and, when tracking is on, the MLflow run through the same tracking
process as ``run.py`` (``TrackingSidecar``: metrics, per-call series, one trace per call, records).
Answers served from the framework's own cache are records marked ``cached``: counted as cache hits,
never measured. The run starts with the first call and ends when the recorder is closed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pikeclient.core.errors import PikeError
from pikeclient.core.types import ChatResult, Message, Usage
from pikeclient.run.cost import Price
from pikeclient.run.dataset import PromptItem
from pikeclient.run.experiment import failure_verdict
from pikeclient.run.redact import Redactor
from pikeclient.run.runner import record_answer
from pikeclient.run.stats import RunStats
from pikeclient.tracking.sidecar import TrackingSidecar

log = logging.getLogger(__name__)


class CallRecorder:
    """Records calls from any thread: ``start`` a record, then ``add`` it once finished; ``close`` ends the run.

    ``tracking`` is a started ``TrackingSidecar`` (its store and experiment ready), or None: the
    statistics are then kept in memory only (``stats``). With tracking, records also go to
    ``output_dir/records.jsonl``, logged to the run as an artifact at the end.
    """

    def __init__(self, *, price: Price | None = None, max_error_rate: float = 0.5,
                 tracking: TrackingSidecar | None = None, output_dir: Path | None = None,
                 records_file: str = "records.jsonl", log_records: bool = True,
                 redactor: Redactor | None = None) -> None:
        self.stats = RunStats(price=price)
        self.max_error_rate = max_error_rate
        self.tracking = tracking
        self.output_dir = output_dir
        self.records_path = output_dir / records_file if output_dir is not None else None
        self.log_records = log_records
        self.redactor = redactor or Redactor(())
        self.status: str | None = None  # how the run ended, once closed
        self._lock = threading.Lock()
        self._next_index = 0
        self._sink: IO[str] | None = None
        self._last_end = 0.0
        self._run_id: str | None = None  # kept once the tracking process is gone

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, once the first record made it (None without tracking)."""
        return self.tracking.run_id if self.tracking is not None else self._run_id

    def start(self, messages: Sequence[Message], **fields: Any) -> dict[str, Any]:
        """A new call's record, stamped now: ``index`` (calls in order of start), ``id`` (the same for
        the same messages), ``prompt`` (the last user message) and any extra ``fields``."""
        item = prompt_item(messages)
        with self._lock:
            index = self._next_index
            self._next_index += 1
        return {"index": index, "id": item.id, "prompt": item.prompt, "start_time": time.time(), **fields}

    def cache_hit(self, messages: Sequence[Message], text: str, **fields: Any) -> None:
        """An answer the framework served from its own cache: recorded, counted, never measured."""
        record = self.start(messages, **fields)
        self.add(record_answer(record, ChatResult(text=text, finish_reason=None, usage=Usage(), latency_s=0.0,
                                                  attempts=0, cached=True)), messages)

    def add(self, record: dict[str, Any], messages: Sequence[Message]) -> None:
        """A finished call (``record`` completed by ``record_answer`` or ``record_error``)."""
        if record["error"] is not None:  # a server may echo a key in its error body
            record["error"] = self.redactor.text(record["error"])
        with self._lock:
            if self.status is not None:
                log.warning("a call finished after its client was closed: not recorded")
                return
            first = self.stats.calls == 0
            if first:
                self.stats.start_time = record["start_time"]
            self.stats.add(record)
            self._last_end = max(self._last_end, record.get("end_time") or record["start_time"])
            if self.tracking is None:
                return
            self._write(record)
            try:
                if first:
                    self.tracking.begin(record["start_time"])
                self.tracking.add(record, prompt_item(messages))
            except PikeError as error:  # the tracking process died: its run is FAILED, the calls go on
                log.error("MLflow tracking stopped (%s); the calls go on without it", error)
                lost, self.tracking = self.tracking, None
                self._run_id = lost.run_id
                lost.end("FAILED")

    def close(self, status: str | None = None) -> str:
        """End the run: FINISHED, or FAILED when too many calls failed; ``status`` (KILLED, FAILED)
        overrides. The summary metrics are logged either way. Safe to call twice."""
        with self._lock:
            if self.status is not None:
                return self.status
            stats = self.stats
            stats.end_time = self._last_end or time.time()
            stats.wall_s = max(0.0, stats.end_time - stats.start_time) if stats.calls else 0.0
            verdict = failure_verdict(stats, self.max_error_rate)
            self.status = status or ("FAILED" if verdict else "FINISHED")
            if stats.error_count:
                log.error("%d of %d calls failed after retries (%s)%s", stats.error_count,
                          stats.calls - stats.cache_hits, ", ".join(f"{k}={v}" for k, v in stats.errors.items()),
                          f": {verdict}" if verdict else "")
            tracking, self.tracking = self.tracking, None
            if tracking is not None:
                self._finish(tracking)
            return self.status

    def _finish(self, tracking: TrackingSidecar) -> None:
        assert self.records_path is not None and self.output_dir is not None
        self._write(None)  # the file exists even when no call was made
        if self._sink is not None:
            self._sink.close()
        try:
            tracking.finish(self.stats.metrics(), self.stats.tags(), self.stats.end_time, self.records_path,
                            self.output_dir, log_records=self.log_records, status=self.status or "FINISHED")
        except PikeError as error:
            log.error("could not end the MLflow run %s: %s", tracking.run_id, error)
            tracking.end("FAILED")
        self._run_id = tracking.run_id

    def _write(self, record: dict[str, Any] | None) -> None:
        if self._sink is None:
            assert self.records_path is not None
            self.records_path.parent.mkdir(parents=True, exist_ok=True)
            self._sink = self.records_path.open("a", encoding="utf-8", buffering=1)  # a line each: a kill loses none
        if record is not None:
            self._sink.write(json.dumps(record, ensure_ascii=False) + "\n")


def prompt_item(messages: Sequence[Message]) -> PromptItem:
    """The messages as the runner's prompt item; its id is a short hash of them (same prompt, same id)."""
    data = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False)
    return PromptItem(id=hashlib.sha256(data.encode()).hexdigest()[:12], messages=tuple(messages))


def exit_status() -> str | None:
    """How the interpreter is ending, read at exit: KILLED after Ctrl-C, FAILED after an uncaught
    exception, None when the program ended normally (the interpreter keeps the uncaught exception)."""
    error = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if error is None:
        return None
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"

