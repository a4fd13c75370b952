"""MLflow tracking: the only module that imports mlflow.

Uses an ``MlflowClient`` bound to one tracking URI (no fluent global state), logs in batches, and
marks a run FAILED or KILLED when the experiment does not finish.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
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


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
