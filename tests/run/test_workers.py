"""load.workers: one run's calls made by worker processes (or Ray actors) under one schedule, with one
records file, one set of statistics and one MLflow run, meaning what a one-process run's mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pikeclient.run.load import build_strategy
from pikeclient.run.workers import choose_workers, shares
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, REPO, files_containing, mlflow_runs, run_py
from tests.tracking.test_scaleout import ray_head_node

ENV = {"OPENAI_API_KEY": API_KEY}


def write_dataset(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i} asks something"}) + "\n")
    return path


def records_of(root: Path) -> list[dict]:
    [path] = (root / "runs" / "outputs").rglob("records.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def args(server, dataset, *extra) -> tuple[str, ...]:
    return ("llm=openai", f"llm.base_url={server.url}/v1", f"dataset.path={dataset}", *extra)


def worker_processes(pid: int) -> list[int]:
    """The worker processes (``python -m pikeclient.run.worker``) whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parent = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        if int(parent) == pid and b"pikeclient.run.worker" in command:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_how_many_workers_a_run_gets():
    closed, wide = build_strategy("concurrency", concurrency=8), build_strategy("concurrency", concurrency=256)
    fast, slow = build_strategy("constant", rate=1000.0), build_strategy("constant", rate=5.0)
    assert choose_workers(3, "processes", closed, computes_locally=False) == 3  # as asked
    assert choose_workers(None, "processes", closed, computes_locally=False) == 1
    assert choose_workers(None, "processes", slow, computes_locally=False) == 1
    cores = len(os.sched_getaffinity(0))
    assert choose_workers(None, "processes", fast, computes_locally=False) == min(3, cores)
    assert choose_workers(None, "processes", wide, computes_locally=False) == min(4, cores)
    assert choose_workers(None, "processes", wide, computes_locally=True) == 1  # a local model's CPU is the model's
    assert shares(8, 3) == [3, 3, 2] and shares(2, 4) == [1, 1]  # no worker without a slot


@pytest.mark.parametrize(("overrides", "message"), [
    (("load.workers=0",), "load.workers=0 is out of range: allowed >= 1"),
    (("load.backend=threads",), "load.backend='threads': allowed processes, ray"),
    (("load.ray_address=127.0.0.1:6379",), "load.ray_address=127.0.0.1:6379 applies to load.backend=ray"),
])
def test_bad_worker_settings_fail_before_anything_starts(server, tmp_path, overrides, message):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 5)
    proc = run_py(*args(server, dataset, *overrides), cwd=tmp_path, env=ENV)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(server.log) == 0
    assert not (tmp_path / "runs" / "mlflow.db").exists() or mlflow_runs(tmp_path / "runs") == []


@pytest.mark.parametrize("load", [("load.concurrency=8",), ("load=constant", "load.rate=150")],
                         ids=["closed loop", "open loop"])
def test_a_run_with_two_workers_records_what_a_one_process_run_records(tmp_path, load):
    n = 150
    dataset = write_dataset(tmp_path / "prompts.jsonl", n)
    runs = {}
    with FakeLLMServer(api_key=API_KEY, latency=0.02) as server:
        for workers in (1, 2):
            folder = tmp_path / f"workers-{workers}"
            folder.mkdir()
            proc = run_py(*args(server, dataset, *load, f"load.workers={workers}"), cwd=folder, env=ENV)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[workers] = (records_of(folder), mlflow_runs(folder / "runs"), proc)
        received = Counter(r.prompt for r in server.log)
    one, two = runs[1][0], runs[2][0]
    assert sorted(r["id"] for r in two) == sorted(r["id"] for r in one) == sorted(f"q{i}" for i in range(n))
    assert {frozenset(r) for r in two} == {frozenset(r) for r in one}  # the same fields, every record
    assert {r["id"]: r["response"] for r in two} == {r["id"]: r["response"] for r in one}
    assert all(r["error"] is None and r["latency_s"] >= 0.02 for r in two)
    assert set(received.values()) == {2}  # every prompt sent once by each run
    [run_one], [run_two] = runs[1][1], runs[2][1]
    assert run_one["status"] == run_two["status"] == "FINISHED"
    def measured(run):  # intervals are reported only where the sample supports them: not a matter of workers
        return {key for key in run["metrics"] if "_ci_" not in key}

    assert measured(run_two) == measured(run_one)
    assert run_one["tags"]["pikeclient.workers"] == "1" and run_two["tags"]["pikeclient.workers"] == "2"
    assert run_one["tags"]["pikeclient.traces"] == run_two["tags"]["pikeclient.traces"] == str(n)
    assert "2 worker processes" in runs[2][2].stderr
    if "load=constant" in load:  # each request went when the parent's schedule said, and says how late
        assert sorted(round(r["scheduled_s"] * 150) for r in two) == list(range(n))
        assert all(0 <= r["dispatch_delay_s"] < 5 for r in two)
        assert all(r["latency_from_schedule_s"] >= r["latency_s"] for r in two)


