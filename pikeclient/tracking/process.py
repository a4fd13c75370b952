"""MLflow tracking: the only module that imports mlflow.

Uses an ``MlflowClient`` bound to one tracking URI (no fluent global state), logs in batches, and
marks a run FAILED or KILLED when the experiment does not finish. With a tracking server, a request
that cannot reach it is tried again until the server is back (``Outage``), while the experiment's
calls keep arriving.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, SpanType
from mlflow.entities.span import Span
from mlflow.exceptions import MlflowException
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from pikeclient.config.schema import artifact_root, is_secret_name, is_server_uri, tracking_uri
from pikeclient.core.errors import one_line
from pikeclient.tracking.assessments import AssessmentLogger, call_trace_id, log_call_assessments
from pikeclient.tracking.job_file import write_job_file
from pikeclient.tracking.remote import TRACKING_PROCESS_HTTP_ENV
from pikeclient.tracking.sidecar import METRIC_CALLS_CPU, METRIC_CPU

log = logging.getLogger(__name__)

# Per-call series (step = prompt index), logged as the calls end.
SERIES_LATENCY = "call/latency_s"
SERIES_TOKENS = "call/completion_tokens"
# Calls are written (series and traces, a few transactions) when this many have arrived, or when the
# experiment has sent nothing more for this long: few transactions, and the UI a second behind the calls.
WRITE_BATCH = 1000
WRITE_EVERY_S = 1.0
# MLflow's limits for one log_batch call.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
# json.dumps(value, ensure_ascii=False) without a new encoder per call (json.dumps makes one for any option).
_dumps = json.JSONEncoder(ensure_ascii=False).encode


def open_client(uri: str, artifact_root: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` on ``uri``; a new sqlite store is created first, whole or not at all."""
    if uri.startswith("sqlite:///"):
        ensure_sqlite_store(Path(uri.removeprefix("sqlite:///")), artifact_root)
    return MlflowClient(tracking_uri=uri)


def ensure_sqlite_store(path: Path, artifact_root: str | None = None) -> None:
    """Create the sqlite store at ``path`` if it does not exist: serialized and atomic.

    MLflow builds a new store by running its migrations in place (~1 s). Two processes doing that at
    once, or a kill half-way (SIGKILL, or a SIGKILLed experiment whose tracking process is still
    migrating when the user runs again), left a store broken for good ("table ... already exists").
    Here one process at a time (an flock beside the file) migrates a private temporary file, and only a
    complete store is renamed into place; a file at ``path`` is therefore always a complete store.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if path.exists():  # another process created it while this one waited
            return
        for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # left by a process killed mid-creation
            stale.unlink(missing_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        root = Path(artifact_root or path.parent / "mlartifacts").resolve().as_uri()
        store = SqlAlchemyStore(f"sqlite:///{temporary}", root)
        store.engine.dispose()
        os.replace(temporary, path)


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Which process owns a RUNNING run, so that a later process can tell when the owner is gone."""
    return {"pikeclient.host": socket.gethostname(), "pikeclient.pid": str(pid or os.getpid())}


def end_orphaned_runs(client: MlflowClient, experiment_id: str, parent_run_id: str | None = None,
                      wait_s: float = 0.0) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (on this host) no longer exists.

    A SIGKILL to a whole process group, or a machine that lost power, leaves runs RUNNING forever:
    nobody is left to end them. The next process that uses the store ends them instead. With
    ``parent_run_id``, only that sweep's jobs, each given up to ``wait_s`` for its process to end (a
    launcher's workers killed by Ctrl-C are still exiting when the sweep's own process ends).
    """
    host, ended = socket.gethostname(), []
    query = "attributes.status = 'RUNNING'"
    if parent_run_id is not None:
        query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    deadline = time.monotonic() + wait_s
    for run in client.search_runs([experiment_id], query, max_results=5000):
        tags = run.data.tags
        pid = tags.get("pikeclient.pid", "")
        if tags.get("pikeclient.host") != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        while _process_alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d run(s) KILLED whose process is gone: %s", len(ended), ", ".join(ended))
    return ended


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def open_parent_run(cfg: Any, sweep_dir: Path, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Create the experiment (once, before parallel jobs could race on it) and a sweep's parent run."""
    uri = tracking_uri(cfg)
    client = open_client(uri, artifact_root(cfg))
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment_name, artifact_root(cfg))
    end_orphaned_runs(client, experiment_id)
    tags = {"pikeclient.sweep_dir": str(sweep_dir), "pikeclient.role": "sweep", **owner_tags(), **(tags or {})}
    run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
    return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri}


