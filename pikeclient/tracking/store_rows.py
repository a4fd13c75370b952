"""Calls' series and traces written straight into a local sqlite store's tables, one transaction per batch.

MLflow's own batch calls cost more CPU than the calls they describe: ``log_spans``, its only way to write
many traces at once, about 3 ms per trace on a sqlite store (ORM objects, a flush, an UPDATE and a MERGE
per trace); ``log_batch`` about 0.1 ms per metric value (an ORM object each, and the run's latest value
updated attribute by attribute). What they store for a pikeclient run is known:

- a call's trace is one root LLM span of a new trace: one ``trace_info`` row with its previews, token and
  cost columns; two ``trace_tags`` (artifact location, spans location); one ``spans`` row whose content is
  the span as MLflow translates it (attributes sanitized, cost added); and the link to the run
  (``entity_associations``, as ``link_traces_to_run`` makes it). :class:`TraceRows` writes those.
- a call's series values are ``metrics`` rows, and each key's ``latest_metrics`` row moves to the value
  with the highest (step, timestamp, value). :class:`SeriesRows` writes those.

Both insert with SQLAlchemy Core (executemany), using MLflow's own table definitions and helpers: about
0.1 ms a call. They are used only where that equivalence was checked: MLflow's plain ``SqlAlchemyStore``
on sqlite, the MLflow minor version in :data:`VERIFIED_MLFLOW`, SQL trace rollups off. The first span of
every batch is also translated by MLflow itself and compared; any difference, or a row that exists
already (a resumed call), sends the batch through MLflow's own call (see ``CallLogger``).
tests/tracking/test_store_rows.py compares every row with what MLflow's calls write for the same calls.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.entities.span import Span
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.dbmodels.models import (
    SqlEntityAssociation,
    SqlLatestMetric,
    SqlMetric,
    SqlRun,
    SqlSpan,
    SqlTraceInfo,
    SqlTraceTag,
)
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore, _try_parse_json_string
from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled
from mlflow.store.tracking.utils.trace_analytics import (
    COST_COLUMN_BY_KEY,
    TOKEN_COLUMN_BY_KEY,
    bounded_model_dimension,
    finite_float_or_none,
    token_count_or_none,
    validate_session_id,
)
from mlflow.tracing.constant import SpanAttributeKey, TraceTagKey
from mlflow.tracing.otel.translation import sanitize_attributes, translate_span_when_storing
from mlflow.tracing.utils import (
    SpanAggregationNode,
    aggregate_cost_from_span_nodes,
    aggregate_usage_from_span_nodes,
    calculate_cost_by_model_and_token_usage,
    dump_span_attribute_value,
)
from mlflow.tracing.utils.truncation import _get_truncated_preview
from mlflow.utils.mlflow_tags import MLFLOW_ARTIFACT_LOCATION
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.uri import append_to_uri_path
from mlflow.utils.validation import _validate_metric
from sqlalchemy import Table, insert, select, update

# MLflow minor versions whose log_spans and log_batch were read and whose rows tests/tracking/test_store_rows.py
# matches.
VERIFIED_MLFLOW = ("3.17",)
SPANS_IN_TRACKING_STORE = "TRACKING_STORE"  # mlflow.entities.trace_location.SpansLocation.TRACKING_STORE
_ANY_TRACE = "tr-" + "0" * 32


# json.dumps(value, ensure_ascii=False) without a new encoder per call (json.dumps makes one for any option).
_dumps = json.JSONEncoder(ensure_ascii=False).encode


class Mismatch(Exception):
    """A span as written here differs from MLflow's own translation of it."""


def usable(store: Any) -> bool:
    """Whether ``store`` is one these rows were verified against."""
    return (type(store) is SqlAlchemyStore and store.db_type == "sqlite" and not rollups_enabled()
            and ".".join(mlflow.__version__.split(".")[:2]) in VERIFIED_MLFLOW)