def test_an_auth_error_stops_every_worker(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 100)
    proc = run_py(*args(server, dataset, "load.concurrency=4", "load.workers=2"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": "sk-wrong-PLANTED-key-123456"})
    assert proc.returncode == 1 and "auth error" in proc.stderr and "stopped after" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(server.log) <= 8  # the calls already in flight in either worker, not 100
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED"
    assert files_containing(tmp_path, "sk-wrong-PLANTED-key-123456") == []


def test_ctrl_c_with_workers_then_resume_calls_only_what_is_missing(tmp_path):
    n = 300
    dataset = write_dataset(tmp_path / "prompts.jsonl", n)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | ENV
    with FakeLLMServer(api_key=API_KEY, latency=0.1) as server:
        run = (*args(server, dataset, "load.concurrency=8", "load.workers=2"),)
        # Its own session: Ctrl-C in a terminal reaches the whole foreground group, workers included.
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *run], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_until(lambda: len(server.log) >= 40, 120, "the first calls")
            workers = worker_processes(proc.pid)
            assert len(workers) == 2
            os.killpg(proc.pid, signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert not any(alive(pid) for pid in workers)  # the run waited for its workers
        first = records_of(tmp_path)
        assert 0 < len(first) < n and len({r["id"] for r in first}) == len(first)
        assert len(server.log) - len(first) <= 8  # what was cut off in flight (no record: a resume calls it)
        [mlflow_run] = mlflow_runs(tmp_path / "runs")
        assert mlflow_run["status"] == "KILLED"
        before = Counter(r.prompt for r in server.log)
        again = run_py(*run, "experiment.resume=latest", cwd=tmp_path, env=ENV)
        assert again.returncode == 0, again.stderr[-3000:]
        after = Counter(r.prompt for r in server.log) - before
    records = records_of(tmp_path)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(n))  # every prompt once
    answered_first = {r["prompt"] for r in first}
    assert not answered_first & set(after)  # nothing answered before was called again
    assert sum(after.values()) == n - len(first)
    [mlflow_run] = mlflow_runs(tmp_path / "runs")
    assert mlflow_run["status"] == "FINISHED" and mlflow_run["tags"]["pikeclient.workers"] == "2"


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback for this test alone: stopped (by its process group) before the next test, so
    that no second head runs beside the launcher tests' own."""
    with ray_head_node(False, tmp_path / "ray-node") as node:
        yield node


def test_ray_workers_on_a_local_head_record_every_prompt_once(server, ray_head, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 60)
    proc = run_py(*args(server, dataset, "load.concurrency=4", "load.backend=ray", "load.workers=2",
                        f"load.ray_address={ray_head.address}"),
                  cwd=tmp_path, env={**ray_head.driver_env, **ENV}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 worker Ray actors" in proc.stderr
    records = records_of(tmp_path)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(60))
    assert all(r["error"] is None for r in records)
    assert Counter(r.prompt for r in server.log) == Counter(r["prompt"] for r in records)
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["tags"]["pikeclient.workers"] == "2"


def test_ray_without_a_cluster_says_so_in_one_line(server, tmp_path):
    pytest.importorskip("ray")
    dataset = write_dataset(tmp_path / "prompts.jsonl", 5)
    proc = run_py(*args(server, dataset, "load.backend=ray", "load.workers=2", "load.ray_address=127.0.0.1:1"),
                  cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode != 0 and "load.backend=ray: no Ray cluster at 127.0.0.1:1" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(server.log) == 0
    assert {r["status"] for r in mlflow_runs(tmp_path / "runs")} <= {"FAILED"}
