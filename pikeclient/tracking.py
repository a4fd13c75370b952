"""MLflow tracking: the only module that imports mlflow.

Uses an ``MlflowClient`` bound to one tracking URI (no fluent global state), logs in batches, and
marks a run FAILED or KILLED when the experiment does not finish.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag, SpanType
from mlflow.entities.span import Span
from mlflow.exceptions import MlflowException
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow's limits for one log_batch call.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000

# Keys whose values are credentials (api_key_env holds a variable *name*, which is safe to log).
_SECRET_KEY = re.compile(r"^(.*_)?(api_?key|key|token|secret|password|credential)$", re.IGNORECASE)


def default_tracking_uri(runs_dir: str | os.PathLike[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else one sqlite store for all runs and sweep jobs."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: Any) -> str:
    """The store a config logs to: ``tracking.tracking_uri``, else the default above."""
    return cfg.tracking.tracking_uri or default_tracking_uri(cfg.paths.runs_dir)


def artifact_root(cfg: Any) -> str:
    return str(Path(cfg.paths.runs_dir).resolve() / "mlartifacts")


def open_parent_run(cfg: Any, sweep_dir: Path) -> dict[str, str]:
    """Create the experiment (once, before parallel jobs could race on it) and a sweep's parent run."""
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment_name, artifact_root(cfg))
    tags = {"pikeclient.sweep_dir": str(sweep_dir), "pikeclient.role": "sweep"}
    run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
    return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri}