def reopen_parent_run(parent: Mapping[str, str], tags: Mapping[str, str] | None = None) -> None:
    """A resumed sweep's parent: RUNNING again, owned by this process, until its jobs are done."""
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    client.update_run(parent["run_id"], status="RUNNING")
    client.log_batch(parent["run_id"], tags=[RunTag(k, v) for k, v in {**owner_tags(), **(tags or {})}.items()])


def close_parent_run(parent: Mapping[str, str], status: str | None = None, *, only_if_running: bool = False) -> None:
    """Finish a parent run: FAILED if any child failed (or ``status`` says so), else FINISHED; with
    ``only_if_running``, a parent another path has ended already is left as it is."""
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    if only_if_running and client.get_run(parent["run_id"]).info.status != "RUNNING":
        return
    if status == "KILLED":  # jobs whose worker process was killed with the sweep (joblib on Ctrl-C)
        end_orphaned_runs(client, parent["experiment_id"], parent["run_id"], wait_s=10.0)
    children = client.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    failed = [c for c in children if c.info.status != "FINISHED"]
    client.log_batch(parent["run_id"], metrics=[
        Metric("sweep/jobs", len(children), int(time.time() * 1000), 0),
        Metric("sweep/jobs_failed", len(failed), int(time.time() * 1000), 0),
    ])
    client.set_terminated(parent["run_id"], status or ("FAILED" if failed else "FINISHED"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, with credential-like keys left out."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if is_secret_name(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class MlflowRun:
    """One MLflow run, logged in batches through one ``MlflowClient``."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str, outage: Outage | None = None) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        # How long a tracking server was away during this run (never, for a local store).
        self.outage = outage or Outage(str(client.tracking_uri), 0.0)

    @classmethod
    def create(cls, client: MlflowClient, experiment_id: str, *, run_name: str | None = None,
               tags: Mapping[str, str] | None = None, start_time_ms: int | None = None,
               outage: Outage | None = None) -> MlflowRun:
        run = client.create_run(experiment_id, start_time=start_time_ms, run_name=run_name, tags=dict(tags or {}))
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, experiment_id, client.tracking_uri)
        return cls(client, experiment_id, run.info.run_id, outage)

    @classmethod
    def reopen(cls, client: MlflowClient, experiment_id: str, run_id: str, tags: Mapping[str, str],
               outage: Outage | None = None) -> MlflowRun:
        """An interrupted run, RUNNING again (owned by this process) until this process ends it."""
        client.update_run(run_id, status="RUNNING")
        run = cls(client, experiment_id, run_id, outage)
        run.log_tags(tags)
        return run

    def logged_steps(self, key: str) -> set[int]:
        """Steps already logged for a metric (a resumed run's calls that reached MLflow before the stop)."""
        return {metric.step for metric in self.client.get_metric_history(self.run_id, key)}

    def end(self, status: str, end_time_ms: int | None = None) -> None:
        """FINISHED, FAILED or KILLED; ``end_time_ms`` is when the measured part ended."""
        try:
            self.client.set_terminated(self.run_id, status, end_time=end_time_ms)
        except Exception:
            if not self.outage.given_up:
                raise
            log.error("run %s stays RUNNING on %s: the server did not come back", self.run_id, self.outage.uri)

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float | Mapping[int, float]], step: int = 0) -> None:
        """Each value at ``step``; a mapping is a series, ``{step: value}`` (by turn, say)."""
        now = int(time.time() * 1000)
        self._log_metric_objects(
            Metric(k, float(value), now, at) for k, v in metrics.items()
            for at, value in (v.items() if isinstance(v, Mapping) else ((step, v),)))

    def _log_metric_objects(self, metrics: Iterable[Metric]) -> None:
        for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_results(self, metrics: Mapping[str, float], records_path: Path, output_dir: Path,
                    *, log_records: bool = True) -> None:
        """Run metrics and the run's files as artifacts (the per-call series were logged live)."""
        self.log_metrics(metrics)
        if log_records:
            self.log_artifact(records_path)
            self.log_artifact(write_records_table(records_path, output_dir / "records_table.json"))
            # What log_table adds, so the UI lists the file as a table.
            self.log_tags({MLFLOW_LOGGED_ARTIFACTS: json.dumps([{"path": "records_table.json", "type": "table"}])})
        self.log_artifact(output_dir / ".hydra", "hydra")
        if self.outage.waited_s:  # the run is complete, but say that the server was away meanwhile
            self.log_tags({"pikeclient.tracking_outage_s": f"{self.outage.waited_s:.1f}"})

    def log_dataset(self, dataset: Mapping[str, Any]) -> None:
        """The prompt set the run measured (MLflow's Datasets column): name, source and digest."""
        profile = json.dumps({"prompts": dataset.get("prompts")})
        entity = Dataset(name=str(dataset["name"]), digest=str(dataset["digest"])[:36], source_type="local",
                         source=json.dumps({"uri": str(dataset["source"])}), profile=profile)
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "eval")])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as error:
            if "duplicate key" not in str(error) and "UNIQUE constraint" not in str(error):
                raise
            # Another run of this experiment logged the same prompt set at the same moment (a sweep's jobs
            # against one server: MLflow looks the dataset up, then inserts it). It exists now: this links it.
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class Outage:
    """Waits out a tracking server that cannot be reached: the request is tried again every few seconds,
    for up to ``timeout`` seconds per outage; after that every request fails at once.

    Only "could not connect" is waited for (the request never reached the server, so trying again
    cannot log twice); an error the server answers with is raised as before.
    """

    def __init__(self, uri: str, timeout: float, interval: float = 2.0) -> None:
        self.uri = uri
        self.timeout = timeout
        self.interval = interval
        self.waited_s = 0.0
        self.given_up = False

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        started: float | None = None
        while True:
            try:
                result = function(*args, **kwargs)
            except Exception as error:
                if not _unreachable(error):
                    raise
                if self.given_up:
                    raise MlflowException(self.gone_message()) from None
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning("the tracking server %s is unreachable; trying again for up to %.0f s (the "
                                "calls go on and every record is on disk)", self.uri, self.timeout)
                if now - started >= self.timeout:
                    self.given_up = True
                    self.waited_s += now - started
                    raise MlflowException(self.gone_message()) from None
                self._wait()
                continue
            if started is not None:
                self.waited_s += time.monotonic() - started
                log.warning("the tracking server %s is back after %.1f s", self.uri, time.monotonic() - started)
            return result

    def gone_message(self) -> str:
        return (f"the tracking server {self.uri} was unreachable for {self.timeout:.0f} s; the run is "
                "incomplete in MLflow, its records are on disk")

    def _wait(self) -> None:
        time.sleep(self.interval)


