"""The tracking process as the experiment drives it (TrackingSidecar): calls reach the store while the run
goes on, and what the process cost comes back with the finished run."""

import json
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from pikeclient.tracking.process import SERIES_LATENCY
from pikeclient.tracking.sidecar import METRIC_CALLS_CPU, METRIC_CPU, TrackingSidecar

MESSAGES = [{"role": "user", "content": "hello"}]


def record(n):
    return {"index": n, "id": f"p{n}", "prompt": "hello", "start_time": time.time(), "latency_s": 0.1, "attempts": 1,
            "error": None, "response": "hi", "finish_reason": "stop", "cached": False,
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "source": "server"}}


@pytest.fixture
def sidecar(tmp_path):
    tracking = TrackingSidecar()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.start({"tracking_uri": uri, "experiment_name": "sidecar", "run_name": "calls", "tags": {},
                    "artifact_root": str(tmp_path / "artifacts"), "config": {}, "traces": True,
                    "client": {"provider": "openai", "model": "gpt-4o-mini"}, "output_dir": str(tmp_path),
                    "resume_run_id": None, "resuming": False, "reconnect_timeout": 5.0, "dataset": {}})
    tracking.wait_ready()
    yield tracking, MlflowClient(uri)
    tracking.end("KILLED")


def finish(tracking, tmp_path, records):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tracking.finish({"calls": len(records)}, {}, time.time(), path, tmp_path, log_records=False)


def test_calls_reach_the_store_while_the_run_goes_on(sidecar, tmp_path):
    tracking, client = sidecar
    tracking.begin(time.time())
    records = [record(n) for n in range(3)]
    for r in records:
        tracking.add(r, SimpleNamespace(messages=MESSAGES))
    tracking._flush()  # what the sidecar sends every 64 calls
    tracking._expect("run")  # the answer to begin
    experiment = client.get_run(tracking.run_id).info.experiment_id

    def logged():
        return (len(client.get_metric_history(tracking.run_id, SERIES_LATENCY)),
                len(client.search_traces(locations=[experiment], run_id=tracking.run_id, max_results=10)))

    deadline = time.monotonic() + 30
    while logged() != (3, 3):  # a second or so after the calls, not at the end of the run
        assert time.monotonic() < deadline, logged()
        time.sleep(0.2)
    assert client.get_run(tracking.run_id).info.status == "RUNNING"
    finish(tracking, tmp_path, records)
    assert client.get_run(tracking.run_id).info.status == "FINISHED"


def test_finish_says_what_the_tracking_process_cost(sidecar, tmp_path):
    tracking, client = sidecar
    tracking.begin(time.time())
    records = [record(n) for n in range(200)]
    for r in records:
        tracking.add(r, SimpleNamespace(messages=MESSAGES))
    finished = finish(tracking, tmp_path, records)
    # Importing MLflow alone is a second of CPU; logging 200 calls, some milliseconds.
    assert finished.run_id == tracking.run_id and finished.cpu_s > 0.5 and 0 < finished.calls_cpu_s < finished.cpu_s
    metrics = client.get_run(finished.run_id).data.metrics
    assert metrics[METRIC_CPU] == pytest.approx(finished.cpu_s) and metrics[METRIC_CALLS_CPU] == finished.calls_cpu_s
