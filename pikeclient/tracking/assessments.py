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

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mlflow.entities import AssessmentError, AssessmentSource, Expectation, Feedback
from mlflow.entities.assessment import Assessment
from mlflow.tracing.constant import AssessmentMetadataKey
from mlflow.tracking import MlflowClient

from pikeclient.eval.score import Score

log = logging.getLogger(__name__)

SCORE_ERROR = "SCORER_ERROR"
# One call's assessments: its trace id, its scores by name, its expectations (JSON values by kind) or None.
CallAssessments = tuple[str, Mapping[str, Score | Mapping[str, Any]], Mapping[str, Any] | None]


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
        assessments: list[Assessment] = []
        for trace_id, scores, expectations in calls:
            assessments += [to_feedback(name, score, trace_id=trace_id, run_id=self.run_id)
                            for name, score in scores.items()]
            if expectations:
                assessments += to_expectations(expectations, trace_id=trace_id, source_id=self.expectations_source)
        if not assessments:
            return 0
        written = self._insert(assessments) if self.bulk else self._one_by_one(assessments)
        self.logged += written
        return written

    def _one_by_one(self, assessments: list[Assessment]) -> int:
        for assessment in assessments:
            self.store.create_assessment(assessment)
        return len(assessments)

    def _insert(self, assessments: list[Assessment]) -> int:
        """One transaction for the whole batch, with the columns ``create_assessment`` fills from the trace."""
        from mlflow.store.tracking.dbmodels.models import SqlAssessments, SqlTraceInfo

        trace_ids = sorted({a.trace_id for a in assessments})
        with self.store.ManagedSessionMaker(read_only=False) as session:
            traces = dict(session.query(SqlTraceInfo.request_id, SqlTraceInfo.timestamp_ms)
                          .filter(SqlTraceInfo.request_id.in_(trace_ids)))
            missing = [t for t in trace_ids if t not in traces]
            if missing:
                log.warning("%d traces not found (e.g. %s): their assessments are not logged", len(missing), missing[0])
            rows = []
            for assessment in assessments:
                if assessment.trace_id in traces:
                    row = SqlAssessments.from_mlflow_entity(assessment)
                    row.experiment_id = int(self.experiment_id)
                    row.trace_timestamp_ms = traces[assessment.trace_id]
                    rows.append(row)
            session.add_all(rows)
        return len(rows)


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