class Reconnecting:
    """An MlflowClient (or store) whose methods go through ``outage.call``."""

    def __init__(self, target: Any, outage: Outage) -> None:
        self._target = target
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._outage.call(value, *args, **kwargs)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failure to connect, as MLflow's REST client reports it."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.exceptions.RetryError, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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


TABLE_COLUMNS = ("index", "id", "prompt", "response", "finish_reason", "latency_s", "ttft_s", "attempts",
                 "prompt_tokens", "completion_tokens", "cached", "error_kind", "error", "scores")


def write_records_table(records_path: Path, table_path: Path) -> Path:
    """Per-call records as the JSON table MLflow's UI shows (pandas' ``orient="split"`` layout).

    Written row by row: ``MlflowClient.log_table`` would build a DataFrame of every record first
    (44 MiB more at 10,000 records).
    """
    with records_path.open(encoding="utf-8") as lines, table_path.open("w", encoding="utf-8") as out:
        out.write(f'{{"columns": {json.dumps(list(TABLE_COLUMNS))}, "data": [')
        for number, line in enumerate(lines):
            record = json.loads(line)
            flat = {**record, **{k: record["usage"].get(k) for k in ("prompt_tokens", "completion_tokens")}}
            out.write(("," if number else "") + _dumps([flat.get(c) for c in TABLE_COLUMNS]))
        out.write("]}")
    return table_path


