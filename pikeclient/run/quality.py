"""Answer quality in a run: the ``eval`` group wired into the calls, the records and the MLflow run.

The evaluator (``pikeclient.eval``) is built before any call, so a bad scorer or judge fails first.
Each finished call is handed over through the runner's ``on_record`` hook, which only notes it (a
dictionary entry): the answers are scored after the measured calls, the local scorers in the scoring
worker's thread, then the judges (LLM calls on their own client). None of it counts in the run's
latency, tokens, cost or throughput, and none of it runs beside the measured calls: a thread scoring
each answer as it arrived took the GIL from the event loop that times the calls (on a saturated loop,
latency p50 +27% and the measured span +23%, against +5% for answers only noted; ``bench/bench_quality.py``),
while scoring them afterwards costs ~40 us an answer.

Where the scores live, so that a kill loses none and a resumed run scores nothing twice:

- as they are made, each call's scores are appended to ``scores.jsonl`` in the job's folder (a line per
  call and stage, ``code`` then ``judges``, keyed by the call's prompt id, repeat and start time);
- then ``records.jsonl`` is rewritten atomically with every call's ``scores`` (with
  ``slo.require_correct``, also its final ``slo_met``), the new scores go to MLflow as assessments on the
  calls' traces, and the journal is removed.

A resumed run takes the scores an earlier attempt made (from its records, else from the journal) and
scores only answers without them; a judge runs again only on answers it had not judged.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pikeclient.config.schema import SCORES_JOURNAL
from pikeclient.core.errors import ConfigError
from pikeclient.eval.evaluator import Evaluator, aggregate
from pikeclient.eval.score import Score, passed
from pikeclient.run.cost import Price, find_price
from pikeclient.run.dataset import PromptItem
from pikeclient.run.resume import read_records, write_records
from pikeclient.run.settings import RunSettings
from pikeclient.run.stats import RunStats
from pikeclient.tracking.job_file import read_job_file, write_job_file

log = logging.getLogger(__name__)

JOURNAL = SCORES_JOURNAL
CallKey = tuple[str, int, float]  # prompt id, repeat, start time: one call, in every attempt of a run
# What the tracking process attaches to one call's trace: its key, scores and expectations.
Assessment = tuple[str, int, float, dict[str, Any], dict[str, Any] | None]
Hook = Callable[[dict[str, Any], PromptItem], None]


def build_evaluator(settings: RunSettings) -> Evaluator | None:
    """The run's evaluator (None with ``eval=none``); a scorer that cannot be built fails here, before any call."""
    c = settings.config
    return Evaluator.from_config(asdict(c.eval), retry=asdict(c.retry))


def usable_evaluator(settings: RunSettings, evaluator: Evaluator | None,
                     items: Sequence[PromptItem]) -> Evaluator | None:
    """The evaluator if it has something to grade in ``items`` (a dataset without expectations, such as
    synthetic prompts, has nothing for ours: no scoring then); ``slo.require_correct`` needs grades."""
    unchecked = evaluator is not None and evaluator.needs_expectations and not any(i.expectations for i in items)
    if settings.slo.require_correct:
        if evaluator is None:
            raise ConfigError("slo.require_correct=true needs scorers to tell right answers: set eval=basic (or "
                              "eval=judge)")
        if unchecked:
            raise ConfigError("slo.require_correct=true: no line of the dataset says what a right answer is "
                              "(expectations), so no answer could be graded")
    if unchecked:
        log.info("no line of the dataset has expectations: answers are not scored")
        evaluator.close()
        return None
    return evaluator


def call_key(record: Mapping[str, Any]) -> CallKey:
    return str(record["id"]), int(record.get("repeat") or 0), float(record["start_time"])


def chain(*hooks: Hook | None) -> Hook | None:
    """One ``on_record`` hook that calls each of ``hooks`` in turn (None: there are none)."""
    found = [hook for hook in hooks if hook is not None]
    if len(found) <= 1:
        return found[0] if found else None

    def each(record: dict[str, Any], item: PromptItem) -> None:
        for hook in found:
            hook(record, item)

    return each


