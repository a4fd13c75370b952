"""Scores and expectations as MLflow assessments on the calls' traces: what MLflow's Quality tab, its
trace view and its evaluation views read.

Each score becomes a ``Feedback`` (source ``CODE`` with the scorer's name, or ``LLM_JUDGE`` with the
judge's model; an error on a score is a Feedback with an ``AssessmentError``), each expectation an
``Expectation`` (source ``HUMAN``: the dataset's author, as MLflow's evaluation logs a dataset's
expectations). MLflow 3.17 has no batch call for assessments: its ``create_assessment`` is one
transaction per assessment (~12 ms each on a sqlite store on a busy 2-core machine, ~47 ms for a trace
with four). On a SQL store :class:`AssessmentLogger` writes a whole batch of traces' assessments in one
transaction instead (~0.6 ms a trace), through the store's own table model; on a tracking server, or where
MLflow's SQL trace rollups are on, it makes MLflow's call per assessment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mlflow.entities import AssessmentError, AssessmentSource, Expectation, Feedback
from mlflow.entities.assessment import Assessment
from mlflow.tracing.constant import AssessmentMetadataKey
from mlflow.tracking import MlflowClient

from pikeclient.eval.score import Score

log = logging.getLogger(__name__)

SCORE_ERROR = "SCORER_ERROR"
QUERY_CHUNK = 500  # trace ids per query
# One call's assessments: its trace id, its scores by name, its expectations (JSON values by kind) or None.
CallAssessments = tuple[str, Mapping[str, Score | Mapping[str, Any]], Mapping[str, Any] | None]


def call_trace_id(run_id: str, prompt_id: str, repeat: int, start_time: float) -> str:
    """The trace id of one call of a run: derived from what identifies the call in its record, so that the
    scores made at the end of a run (or by a later attempt of it) find the trace written when it ended."""
    digest = hashlib.sha256(f"{run_id}\0{prompt_id}\0{int(repeat)}\0{float(start_time)!r}".encode()).hexdigest()
    return "tr-" + digest[:32]


def to_feedback(name: str, score: Score | Mapping[str, Any], *, trace_id: str | None = None,
                run_id: str | None = None) -> Feedback:
    """One score as MLflow's Feedback; ``run_id`` links it to the run that scored it (MLflow's own key)."""
    score = score if isinstance(score, Score) else Score.from_dict(score)
    source = AssessmentSource(source_type=score.source, source_id=score.source_id or name)
    error = AssessmentError(error_code=SCORE_ERROR, error_message=score.error) if score.error is not None else None
    metadata = {AssessmentMetadataKey.SOURCE_RUN_ID: run_id} if run_id else None
    return Feedback(name=name, value=score.value if error is None else None, error=error, source=source,
                    rationale=score.rationale, trace_id=trace_id, metadata=metadata)


def to_expectations(expectations: Mapping[str, Any], *, trace_id: str | None = None,
                    source_id: str = "dataset") -> list[Expectation]:
    """A line's expectations (``Expectations.to_json()``: JSON values by kind), one Expectation each."""
    source = AssessmentSource(source_type="HUMAN", source_id=source_id)
    return [Expectation(name=name, value=value, source=source, trace_id=trace_id)
            for name, value in expectations.items() if value is not None]


class AssessmentLogger:
    """Attaches calls' scores and expectations to their (existing) traces, in as few store calls as it can."""

    def __init__(self, client: MlflowClient, experiment_id: str, *, run_id: str | None = None,
                 expectations_source: str = "dataset", store: Any = None, bulk: bool | None = None) -> None:
        self.store = store if store is not None else client._tracking_client.store  # as CallLogger's spans
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.expectations_source = expectations_source
        self.bulk = _can_bulk(self.store) if bulk is None else bulk
        self.logged = 0

    def log(self, calls: Iterable[CallAssessments]) -> int:
        """Log every call's assessments; returns how many were written."""
        calls = list(calls)
        written = self._insert(calls) if self.bulk else self._one_by_one(calls)
        self.logged += written
        return written

    def _one_by_one(self, calls: list[CallAssessments]) -> int:
        written = 0
        for trace_id, scores, expectations in calls:
            assessments: list[Assessment] = [to_feedback(name, score, trace_id=trace_id, run_id=self.run_id)
                                             for name, score in scores.items()]
            assessments += to_expectations(expectations or {}, trace_id=trace_id, source_id=self.expectations_source)
            for assessment in assessments:
                self.store.create_assessment(assessment)
            written += len(assessments)
        return written

    def _insert(self, calls: list[CallAssessments]) -> int:
        """One transaction for the whole batch, with the columns ``create_assessment`` fills from the trace:
        a Core insert of plain rows (``feedback_row``, ``expectation_row``), not entities and ORM objects
        (a sixth of the time)."""
        from mlflow.store.tracking.dbmodels.models import SqlAssessments, SqlTraceInfo

        trace_ids = sorted({trace_id for trace_id, _, _ in calls})
        with self.store.ManagedSessionMaker(read_only=False) as session:
            traces: dict[str, int] = {}
            for start in range(0, len(trace_ids), QUERY_CHUNK):  # within SQLite's limit on bound variables
                traces.update(session.query(SqlTraceInfo.request_id, SqlTraceInfo.timestamp_ms)
                              .filter(SqlTraceInfo.request_id.in_(trace_ids[start:start + QUERY_CHUNK])))
            missing = [t for t in trace_ids if t not in traces]
            if missing:
                log.warning("%d traces not found (e.g. %s): their assessments are not logged", len(missing), missing[0])
            now, experiment = int(time.time() * 1000), int(self.experiment_id)
            rows = []
            for trace_id, scores, expectations in calls:
                if trace_id not in traces:
                    continue
                where = {"trace_id": trace_id, "experiment_id": experiment, "trace_timestamp_ms": traces[trace_id],
                         "created_timestamp": now, "last_updated_timestamp": now}
                rows += [{**feedback_row(name, score, self.run_id), **where} for name, score in scores.items()]
                rows += [{**expectation_row(name, value, self.expectations_source), **where}
                         for name, value in (expectations or {}).items() if value is not None]
            if rows:
                session.execute(SqlAssessments.__table__.insert(), rows)
        return len(rows)