class CallLogger:
    """Logs finished calls in batches: the per-call metric series (step = prompt index) and, when
    ``traces`` is on, one MLflow trace (a single LLM span) per call.

    Spans carry the timestamps the calls really had and go through the run's own store (``log_spans``:
    many traces in one transaction), then are linked to the run; MLflow's fluent tracing would export
    through its global tracking URI, one trace at a time.
    """

    LINK_BATCH = 100

    def __init__(self, run: MlflowRun, client: Mapping[str, Any], *, traces: bool) -> None:
        self.run = run
        self.model = str(client.get("model"))
        self.provider = str(client.get("provider"))
        self.traces = traces
        # MlflowClient has no public batch span API; its store has (sqlite, MLflow server).
        self.store = run.client._tracking_client.store
        if isinstance(run.client, Reconnecting):  # the server's version was asked for at set-up
            self.store = Reconnecting(self.store, run.outage)
        # A local sqlite store: the rows written straight in (pikeclient.tracking.store_rows), else None.
        self.series_rows, self.rows = _store_rows(self.store, run, traces)
        self.trace_ids: list[str] = []  # every trace written
        self.unlinked: list[str] = []  # written by log_spans: linked to the run at close
        self.traces_failed = False
        self.logged: set[int] = set()  # prompt indices a resumed run logged before it stopped
        self.cpu_s = 0.0  # this process's CPU seconds spent logging the calls (series, traces, links)

    def write(self, calls: list[tuple[Mapping[str, Any], Any]]) -> None:
        """Log a batch of (record, messages): answers from the response cache are no calls of this run,
        and a resumed run's earlier calls are logged only if they had not reached MLflow before."""
        calls = [(record, messages) for record, messages in calls if not record.get("cached")
                 and not (record.get("resumed") and record["index"] in self.logged)]
        if not calls:
            return
        started = time.thread_time()
        self._write_series(_series(record for record, _ in calls))
        if self.traces and not self.traces_failed:
            self._write_spans([self._span(record, messages) for record, messages in calls])
        self.cpu_s += time.thread_time() - started

    def close(self) -> None:
        """Link the written traces to the run."""
        started = time.thread_time()
        for chunk in _chunks(self.unlinked, self.LINK_BATCH):
            self.run.client.link_traces_to_run(chunk, self.run.run_id)
        if self.traces:
            self.run.log_tags({"pikeclient.traces": str(len(self.trace_ids))})
        self.cpu_s += time.thread_time() - started

    def _write_series(self, metrics: list[Metric]) -> None:
        if self.series_rows is not None:
            try:
                self.series_rows.write(metrics)
                return
            except MlflowException:  # a value there already (a resumed call): log_batch leaves it out
                pass
        self.run._log_metric_objects(metrics)

    def _write_spans(self, spans: list[dict[str, Any]]) -> None:
        if self.rows is not None:
            try:
                self.rows.write(spans)  # linked to the run in the same transaction
                self.trace_ids.extend(span["trace_id"] for span in spans)
                return
            except Exception as error:  # noqa: BLE001 - MLflow's own way below writes them instead
                from pikeclient.tracking.store_rows import Mismatch

                if isinstance(error, Mismatch):
                    log.warning("traces go through MLflow's log_spans from now on: %s", error)
                    self.rows = None
                # else (a trace already in the store: a resumed call): MLflow's log_spans updates it
        try:
            self.store.log_spans(self.run.experiment_id, [Span.from_dict(span) for span in spans])
        except Exception as error:  # noqa: BLE001 - traces are extra: the run's results stay intact
            self.traces_failed = True
            log.warning("writing traces failed; no more traces for this run: %s", error)
            return
        self.trace_ids.extend(span["trace_id"] for span in spans)
        self.unlinked.extend(span["trace_id"] for span in spans)

    def _span(self, record: Mapping[str, Any], messages: Any) -> dict[str, Any]:
        """The call's trace: one LLM span, as the dictionary ``Span.from_dict`` reads."""
        trace_id = call_trace_id(self.run.run_id, record["id"], record.get("repeat") or 0, record["start_time"])
        start_ns = int(record["start_time"] * 1e9)
        duration = sum(record.get(name) or 0.0 for name in ("latency_s", "backoff_s", "throttle_s", "send_delay_s",
                                                             "connect_s"))
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
            "pikeclient.prompt_index": record["index"],
        }
        if record.get("request_id"):  # what the server's logs know the call by (X-Request-Id)
            attributes["pikeclient.request_id"] = record["request_id"]
        if record.get("resumed"):
            attributes["pikeclient.resumed"] = True
        if record.get("session_id") is not None:
            # MLflow's session id (the trace's mlflow.trace.session): its Sessions view groups a conversation's
            # calls. The run's id keeps two runs' (a sweep's jobs') plays of one conversation apart.
            attributes[SpanAttributeKey.SESSION_ID] = f"{self.run.run_id[:8]}-{record['session_id']}"
            attributes["pikeclient.turn"] = record["turn"]
        for name in ("ttft_s", "itl_s", "tpot_s", "send_delay_s", "connect_s"):
            if record.get(name) is not None:
                attributes[f"pikeclient.{name}"] = record[name]
        if usage.get("total_tokens") is not None:
            attributes[SpanAttributeKey.CHAT_USAGE] = {"input_tokens": usage["prompt_tokens"],
                                                       "output_tokens": usage["completion_tokens"],
                                                       "total_tokens": usage["total_tokens"]}
        if record.get("error"):
            attributes["pikeclient.error"] = record["error"]
        return {
            "trace_id": trace_id, "span_id": os.urandom(8).hex(), "parent_span_id": None, "name": "chat",
            "start_time_unix_nano": start_ns, "end_time_unix_nano": start_ns + int(duration * 1e9),
            "events": [], "links": [],
            "status": {"code": "STATUS_CODE_ERROR" if record.get("error") else "STATUS_CODE_OK", "message": ""},
            "attributes": {k: _dumps(v) for k, v in attributes.items()},
        }


