"""Scoring a run's answers: built once from the ``eval`` config group, fed finished calls, summed up.

``eval.scorers`` run in a worker thread (:class:`ScoringWorker`), never on the event loop that times the
calls (a run hands its answers over after the measured calls: ``pikeclient.run.quality``); ``eval.judges``
(LLM judges) run after the local scores, on the judge's own client, ``eval.concurrency`` at a time. Each
scorer is named by Hydra's ``_target_``:

- a target that is a scorer function (it takes ``inputs``/``outputs``/``expectations``/``trace``) is the
  scorer itself; its other keys are bound as keyword arguments;
- any other target (a class such as MLflow's ``Correctness``, a factory such as ``make_judge``) is called
  with the other keys, and with ``judge`` (the run's :class:`~pikeclient.eval.judge.Judge`) when it takes
  one, and returns the scorer.

Failed calls are not scored (they count in the run's errors, not in its quality).
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pikeclient.core.errors import ConfigError, one_line
from pikeclient.core.types import Message
from pikeclient.eval.expectations import Expectations
from pikeclient.eval.intervals import mean_ci
from pikeclient.eval.judge import Correctness, Guidelines, Judge
from pikeclient.eval.score import CODE, LLM_JUDGE, Score, as_scores, numeric, verdict

log = logging.getLogger(__name__)

Scorer = Callable[..., Any]
SCORER_ARGUMENTS = ("inputs", "outputs", "expectations", "trace")
# MLflow metric names allow these; "/" separates a scorer's name from its statistic.
_NAME = re.compile(r"^[A-Za-z0-9_.\- ]+$")
# The run's own metric groups (docs/metrics.md): a scorer of the same name would mix its figures in.
RESERVED = frozenset(("quality", "judge", "compare", "Latency", "TTFT", "ITL", "TPOT", "Throughput", "SLO", "Errors",
                      "Cost", "calls", "call", "tokens", "client", "run", "sweep", "server", "timeline"))
# What a worker's on_scores hears: a call's scores from the local scorers ("code"), then from the judges.
STAGES = ("code", "judges")


_EXPECTING = (Correctness, Guidelines)  # judges that grade only against a line's expectations


class ScoredPrompt(Protocol):
    """What the evaluator reads of a prompt (``pikeclient.run.dataset.PromptItem`` is one)."""

    messages: Sequence[Message]
    expectations: Expectations | None


class Evaluator:
    """The run's scorers and judges; :meth:`score` and :meth:`judge_scores` score one answered call."""

    def __init__(self, scorers: Mapping[str, Scorer], judges: Mapping[str, Scorer] | None = None, *,
                 judge: Judge | None = None, concurrency: int = 4, resamples: int = 1000,
                 max_pending: int = 4096) -> None:
        self.scorers = {name: _Bound(name, fn, CODE) for name, fn in scorers.items()}
        self.judges = {name: _Bound(name, fn, LLM_JUDGE) for name, fn in (judges or {}).items()}
        for name in [*self.scorers, *self.judges]:
            check_name(name)
        self.judge = judge
        self.concurrency = concurrency
        self.resamples = resamples
        self.max_pending = max_pending

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, retry: Mapping[str, Any] | None = None) -> Evaluator | None:
        """The evaluator ``eval`` describes (a resolved mapping), or None when it scores nothing (``eval=none``)."""
        specs = {group: {k: v for k, v in (cfg.get(group) or {}).items() if v is not None}
                 for group in ("scorers", "judges")}
        if not specs["scorers"] and not specs["judges"]:
            return None
        for key, low in (("concurrency", 1), ("max_pending", 1), ("resamples", 100)):
            if key in cfg and cfg[key] < low:
                raise ConfigError(f"eval.{key}={cfg[key]} is out of range: allowed >= {low}")
        judge = None
        if cfg.get("judge") is not None and specs["judges"]:
            judge = Judge.from_config(cfg["judge"], cfg.get("judge_sampling"), retry)
        built = {group: {name: build_scorer(f"eval.{group}.{name}", spec, judge) for name, spec in found.items()}
                 for group, found in specs.items()}
        return cls(built["scorers"], built["judges"], judge=judge, concurrency=int(cfg.get("concurrency", 4)),
                   resamples=int(cfg.get("resamples", 1000)), max_pending=int(cfg.get("max_pending", 4096)))

    def score(self, record: Mapping[str, Any], prompt: ScoredPrompt) -> dict[str, Score]:
        """The cheap, local scorers on one finished call (``record``: its ``response`` and ``error``)."""
        return self._run(self.scorers.values(), record, prompt)

    def judge_scores(self, record: Mapping[str, Any], prompt: ScoredPrompt) -> dict[str, Score]:
        """The judges on one finished call: LLM calls, made on the judge's own client."""
        return self._run(self.judges.values(), record, prompt)

    @property
    def needs_expectations(self) -> bool:
        """Whether every scorer and judge checks only what a line expects (ours do): on a dataset without
        expectations they would grade nothing."""
        return all(b.reads is not None or isinstance(b.fn, _EXPECTING) for b in [*self.scorers.values(),
                                                                               *self.judges.values()])

    def start(self, *, max_pending: int | None = None,
              on_scores: Callable[[Hashable, dict[str, Score], str], None] | None = None,
              beside_loop: bool = True) -> ScoringWorker:
        """A worker thread that scores calls handed to it with ``submit`` (see :class:`ScoringWorker`)."""
        return ScoringWorker(self, max_pending=max_pending or self.max_pending, on_scores=on_scores,
                             beside_loop=beside_loop)

    def metrics(self, scores: Iterable[Mapping[str, Score | Mapping[str, Any]]], price: Any = None) -> dict[str, float]:
        """Run metrics: :func:`aggregate` of every call's scores, plus the judge's usage (``judge_*``)."""
        out = aggregate(scores, resamples=self.resamples)
        if self.judge is not None:
            out.update(self.judge.usage.metrics(price))
        return out

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()

    def _run(self, bound: Iterable[_Bound], record: Mapping[str, Any], prompt: ScoredPrompt) -> dict[str, Score]:
        if record.get("error") is not None:
            return {}
        expectations = prompt.expectations.mapping if prompt.expectations is not None else {}
        arguments = {"inputs": {"messages": list(prompt.messages)}, "outputs": record.get("response") or "",
                     "expectations": expectations, "trace": None}
        scores: dict[str, Score] = {}
        for scorer in bound:
            scores.update(scorer(arguments))
        return scores


