"""The tracking process as the experiment drives it (TrackingSidecar): calls reach the store while the run
goes on, and what the process cost comes back with the finished run."""

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
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


def test_a_stopped_tracking_process_never_holds_up_the_experiment(sidecar, tmp_path):
    """The experiment's sends go through a thread of its own: with the tracking process frozen (SIGSTOP),
    calls worth a hundred times a socket's buffer are queued without waiting, and all reach the store
    once it runs again."""
    tracking, client = sidecar
    tracking.begin(time.time())
    tracking._expect("run")
    big = SimpleNamespace(messages=[{"role": "user", "content": "x" * 10_000}])
    records = [record(n) for n in range(2_000)]  # 20 MB of messages
    os.kill(tracking.process.pid, signal.SIGSTOP)
    try:
        adding = threading.Thread(target=lambda: [tracking.add(r, big) for r in records], daemon=True)
        adding.start()
        adding.join(120)  # a hang guard: a blocked send would wait here until the process runs again
        assert not adding.is_alive(), "add() waited for the stopped tracking process"
    finally:
        os.kill(tracking.process.pid, signal.SIGCONT)
    finish(tracking, tmp_path, records)
    assert len(client.get_metric_history(tracking.run_id, SERIES_LATENCY)) == 2_000
    assert client.get_run(tracking.run_id).info.status == "FINISHED"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_the_calls_are_written_at_idle_priority_and_the_rest_at_normal(sidecar, tmp_path):
    """While the calls run, the thread writing them is SCHED_IDLE (it takes no CPU a call wants); the
    process's main thread, which finishes the run, keeps the normal policy."""
    tracking, client = sidecar
    tracking.begin(time.time())
    tracking._expect("run")
    pid = tracking.process.pid

    def policies():  # field 41 of /proc/PID/task/TID/stat: 0 SCHED_OTHER, 5 SCHED_IDLE
        found = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[38])
        return found

    deadline = time.monotonic() + 30
    while 5 not in policies().values():
        assert time.monotonic() < deadline, policies()
        time.sleep(0.1)
    assert policies()[pid] == 0
    records = [record(n) for n in range(300)]
    for r in records:
        tracking.add(r, SimpleNamespace(messages=MESSAGES))
    finish(tracking, tmp_path, records)
    assert len(client.get_metric_history(tracking.run_id, SERIES_LATENCY)) == 300


def test_a_run_that_fails_while_it_is_set_up_lets_the_calls_go_on_and_fails_at_their_end(tmp_path):
    # Past tracking.reconnect_timeout a server gone while open_run sets the run up (tests/tracking/
    # test_scaleout.py hit it by chance once the run was made before the calls): as when it goes later, the
    # calls go on with their records on disk, and finish raises the tracking process's error in one line.
    # Here the run's job file cannot be written: the same answer, deterministically.
    from pikeclient.core.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    tracking = TrackingSidecar()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.start({"tracking_uri": uri, "experiment_name": "sidecar", "run_name": "calls", "tags": {},
                    "artifact_root": str(tmp_path / "artifacts"), "config": {}, "traces": True,
                    "client": {"provider": "openai", "model": "gpt-4o-mini"},
                    "output_dir": str(tmp_path / "a-file" / "job"), "resume_run_id": None, "resuming": False,
                    "reconnect_timeout": 5.0, "dataset": {}})
    try:
        tracking.wait_ready()
        tracking.open_run()  # does not raise: the calls are about to start
        records = [record(n) for n in range(100)]
        for r in records:
            tracking.add(r, SimpleNamespace(messages=MESSAGES))
        with pytest.raises(ConfigError, match=r"^tracking: .*a-file"):
            finish(tracking, tmp_path, records)
        assert tracking.process.wait(60) is not None  # and the tracking process is gone
    finally:
        tracking.end("KILLED")