def feedback_row(name: str, score: Score | Mapping[str, Any], run_id: str | None) -> dict[str, Any]:
    """A score's row in the ``assessments`` table, as MLflow 3.17's ``create_assessment`` writes the
    Feedback ``to_feedback`` makes (a test compares the two); trace and times are added by the caller."""
    score = score if isinstance(score, Score) else Score.from_dict(score)
    error = None
    if score.error is not None:
        error = json.dumps({"error_code": SCORE_ERROR, "error_message": score.error, "stack_trace": None})
    value = score.value if error is None else None
    return {**_row(name, value, "feedback", score.source, score.source_id or name, run_id), "error": error,
            "rationale": score.rationale,
            "assessment_metadata": json.dumps({AssessmentMetadataKey.SOURCE_RUN_ID: run_id}) if run_id else None}


def expectation_row(name: str, value: Any, source_id: str) -> dict[str, Any]:
    """An expectation's row, as ``create_assessment`` writes the Expectation ``to_expectations`` makes."""
    return {**_row(name, value, "expectation", "HUMAN", source_id, None), "error": None, "rationale": None,
            "assessment_metadata": None}


def _row(name: str, value: Any, kind: str, source_type: str, source_id: str, run_id: str | None) -> dict[str, Any]:
    from mlflow.store.tracking.dbmodels.models import assessment_aggregate
    from mlflow.tracing.utils import generate_assessment_id

    aggregate_value, is_numeric = assessment_aggregate(value)
    return {"assessment_id": generate_assessment_id(), "name": name, "assessment_type": kind,
            "value": json.dumps(value), "aggregate_value": aggregate_value, "is_numeric_value": is_numeric,
            "source_type": source_type, "source_id": source_id, "run_id": run_id, "span_id": None,
            "overrides": None, "valid": True}


def log_call_assessments(logger: AssessmentLogger, run_id: str,
                         calls: Iterable[tuple[str, int, float, Mapping[str, Any], Mapping[str, Any] | None]]) -> int:
    """Attach each call's scores and expectations (``pikeclient.run.quality``'s assessments) to its trace.

    Assessments are extra: a failure is a warning, and the run's results stay as they are."""
    try:
        written = logger.log((call_trace_id(run_id, name, repeat, start), scores, expectations)
                             for name, repeat, start, scores, expectations in calls)
    except Exception as error:  # noqa: BLE001 - the run's figures are logged already
        log.warning("logging the scores as assessments failed: %s", error)
        return 0
    log.info("%d assessments on the run's traces", written)
    return written


def _can_bulk(store: Any) -> bool:
    """A SQL store without MLflow's opt-in trace rollups (which must hear of every new assessment)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled
    except ImportError:  # another MLflow layout: MLflow's own call per assessment
        return False
    return isinstance(store, SqlAlchemyStore) and not rollups_enabled()


def as_mlflow_scorer(fn: Callable[..., Any], name: str | None = None) -> Any:
    """A pikeclient scorer (returning :class:`Score`) as an MLflow scorer, for ``mlflow.genai.evaluate``."""
    from mlflow.genai.scorers import scorer

    scorer_name = name or getattr(fn, "__name__", "scorer")

    def run(*, inputs: Any = None, outputs: Any = None, expectations: Any = None, trace: Any = None) -> Any:
        result = fn(inputs=inputs, outputs=outputs, expectations=expectations, trace=trace)
        return to_feedback(scorer_name, result) if isinstance(result, Score) else result

    run.__name__ = scorer_name
    run.__doc__ = fn.__doc__
    return scorer(run, name=scorer_name)