class RunScoring:
    """One run's scoring: ``submit`` each finished call, ``finish`` after the calls, ``done`` once tracked."""

    def __init__(self, evaluator: Evaluator, prompts: Sequence[PromptItem], job_dir: Path, *,
                 require_correct: bool = False, judge_price: Price | None = None) -> None:
        self.evaluator = evaluator
        self.prompts = prompts
        self.require_correct = require_correct
        self.judge_price = judge_price
        self.journal_path = job_dir / JOURNAL
        self.journaled = read_journal(self.journal_path)  # an earlier attempt's scores not yet in its records
        self.known: dict[int, dict[str, Any]] = {}  # index -> scores an earlier attempt made
        self.unlogged: set[int] = set()  # of those, the ones never sent to MLflow
        self.todo: set[int] = set()  # answers to score after the calls (read back from the records)
        self.keys: dict[Hashable, CallKey] = {}  # index -> key of the calls handed to the worker
        self.lock = threading.Lock()
        self.journal: Any = None
        self.job_dir = job_dir
        if evaluator.judge is not None:  # the judge calls of earlier attempts that finished their scoring
            evaluator.judge.usage.absorb((read_job_file(job_dir) or {}).get("judge_usage") or {})
        self.worker: Any = None
        self.finished = self.closed = False

    @classmethod
    def start(cls, settings: RunSettings, evaluator: Evaluator, prompts: Sequence[PromptItem],
              job_dir: Path) -> RunScoring:
        judge_price = None
        if evaluator.judge is not None:
            judge_price = find_price(asdict(settings.config.pricing), evaluator.judge.client.describe())
        return cls(evaluator, prompts, job_dir, require_correct=settings.slo.require_correct,
                   judge_price=judge_price)

    def submit(self, record: dict[str, Any], item: PromptItem) -> None:
        """The runner's ``on_record`` hook: note an answered call for scoring after the calls, unless an
        earlier attempt scored it already (a dictionary entry: nothing beside the measured calls)."""
        if record["error"] is not None:
            return  # failed calls count in the run's errors, not in its quality
        index = record["index"]
        if record.get("scores") is not None:  # scored, written and logged by an earlier attempt
            self.known[index] = record["scores"]
            return
        key = call_key(record)
        stages = self.journaled.get(key)
        if stages is not None and ("judges" in stages or not self.evaluator.judges):
            self.known[index] = {**stages.get("code", {}), **stages.get("judges", {})}
            self.unlogged.add(index)
            return
        self.todo.add(index)

    def finish(self, records_path: Path, stats: RunStats) -> list[Assessment]:
        """After the calls: score the noted answers, run the judges, write every record's scores (and final
        ``slo_met``) into ``records_path``, put the quality metrics in ``stats``; returns the assessments
        to log."""
        records = read_records(records_path)
        self.journal = self.journal_path.open("a", encoding="utf-8", buffering=1)  # a line each: a kill loses none
        self.worker = self.evaluator.start(on_scores=self._write, beside_loop=False)
        for record in records:
            if record["index"] in self.todo:
                self.keys[record["index"]] = call_key(record)
                self.worker.submit(record, self.prompts[record["index"]])
        results = self.worker.finish()
        self.finished = True
        if self.evaluator.judge is not None:
            write_job_file(self.job_dir, judge_usage=self.evaluator.judge.usage.to_dict())
        scores = {**self.known, **{i: {n: s.to_dict() for n, s in found.items()} for i, found in results.items()}}
        new = self.unlogged | set(results)
        assessments: list[Assessment] = []
        for record in records:
            record["scores"] = scores.get(record["index"], {}) if record["error"] is None else {}
            if self.require_correct and record.get("slo_met") and not passed(record["scores"]):
                record["slo_met"] = False  # fast enough, but wrong
                stats.slo_met -= 1
            if record["index"] in new and not record.get("cached"):
                item = self.prompts[record["index"]]
                expectations = item.expectations.to_json() if item.expectations is not None else None
                assessments.append((*call_key(record), record["scores"], expectations))
        write_records(records_path, records)
        stats.quality = self.evaluator.metrics([r["scores"] for r in records if r["error"] is None],
                                               self.judge_price)
        return assessments

    def done(self) -> None:
        """The scores are in the records and in MLflow: the journal has served."""
        self.close()
        self.journal_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop scoring (interrupted: the scores made so far stay in the journal) and close the judge's client."""
        if self.closed:
            return
        self.closed = True
        if self.worker is not None and not self.finished:
            self.worker.finish(judges=False)
        if self.journal is not None:
            self.journal.close()
        self.evaluator.close()

    def _write(self, index: Hashable, scores: dict[str, Score], stage: str) -> None:
        """One call's scores of one stage, as a journal line (from the worker's threads)."""
        name, repeat, start = self.keys[index]
        line = json.dumps({"id": name, "repeat": repeat, "start_time": start, "stage": stage,
                           "scores": {n: s.to_dict() for n, s in scores.items()}}, ensure_ascii=False)
        with self.lock:
            self.journal.write(line + "\n")


def read_journal(path: Path) -> dict[CallKey, dict[str, dict[str, Any]]]:
    """An earlier attempt's journal: each call's scores by stage (a line cut by a kill is dropped)."""
    found: dict[CallKey, dict[str, dict[str, Any]]] = {}
    for line in read_records(path):
        try:
            key = (str(line["id"]), int(line["repeat"]), float(line["start_time"]))
            found.setdefault(key, {})[str(line["stage"])] = dict(line["scores"])
        except (KeyError, TypeError, ValueError):
            continue
    return found


def earlier_quality(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The quality metrics of a finished run's records (a run resumed when it was already complete)."""
    scored = [r["scores"] for r in records if r.get("error") is None and r.get("scores") is not None]
    return aggregate(scored) if scored else {}