def close_parent_run(parent: Mapping[str, str], status: str | None = None) -> None:
    """Finish a parent run: FAILED if any child failed (or ``status`` says so), else FINISHED."""
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    children = client.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    failed = [c for c in children if c.info.status != "FINISHED"]
    client.log_batch(parent["run_id"], metrics=[
        Metric("jobs", len(children), int(time.time() * 1000), 0),
        Metric("jobs_failed", len(failed), int(time.time() * 1000), 0),
    ])
    client.set_terminated(parent["run_id"], status or ("FAILED" if failed else "FINISHED"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, with credential-like keys left out."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class MlflowRun:
    """One MLflow run, used as a context manager around the work it records."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        artifact_root: str | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_id = get_or_create_experiment(self.client, experiment_name, artifact_root)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        log.info("MLflow run %s in experiment %r (%s)", self.run_id, experiment_name, tracking_uri)

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.client.set_terminated(self.run_id, status)

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._log_metric_objects(Metric(k, float(v), now, step) for k, v in metrics.items())

    def log_series(self, name: str, values: Iterable[float]) -> None:
        """A metric series with step = position (per-call latency, tokens), in batches."""
        now = int(time.time() * 1000)
        self._log_metric_objects(Metric(name, float(v), now, step) for step, v in enumerate(values))

    def _log_metric_objects(self, metrics: Iterable[Metric]) -> None:
        for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def trace_writer(self, client: Mapping[str, Any]) -> TraceWriter:
        return TraceWriter(self, client)

    def log_results(self, metrics: Mapping[str, float], records_path: Path, output_dir: Path,
                    *, log_records: bool = True) -> None:
        """Run metrics, per-call series (step = prompt index) and the run's files as artifacts."""
        self.log_metrics(metrics)
        latency, tokens = read_series(records_path)
        self._log_metric_objects(
            [Metric("call_latency_s", v, 0, step) for step, v in latency]
            + [Metric("call_completion_tokens", v, 0, step) for step, v in tokens]
        )
        if log_records:
            self.log_artifact(records_path)
            self.client.log_table(self.run_id, records_table(records_path), "records_table.json")
        self.log_artifact(output_dir / ".hydra", "hydra")

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, creating it if needed; safe when parallel jobs race to create it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def read_series(records_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(index, latency) and (index, completion tokens) of the successful calls in a records file."""
    latency: list[tuple[int, float]] = []
    tokens: list[tuple[int, float]] = []
    with records_path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if record["error"] is None and not record.get("cached"):
                latency.append((record["index"], record["latency_s"]))
                if record["usage"]["completion_tokens"] is not None:
                    tokens.append((record["index"], record["usage"]["completion_tokens"]))
    return latency, tokens


def records_table(records_path: Path) -> dict[str, list]:
    """Per-call records as columns, for MLflow's table view in the run's artifacts."""
    columns = ["index", "id", "prompt", "response", "finish_reason", "latency_s", "ttft_s", "attempts",
               "prompt_tokens", "completion_tokens", "cached", "error_kind", "error"]
    table: dict[str, list] = {c: [] for c in columns}
    with records_path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            flat = {**record, **{k: record["usage"].get(k) for k in ("prompt_tokens", "completion_tokens")}}
            for column in columns:
                table[column].append(flat.get(column))
    return table


class TraceWriter:
    """One MLflow trace (a single LLM span) per call, written on a background thread in batches.

    Spans are built with the timestamps the calls really had and written through the run's own store
    (``log_spans``: many traces in one transaction), then linked to the run. MLflow's fluent tracing
    would export through its global tracking URI, one trace at a time.
    """

    BATCH = 200
    LINK_BATCH = 100

    def __init__(self, run: MlflowRun, client: Mapping[str, Any]) -> None:
        self.run = run
        self.model = str(client.get("model"))
        self.provider = str(client.get("provider"))
        # MlflowClient has no public batch span API; its store has (sqlite, MLflow server).
        self.store = run.client._tracking_client.store
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.trace_ids: list[str] = []
        self.failed = False
        self.thread = threading.Thread(target=self._work, name="mlflow-traces", daemon=True)
        self.thread.start()

    def add(self, record: Mapping[str, Any], item: Any) -> None:
        """Queue one call (called on the event loop: building and writing happen on the thread)."""
        self.queue.put((record, item.messages))

    def close(self) -> int:
        """Write what is queued, link the traces to the run; returns how many were written."""
        self.queue.put(None)
        self.thread.join()
        for chunk in _chunks(self.trace_ids, self.LINK_BATCH):
            self.run.client.link_traces_to_run(chunk, self.run.run_id)
        self.run.log_tags({"pikeclient.traces": str(len(self.trace_ids))})
        return len(self.trace_ids)

    def _work(self) -> None:
        done = False
        while not done:
            batch = [self.queue.get()]
            while len(batch) < self.BATCH and not self.queue.empty():
                batch.append(self.queue.get())
            done = batch[-1] is None or None in batch
            spans = [self._span(*entry) for entry in batch if entry is not None]
            if spans and not self.failed:
                self._write(spans)

    def _write(self, spans: list[Span]) -> None:
        try:
            self.store.log_spans(self.run.experiment_id, spans)
        except Exception as error:  # noqa: BLE001 - traces are extra: the run's results stay intact
            self.failed = True
            log.warning("writing traces failed; no more traces for this run: %s", error)
            return
        self.trace_ids.extend(span.trace_id for span in spans)

    def _span(self, record: Mapping[str, Any], messages: Any) -> Span:
        trace_id = "tr-" + os.urandom(16).hex()
        start_ns = int(record["start_time"] * 1e9)
        duration = (record.get("latency_s") or 0.0) + (record.get("backoff_s") or 0.0)
        usage = record["usage"]
        attributes = {
            SpanAttributeKey.REQUEST_ID: trace_id,
            SpanAttributeKey.SPAN_TYPE: SpanType.LLM,
            SpanAttributeKey.INPUTS: {"messages": list(messages)},
            SpanAttributeKey.OUTPUTS: {"text": record.get("response"), "finish_reason": record.get("finish_reason")},
            SpanAttributeKey.MODEL: self.model,
            # Not SpanAttributeKey.MODEL_PROVIDER: with it MLflow fetches a price catalog from
            # github.com on every write (offline: ~10 s of retries); our provider names are our own.
            "pikeclient.provider": self.provider,
            "pikeclient.attempts": record["attempts"],
            "pikeclient.prompt_id": record["id"],
        }
        if usage.get("total_tokens") is not None:
            attributes[SpanAttributeKey.CHAT_USAGE] = {"input_tokens": usage["prompt_tokens"],
                                                       "output_tokens": usage["completion_tokens"],
                                                       "total_tokens": usage["total_tokens"]}
        if record.get("error"):
            attributes["pikeclient.error"] = record["error"]
        return Span.from_dict({
            "trace_id": trace_id, "span_id": os.urandom(8).hex(), "parent_span_id": None, "name": "chat",
            "start_time_unix_nano": start_ns, "end_time_unix_nano": start_ns + int(duration * 1e9),
            "events": [], "links": [],
            "status": {"code": "STATUS_CODE_ERROR" if record.get("error") else "STATUS_CODE_OK", "message": ""},
            "attributes": {k: json.dumps(v, ensure_ascii=False) for k, v in attributes.items()},
        })


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