def _store_rows(store: Any, run: MlflowRun, traces: bool) -> tuple[Any, Any]:
    """:mod:`pikeclient.tracking.store_rows`' writers of the series and (with ``traces``) the traces, for a
    local sqlite store they were verified against; else None each (MLflow's ``log_batch``, ``log_spans``)."""
    if type(store).__name__ != "SqlAlchemyStore":  # a server's REST store: imports nothing more
        return None, None
    from pikeclient.tracking import store_rows

    if not store_rows.usable(store):
        return None, None
    return (store_rows.SeriesRows(store, run.run_id),
            store_rows.TraceRows(store, run.experiment_id, run.run_id) if traces else None)


def _series(records: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """Per-call latency and completion tokens of answered, measured calls (step = prompt index)."""
    metrics = []
    for record in records:
        if record["error"] is None and not record.get("cached"):
            when = int(record["start_time"] * 1000)
            metrics.append(Metric(SERIES_LATENCY, record["latency_s"], when, record["index"]))
            if record["usage"]["completion_tokens"] is not None:
                metrics.append(Metric(SERIES_TOKENS, record["usage"]["completion_tokens"], when,
                                      record["index"]))
    return metrics


def sidecar_main(conn: Any) -> None:
    """The tracking process (see pikeclient.tracking.sidecar): open the store, run the run, log calls as they come.

    Messages: ``setup`` (store and experiment; answered ``ready`` or ``error``), ``begin`` (the run is
    created, or reopened when resuming, with the measured start; answered ``run``), ``calls``, then
    ``finish`` (answered ``done``) or ``end``. If the experiment process dies, the run ends KILLED.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the experiment's; it says how the run ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is SIGTERM to the process group: the experiment ends the run
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        _, setup = conn.recv()
    except (EOFError, OSError):  # the experiment stopped before it was ready to start a run
        return
    try:
        uri = setup["tracking_uri"]
        outage = Outage(uri, setup.get("reconnect_timeout", 600.0))
        client = open_client(uri, setup["artifact_root"])
        if is_server_uri(uri):  # a server may go away mid-run: wait for it instead of failing
            client = Reconnecting(client, outage)
        experiment_id = get_or_create_experiment(client, setup["experiment_name"], setup["artifact_root"])
        if is_server_uri(uri) and setup["traces"]:
            ask_server_version(client)
        end_orphaned_runs(client, experiment_id)
        if setup.get("resume_run_id"):
            _check_resumable(client, setup["resume_run_id"], experiment_id)
    except Exception as error:  # noqa: BLE001 - reported to the experiment as one line
        _answer(conn, "error", one_line(error))
        return
    gc.collect()  # MLflow's modules out of the collector's sight: its full passes took 0.2-0.35 s each
    gc.freeze()
    _answer(conn, "ready", experiment_id)
    run: MlflowRun | None = None
    calls: CallLogger | None = None
    status = "KILLED"  # unless told otherwise: the experiment process died
    buffer: list = []
    scored: list = []  # the calls' scores, attached to their traces once every trace is written
    inbox = Inbox(conn)  # read all along: the experiment's sends never wait on this process's writing
    writer: Background | None = None  # writes the calls while they run, on CPU no call wants
    written = time.monotonic()  # when calls were last handed to the writer
    try:
        while True:
            timeout = written + WRITE_EVERY_S - time.monotonic() if buffer else None
            try:
                message = inbox.get(timeout)
            except queue.Empty:  # nothing more came for a while: write what came
                writer.put(buffer)
                buffer, written = [], time.monotonic()
                continue
            if message is None:  # the experiment process is gone
                break
            if message[0] == "begin":  # created at once: a resume after a kill finds the run and its run.json
                run, calls = _begin(client, experiment_id, setup, outage, start_time_ms=message[1])
                writer = Background(calls, setup.get("live_cpu", 1.0))
                _answer(conn, "run", run.run_id)
            elif message[0] == "calls":
                buffer.extend(message[1])
                if len(buffer) >= WRITE_BATCH:
                    writer.put(buffer)
                    buffer, written = [], time.monotonic()
            elif message[0] == "assessments":
                scored.extend(message[1])
                if run is not None:  # every call is written first: its trace is there for its scores
                    calls.write(writer.stop() + buffer)
                    buffer = []
                    _assess(run, calls, setup, scored)
                    scored = []
            elif message[0] == "finish":
                if run is None:  # no measured part (every prompt was answered before): still one run
                    run, calls = _begin(client, experiment_id, setup, outage, start_time_ms=message[3])
                    _answer(conn, "run", run.run_id)
                calls.write((writer.stop() if writer else []) + buffer)  # the rest, at this thread's priority
                buffer = []
                calls.close()
                _assess(run, calls, setup, scored)
                _, metrics, tags, end_time_ms, records_path, output_dir, log_records, status = message
                run.log_tags(tags)
                run.log_results(metrics, Path(records_path), Path(output_dir), log_records=log_records)
                cost = {METRIC_CPU: own_cpu_s(), METRIC_CALLS_CPU: calls.cpu_s}
                run.log_metrics(cost)
                run.end(status, end_time_ms)  # before answering: the experiment need not wait for this process
                status = "ENDED"
                _answer(conn, "done", {"run_id": run.run_id, **cost})
                return
            elif message[0] == "end":
                status = message[1]
                break
    except Exception as error:  # noqa: BLE001 - the run is marked FAILED and the reason sent back
        status = "FAILED"
        log.error("tracking failed: %s", error)
        _answer(conn, "error", one_line(error))
        inbox.read_to_the_end()
    finally:
        if run is not None and status != "ENDED":
            with contextlib.suppress(Exception):
                # what arrived before a failure or a kill is still logged
                calls.write((writer.stop(raise_error=False) if writer else []) + buffer)
                calls.close()
            run.end(status)


class Background:
    """Writes batches of calls (``CallLogger.write``) in a thread of its own, at the lowest CPU priority,
    while the calls run.

    Series and traces cost this process about 0.2 ms of CPU a call; at 1,000 calls a second on two
    cores that was CPU the calls' workers lacked (dispatch delay p99 of 50-200 ms). At idle priority
    (``SCHED_IDLE``, where the OS has it) the writing uses only CPU no other process wants: the calls
    keep their timing, and where they fill the machine it is done after them. Idle priority was not
    enough on its own: on this 2-core VM a writer busy a quarter of a core beside the calls still cost them
    (dispatch delay p99 1.6-1.9 ms at 1,000/s with 2 workers, against 1.3-1.5 ms with the writing left to
    the end; the cores' caches and the hypervisor are shared whatever the priority). So it also keeps to
    ``share`` of one core (``tracking.live_cpu``, 0.1 by default): after each chunk it pauses in
    proportion to the CPU the chunk took (1.21-1.35 ms at 0.1). At the rates of LLM servers it keeps up
    (0.1 core writes ~400 calls a second); past that the rest waits for the end of the calls.
    A lowered thread cannot be raised again: ``stop`` waits for the chunk under way (``CHUNK`` calls,
    one transaction) and hands back the rest, for the caller to write at normal priority.
    """

    CHUNK = 250

    def __init__(self, calls: CallLogger, share: float = 1.0) -> None:
        self.calls = calls
        self.batches: queue.SimpleQueue = queue.SimpleQueue()
        self.left: list = []  # not written when told to stop
        self.stopping = False
        self.error: BaseException | None = None
        self.share = share
        self.woken = threading.Event()  # set by stop: no more pauses
        self.thread = threading.Thread(target=self._write, name="tracking-writer", daemon=True)
        self.thread.start()

    def put(self, batch: list) -> None:
        """Write ``batch`` when there is CPU to spare; raises what made an earlier write fail."""
        if self.error is not None:
            raise self.error
        if self.stopping:  # calls after the scores (a rerun's last ones): written now, at normal priority
            self.calls.write(batch)
        else:
            self.batches.put(batch)

    def stop(self, raise_error: bool = True) -> list:
        """Wait for the chunk under way; returns the calls not written yet (in order)."""
        if not self.stopping:
            self.stopping = True
            self.woken.set()
            self.batches.put(None)
            self.thread.join()
        left, self.left = self.left, []
        if self.error is not None and raise_error:
            raise self.error
        return left

    def _write(self) -> None:
        lowest_priority()
        while (batch := self.batches.get()) is not None:
            for start in range(0, len(batch), self.CHUNK):
                if self.stopping or self.error is not None:
                    self.left.extend(batch[start:])
                    break
                began = time.thread_time()
                try:
                    self.calls.write(batch[start : start + self.CHUNK])
                except Exception as error:  # noqa: BLE001 - raised in the main thread (put, stop)
                    self.error = error
                    self.left.extend(batch[start:])  # tried again after a failure, as before (finally)
                    break
                if self.share < 1.0:  # a pause after each chunk keeps this thread's CPU to its share
                    self.woken.wait((time.thread_time() - began) * (1.0 / self.share - 1.0))


def lowest_priority() -> None:
    """This thread runs only on CPU no other thread wants (Linux's ``SCHED_IDLE``; else niceness 19, for
    this thread alone on Linux; elsewhere nothing, as ``os.nice`` would lower the whole process)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _assess(run: MlflowRun, calls: CallLogger, setup: Mapping[str, Any], scored: list) -> None:
    """Attach the calls' scores and expectations to their traces (written before)."""
    if scored and calls.traces and not calls.traces_failed:
        source = str((setup.get("dataset") or {}).get("name") or "dataset")
        logger = AssessmentLogger(run.client, run.experiment_id, run_id=run.run_id, expectations_source=source,
                                  store=calls.store)
        log_call_assessments(logger, run.run_id, scored)


def ask_server_version(client: Any) -> None:
    """A tracking server's REST store asks the server's version before its first span batch and keeps a
    failed answer for good (no more traces for the process); ask at set-up, while the server answers
    and before any run exists that an outage could interrupt."""
    store = client._tracking_client.store
    server_version = getattr(store, "_get_server_version", None)
    if server_version is not None:
        server_version(store.get_host_creds())


def _check_resumable(client: MlflowClient, run_id: str, experiment_id: str) -> None:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise MlflowException(f"run {run_id} to resume is not in this store") from None
    if run.info.experiment_id != experiment_id:
        raise MlflowException(f"run {run_id} to resume belongs to another experiment")


def _begin(client: MlflowClient, experiment_id: str, setup: Mapping[str, Any], outage: Outage,
           start_time_ms: int) -> tuple[MlflowRun, CallLogger]:
    """Create the run (or reopen the one being resumed) and record its id in the job's run.json."""
    resume = setup.get("resume_run_id")
    owner = owner_tags(os.getppid())  # the experiment process: when it is gone, the run is over
    adopted = None if resume or not setup.get("resuming") else _unrecorded_run(client, experiment_id, setup)
    if resume:
        run = MlflowRun.reopen(client, experiment_id, resume, owner, outage)
    elif adopted:
        run = MlflowRun.reopen(client, experiment_id, adopted, owner, outage)
    else:
        run = MlflowRun.create(client, experiment_id, run_name=setup["run_name"], tags={**setup["tags"], **owner},
                               start_time_ms=start_time_ms, outage=outage)
    write_job_file(setup["output_dir"], run_id=run.run_id, tracking_uri=setup["tracking_uri"])
    if not resume:  # an adopted run may have been stopped before its params were logged: those it lacks
        params = {**flatten(setup["config"]), **flatten({"client": setup["client"]})}
        earlier = client.get_run(adopted) if adopted else None
        if earlier is not None:
            params = {k: v for k, v in params.items() if k not in earlier.data.params}
        run.log_params(params)
        if setup.get("dataset") and not (earlier is not None and earlier.inputs.dataset_inputs):
            run.log_dataset(setup["dataset"])
    calls = CallLogger(run, setup["client"], traces=setup["traces"])
    if resume or adopted:
        calls.logged = run.logged_steps(SERIES_LATENCY)
    return run, calls


def _unrecorded_run(client: MlflowClient, experiment_id: str, setup: Mapping[str, Any]) -> str | None:
    """A run made for this job folder by an attempt stopped before it wrote the run's id to run.json (a
    launcher's worker killed in between): resumed, the job completes that run instead of leaving it
    KILLED beside a second one under the sweep's parent."""
    folder = setup["tags"].get("pikeclient.output_dir", "")
    if not folder or "'" in folder:
        return None
    runs = client.search_runs([experiment_id], f"tags.`pikeclient.output_dir` = '{folder}' and "
                              "attributes.status != 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def own_cpu_s() -> float:
    """This process's CPU seconds so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _answer(conn: Any, kind: str, value: Any) -> None:
    with contextlib.suppress(OSError):  # the experiment may have ended already
        conn.send((kind, value))


class Inbox:
    """The experiment's messages, read by a thread of their own as they arrive.

    Writing a batch of calls (series and traces) takes this process a while; the experiment's sends must
    not wait for it: a full socket blocked the experiment's event loop for up to 0.3 s at 1,000 calls a
    second (every request due then went late). The thread also keeps reading while a tracking server is
    unreachable. ``get`` returns None at the pipe's end (the experiment process is gone).
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="inbox", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.queue.put(self.conn.recv())
        except (EOFError, OSError):
            self.queue.put(None)

    def get(self, timeout: float | None = None) -> Any:
        """The next message (None at the end); ``queue.Empty`` if none came within ``timeout`` seconds."""
        return self.queue.get(timeout=None if timeout is None else max(timeout, 0.0))

    def read_to_the_end(self) -> None:
        """After a failure, keep reading (and dropping) the experiment's calls: its calls go on to the end,
        every record reaches its records file, and it learns that tracking failed when it finishes."""
        while (message := self.get()) is not None and message[0] not in ("finish", "end"):
            pass


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def end_run(uri: str, run_id: str, status: str) -> None:
    """``python -m pikeclient.tracking.process end URI RUN_ID STATUS``: end a run whose tracking process died."""
    open_client(uri).set_terminated(run_id, status)


if __name__ == "__main__":
    if sys.argv[1] == "end":
        end_run(*sys.argv[2:5])
    else:
        from multiprocessing.connection import Connection

        for key, value in TRACKING_PROCESS_HTTP_ENV.items():  # a request to a server gives up in seconds
            os.environ.setdefault(key, value)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # a line per retry; Outage says it once
        sidecar_main(Connection(int(sys.argv[1])))