class _Bound:
    """A scorer with the arguments it takes; any exception it raises is an error on its score."""

    def __init__(self, name: str, fn: Scorer, source: str) -> None:
        if not callable(fn):
            raise ConfigError(f"scorer {name!r} is a {type(fn).__name__}, not a callable")
        self.name, self.fn, self.source = name, fn, source
        self.reads = getattr(getattr(fn, "func", fn), "reads", None)  # a partial's function may carry the mark
        parameters = inspect.signature(fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            self.takes = SCORER_ARGUMENTS
        else:
            self.takes = tuple(p.name for p in parameters if p.name in SCORER_ARGUMENTS)

    def __call__(self, arguments: Mapping[str, Any]) -> dict[str, Score]:
        if self.reads is not None and self.reads not in arguments["expectations"]:
            return {}  # the line expects nothing this scorer checks
        try:
            result = self.fn(**{k: arguments[k] for k in self.takes})
            return as_scores(self.name, result, source=self.source, source_id=self.name)
        except Exception as error:  # noqa: BLE001 - a scorer's bug is an error on its score, not a crash
            return {self.name: Score.failed(error, source=self.source, source_id=self.name)}


class ScoringWorker:
    """Scores finished calls in a background thread; judges them after the measured calls.

    ``submit(record, prompt)`` copies what scoring needs (``index``, ``response``, ``error``) and returns
    at once while fewer than ``max_pending`` calls wait (beyond that it blocks: backpressure, which the
    local scorers, microseconds a call, never reach). ``finish()`` waits for the local scores, then runs
    the judges, and returns every call's scores by its record's ``index``. ``on_scores(index, scores,
    stage)``, if given, is called from the worker's threads when a call has passed a stage (``code``, then
    ``judges`` where there are judges), with that stage's scores, also none (to keep them, say, in a
    journal that a resumed run reads). ``beside_loop`` (the default) hands the GIL back to an event loop
    after each call; a worker fed after the measured calls (``pikeclient.run.quality``) needs not.
    """

    def __init__(self, evaluator: Evaluator, *, max_pending: int = 4096,
                 on_scores: Callable[[Hashable, dict[str, Score], str], None] | None = None,
                 beside_loop: bool = True) -> None:
        self.evaluator = evaluator
        self.on_scores = on_scores
        self.beside_loop = beside_loop
        self.results: dict[Hashable, dict[str, Score]] = {}
        self._answered: list[tuple[Hashable, dict[str, Any], ScoredPrompt]] = []  # for the judges, later
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._work, name="pikeclient-scoring", daemon=True)
        self._thread.start()
        self._finished = False

    def submit(self, record: Mapping[str, Any], prompt: ScoredPrompt) -> None:
        if self._finished:
            raise RuntimeError("the scoring worker has finished")
        self._queue.put((record.get("index"), {"response": record.get("response"), "error": record.get("error")},
                         prompt))

    def finish(self, *, judges: bool = True) -> dict[Hashable, dict[str, Score]]:
        """Every submitted call's scores (``{}`` for failed calls), judges included unless ``judges=False``."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)
            self._thread.join()
            if judges and self.evaluator.judges:
                self._judge()
        return self.results

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            key, record, prompt = job
            scores = self.evaluator.score(record, prompt)
            self.results[key] = scores
            if record["error"] is None and self.evaluator.judges:
                self._answered.append(job)
            self._report(key, scores, "code")
            if self.beside_loop:
                time.sleep(0)  # hand the GIL back to the event loop between calls: its timestamps come first

    def _judge(self) -> None:
        def one(job: tuple[Hashable, dict[str, Any], ScoredPrompt]) -> None:
            key, record, prompt = job
            scores = self.evaluator.judge_scores(record, prompt)
            self.results[key].update(scores)  # each key is judged by one thread only
            self._report(key, scores, "judges")

        if not self._answered:
            return
        judge = self.evaluator.judge
        log.info("judging %d answers%s, %d at a time (not measured)", len(self._answered),
                 f" with {judge.model_id}" if judge is not None else "", self.evaluator.concurrency)
        started = time.perf_counter()
        pool = ThreadPoolExecutor(self.evaluator.concurrency, thread_name_prefix="pikeclient-judge")
        try:
            list(pool.map(one, self._answered))
        except BaseException:  # Ctrl-C: no new judge call; those in flight end by their own timeouts
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        log.info("judged %d answers in %.1f s", len(self._answered), time.perf_counter() - started)

    def _report(self, key: Hashable, scores: dict[str, Score], stage: str) -> None:
        if self.on_scores is None:
            return
        try:
            self.on_scores(key, scores, stage)
        except Exception as error:  # noqa: BLE001 - a consumer's failure must not stop the scoring
            log.warning("on_scores failed for call %r: %s", key, one_line(error))


def aggregate(scores: Iterable[Mapping[str, Score | Mapping[str, Any]]], *, resamples: int = 1000,
              seed: int = 0) -> dict[str, float]:
    """Run metrics from every call's scores, named as MLflow names its evaluation metrics.

    Per scorer: ``<name>/mean`` (of numeric values; pass/fail counts 1/0) with its 95% percentile-bootstrap
    interval ``<name>/ci_low`` and ``<name>/ci_high``, ``<name>/count`` (values in the mean) and
    ``<name>/errors`` (scores that could not be computed: left out of the mean). Over calls:
    ``quality/pass_rate`` (calls that passed all their pass/fail scores, among the calls with a verdict;
    with its interval ``quality/pass_rate_ci_low`` and ``_ci_high``),
    ``quality/passed``, ``quality/failed``, ``quality/errors`` (calls whose verdict an error left open).
    """
    values: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    outcomes = {"pass": 0, "fail": 0, "error": 0}
    for call in scores:
        for name, score in call.items():
            record = score if isinstance(score, Mapping) else score.to_dict()
            errors.setdefault(name, 0)
            values.setdefault(name, [])
            if record.get("error") is not None:
                errors[name] += 1
            elif (number := numeric(record.get("value"))) is not None:
                values[name].append(number)
        outcome = verdict(call)
        if outcome is not None:
            outcomes[outcome] += 1
    out: dict[str, float] = {}
    for name in sorted(values):
        found = values[name]
        out[f"{name}/count"] = float(len(found))
        out[f"{name}/errors"] = float(errors[name])
        if found:
            out[f"{name}/mean"] = sum(found) / len(found)
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = mean_ci(found, resamples=resamples, seed=seed)
    graded = outcomes["pass"] + outcomes["fail"]
    if graded or outcomes["error"]:
        out.update({"quality/passed": float(outcomes["pass"]), "quality/failed": float(outcomes["fail"]),
                    "quality/errors": float(outcomes["error"])})
    if graded:
        out["quality/pass_rate"] = outcomes["pass"] / graded
        right = [1.0] * outcomes["pass"] + [0.0] * outcomes["fail"]
        out["quality/pass_rate_ci_low"], out["quality/pass_rate_ci_high"] = mean_ci(right, resamples=resamples,
                                                                                    seed=seed)
    return out


def build_scorer(where: str, spec: Any, judge: Judge | None) -> Scorer:
    """One scorer from its config entry (see the module's docstring)."""
    from hydra.utils import get_object, instantiate

    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"{where}: give a _target_ (a scorer function or class)")
    target = spec["_target_"]
    hydra_log = logging.getLogger("hydra.utils")
    hydra_log.disabled = True  # it logs its own ERROR before raising: the user gets our one line instead
    try:
        obj = get_object(target)
    except Exception as error:  # noqa: BLE001 - Hydra raises ImportError or its own errors
        raise ConfigError(f"{where}._target_={target}: cannot import it ({one_line(error)})") from None
    finally:
        hydra_log.disabled = False
    if not callable(obj):
        raise ConfigError(f"{where}._target_={target}: a {type(obj).__name__}, not a scorer function or class")
    arguments = {k: v for k, v in spec.items() if not k.startswith("_")}
    if (inspect.isfunction(obj) and _is_scorer(obj)) or spec.get("_partial_"):
        return functools.partial(obj, **arguments) if arguments else obj
    if callable(obj) and not inspect.isclass(obj) and not inspect.isfunction(obj) and not arguments:
        return obj  # a scorer object (MLflow's @scorer makes one)
    passed = {}
    if "judge" in _parameters(obj):
        if judge is None:
            raise ConfigError(f"{where} needs a judge: set eval.judge (an llm-like block: _target_, model, ...)")
        passed["judge"] = judge  # an object: passed through by Hydra, not merged into the config
    try:
        built = instantiate({"_target_": target, **arguments}, _convert_="all", **passed)
    except Exception as error:  # noqa: BLE001 - a bad argument is the user's config, said in one line
        raise ConfigError(f"{where}: {one_line(error.__cause__ or error)}") from None
    if not callable(built):
        raise ConfigError(f"{where}: {target} built a {type(built).__name__}, not a scorer")
    return built


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"scorer name {name!r}: use letters, digits, '_', '-', '.' or spaces")
    if name in RESERVED:
        raise ConfigError(f"scorer name {name!r} is one of the run's own metric groups: choose another")


def _is_scorer(fn: Any) -> bool:
    return bool(set(_parameters(fn)) & set(SCORER_ARGUMENTS))


def _parameters(obj: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return ()