class TraceRows:
    """Writes batches of one-span traces (the dicts ``Span.from_dict`` reads) into ``store`` and links them
    to ``run_id``."""

    def __init__(self, store: SqlAlchemyStore, experiment_id: str, run_id: str) -> None:
        self.store = store
        self.experiment_id = int(experiment_id)
        self.run_id = run_id
        # Where log_spans says a trace's artifacts go, for any trace id (they all look alike: tr- and 32 hex digits).
        self.artifact_uri = append_to_uri_path(store.get_experiment(experiment_id).artifact_location,
                                               SqlAlchemyStore.TRACE_FOLDER_NAME, _ANY_TRACE,
                                               SqlAlchemyStore.ARTIFACTS_FOLDER_NAME)

    def write(self, spans: Sequence[Mapping[str, Any]]) -> None:
        """Insert the traces of ``spans`` (each a new trace's root span) in one transaction; raises
        :class:`Mismatch` before writing anything if MLflow would store the first one differently,
        and MlflowException if the store refuses (a trace that exists already)."""
        if not spans:
            return
        contents = [stored_span(span) for span in spans]
        self._check(spans[0], contents[0])
        infos, tags, rows, links = [], [], [], []
        now = get_current_time_millis()
        for span, content in zip(spans, contents):
            info, row = self._rows(span, content)
            infos.append(info)
            rows.append(row)
            trace_id = span["trace_id"]
            tags.append({"request_id": trace_id, "key": MLFLOW_ARTIFACT_LOCATION,
                         "value": self.artifact_uri.replace(_ANY_TRACE, trace_id)})
            tags.append({"request_id": trace_id, "key": TraceTagKey.SPANS_LOCATION, "value": SPANS_IN_TRACKING_STORE})
            links.append({"association_id": uuid.uuid4().hex, "source_type": "trace", "source_id": trace_id,
                          "destination_type": "run", "destination_id": self.run_id, "created_time": now})
        with self.store.ManagedSessionMaker(read_only=False) as session:
            _insert(session, SqlTraceInfo.__table__, infos)
            _insert(session, SqlTraceTag.__table__, tags)
            _insert(session, SqlSpan.__table__, rows)
            _insert(session, SqlEntityAssociation.__table__, links)

    def _check(self, span: Mapping[str, Any], content: Mapping[str, Any]) -> None:
        expected = translate_span_when_storing(Span.from_dict(dict(span)))
        if expected != content:
            raise Mismatch(f"MLflow {mlflow.__version__} stores span {span['span_id']} differently")

    def _rows(self, span: Mapping[str, Any], content: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``trace_info`` and ``spans`` rows ``log_spans`` leaves for a new one-span trace."""
        attributes = content["attributes"]
        start_ns, end_ns = span["start_time_unix_nano"], span["end_time_unix_nano"]
        start_ms, end_ms = start_ns // 1_000_000, end_ns // 1_000_000
        status = "ERROR" if span["status"]["code"] == "STATUS_CODE_ERROR" else "OK"
        info: dict[str, Any] = {
            "request_id": span["trace_id"], "experiment_id": self.experiment_id, "timestamp_ms": start_ms,
            "execution_time_ms": end_ms - start_ms if end_ms else None, "status": status, "client_request_id": None,
            "request_preview": _preview(attributes.get(SpanAttributeKey.INPUTS), "user"),
            "response_preview": _preview(attributes.get(SpanAttributeKey.OUTPUTS), "assistant"),
            "db_payload_generation": 1,  # created at 0, advanced once by the write
            "trace_name": None, "session_id": None,
            **dict.fromkeys(TOKEN_COLUMN_BY_KEY.values()), **dict.fromkeys(COST_COLUMN_BY_KEY.values()),
        }
        if session := attributes.get(SpanAttributeKey.SESSION_ID):
            info["session_id"] = validate_session_id(_try_parse_json_string(session))
        usage = aggregate_usage_from_span_nodes([_node(span, attributes.get(SpanAttributeKey.CHAT_USAGE))]) or {}
        for key, column in TOKEN_COLUMN_BY_KEY.items():
            info[column] = token_count_or_none(usage.get(key))
        cost_text = attributes.get(SpanAttributeKey.LLM_COST)
        cost = aggregate_cost_from_span_nodes([_node(span, cost_text)]) or {}
        for key, column in COST_COLUMN_BY_KEY.items():
            info[column] = finite_float_or_none(cost.get(key))
        span_cost = json.loads(cost_text) if cost_text else {}
        row = {
            "trace_id": span["trace_id"], "experiment_id": self.experiment_id, "span_id": span["span_id"],
            "parent_span_id": None, "name": span["name"],
            "type": _try_parse_json_string(attributes.get(SpanAttributeKey.SPAN_TYPE)), "status": status,
            "start_time_unix_nano": start_ns, "end_time_unix_nano": end_ns,
            # As log_spans dumps it (TraceJSONEncoder only matters for values JSON cannot hold: none here).
            "content": _dumps(content),
            "input_cost": finite_float_or_none(span_cost.get("input_cost")),
            "output_cost": finite_float_or_none(span_cost.get("output_cost")),
            "total_cost": finite_float_or_none(span_cost.get("total_cost")),
            "model_name": bounded_model_dimension(_try_parse_json_string(attributes.get(SpanAttributeKey.MODEL))),
            "model_provider": bounded_model_dimension(
                _try_parse_json_string(attributes.get(SpanAttributeKey.MODEL_PROVIDER))),
        }
        return info, row


class SeriesRows:
    """Writes batches of a run's metric values (``Metric`` entities) as ``log_batch`` stores them."""

    def __init__(self, store: SqlAlchemyStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def write(self, metrics: Sequence[Metric]) -> None:
        """Insert the values and move each key's latest value, in one transaction; raises MlflowException
        (nothing written) if the run is not active or a value is there already (a resumed call)."""
        if not metrics:
            return
        rows, seen = [], set()
        for metric in metrics:
            if metric in seen:  # log_batch drops a batch's exact repeats
                continue
            seen.add(metric)
            _validate_metric(metric.key, metric.value, metric.timestamp, metric.step)
            is_nan, value = self.store.sanitize_metric_value(metric.value)
            rows.append({"key": metric.key, "value": value, "timestamp": metric.timestamp, "step": metric.step,
                         "is_nan": is_nan, "run_uuid": self.run_id})
        latest: dict[str, dict[str, Any]] = {}  # per key, the first row with the highest (step, timestamp, value)
        for row in rows:
            best = latest.get(row["key"])
            if best is None or _order(row) > _order(best):
                latest[row["key"]] = row
        with self.store.ManagedSessionMaker(read_only=False) as session:
            stage = session.execute(select(SqlRun.lifecycle_stage).where(SqlRun.run_uuid == self.run_id)).scalar()
            if stage != LifecycleStage.ACTIVE:
                raise MlflowException(f"The run {self.run_id} must be in the 'active' state. Current state is {stage}.")
            _insert(session, SqlMetric.__table__, rows)
            table = SqlLatestMetric.__table__
            stored = {row.key: row for row in session.execute(
                select(table.c.key, table.c.step, table.c.timestamp, table.c.value)
                .where(table.c.run_uuid == self.run_id, table.c.key.in_(sorted(latest))))}
            new = [row for key, row in latest.items() if key not in stored]
            if new:
                session.execute(insert(table), new)
            for key, row in latest.items():
                if key in stored and _order(row) > tuple(stored[key][1:]):
                    session.execute(update(table).where(table.c.run_uuid == self.run_id, table.c.key == key)
                                    .values(value=row["value"], step=row["step"], timestamp=row["timestamp"],
                                            is_nan=row["is_nan"]))


def _insert(session: Any, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the same keys, every column that has a default among them) through the
    driver's executemany, with the statement SQLAlchemy compiles for them: its own executemany builds and
    processes a parameter dict per row, two thirds of the time these inserts took."""
    if not rows:
        return
    connection = session.connection()
    statement, values = _statement(connection.dialect, table, tuple(rows[0]))
    connection.exec_driver_sql(statement, [values(row) for row in rows])


@lru_cache(maxsize=64)
def _statement(dialect: Any, table: Table, keys: tuple[str, ...]) -> tuple[str, Callable[[Mapping], tuple]]:
    """The INSERT SQLAlchemy runs for rows with these keys, and what makes a row its parameters."""
    compiled = insert(table).compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ())
    if not compiled.positional or set(names) != set(keys):  # a default left to SQLAlchemy, or named parameters
        raise ValueError(f"rows for {table.name} must give every column SQLAlchemy sets: {sorted(names)}")
    pick = itemgetter(*names)
    return str(compiled), (pick if len(names) > 1 else lambda row: (pick(row),))


def _order(row: Mapping[str, Any]) -> tuple[int, int, float]:
    """How log_batch tells a key's latest value: the highest step, then timestamp, then value."""
    return row["step"], row["timestamp"], row["value"]


def stored_span(span: Mapping[str, Any]) -> dict[str, Any]:
    """The span's dictionary as ``log_spans`` stores it (``translate_span_when_storing`` of the span that
    ``Span.from_dict`` makes of it): ids in base64, attributes sanitized, the call's cost added. The other
    translations read attribute names (OpenTelemetry conventions) a pikeclient span does not have."""
    attributes = dict(span["attributes"])
    # Only strings can be JSON of JSON (what sanitizing unwraps); MLflow's own function decides.
    attributes.update(sanitize_attributes({k: v for k, v in attributes.items() if v[:1] == '"'}))
    usage, model = attributes.get(SpanAttributeKey.CHAT_USAGE), attributes.get(SpanAttributeKey.MODEL)
    if (SpanAttributeKey.LLM_COST not in attributes and usage is not None and model is not None
            and SpanAttributeKey.MODEL_PROVIDER not in attributes):
        cost = _cost(model, usage)
        if cost is not None:
            attributes[SpanAttributeKey.LLM_COST] = cost
    return {
        "trace_id": _base64(span["trace_id"].removeprefix("tr-")),
        "span_id": _base64(span["span_id"]),
        "parent_span_id": None,
        "name": span["name"],
        "start_time_unix_nano": span["start_time_unix_nano"],
        "end_time_unix_nano": span["end_time_unix_nano"],
        "events": [],
        "status": {"code": span["status"]["code"], "message": span["status"]["message"]},
        "attributes": attributes,
        "links": [],
    }


@lru_cache(maxsize=4096)
def _cost(model: str, usage: str) -> str | None:
    """The span's cost attribute for this model and usage (both as their JSON), as MLflow computes it
    (a price table lookup: the same few token counts recur, so it is cached)."""
    try:
        cost = calculate_cost_by_model_and_token_usage(json.loads(model), json.loads(usage), None)
    except Exception:  # noqa: BLE001 - MLflow leaves the cost out when it cannot compute it
        return None
    return dump_span_attribute_value(cost) if cost else None


def _node(span: Mapping[str, Any], value: str | None) -> SpanAggregationNode:
    data = json.loads(value) if isinstance(value, str) else None
    return SpanAggregationNode(span_id=span["span_id"], parent_id=None, data=data if isinstance(data, dict) else None)


def _preview(value: str | None, role: str) -> str | None:
    return _get_truncated_preview(value, role=role) if value else None


def _base64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()
