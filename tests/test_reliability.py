"""Faults, resume after a crash, Ctrl-C, rate limits, bad input and secrets, end to end."""

import base64
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest

from pikeclient.cli import secret_overrides
from pikeclient.core.ratelimit import RateLimiter
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, REPO, files_containing, mlflow_runs, run_py

RETRY_AFTER = 0.05


def write_dataset(path, n):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i} asks something"}) + "\n")
    return path


def read_records(root):
    [path] = (root / "runs" / "outputs").rglob("records.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def openai_args(server, dataset, *extra):
    return ("llm=openai", f"llm.base_url={server.url}/v1", f"dataset.path={dataset}", "retry.initial_delay=0.01",
            "retry.max_delay=0.05", *extra)


def test_mixed_faults_every_prompt_has_exactly_one_record(tmp_path):
    faults = FaultPlan(rates={"429": 0.15, "500": 0.05, "503": 0.05, "drop": 0.05, "hang": 0.03, "malformed": 0.03,
                              "cut_stream": 0.04}, retry_after=RETRY_AFTER, hang_s=3, seed=7)
    dataset = write_dataset(tmp_path / "prompts.jsonl", 300)
    with FakeLLMServer(api_key=API_KEY, faults=faults) as server:
        proc = run_py(*openai_args(server, dataset, "llm.stream=true", "llm.timeout=0.5", "retry.max_attempts=4",
                                   "experiment.concurrency=16"), cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
        log = list(server.log)
    assert proc.returncode == 0, proc.stderr
    records = read_records(tmp_path)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(300))

    sent = Counter(request.prompt for request in log)
    for record in records:
        assert sent[record["prompt"]] == record["attempts"], record  # never more requests than attempts
        assert (record["error"] is None) == (record["response"] is not None)
        assert record["response"] != "" or record["error"] is None
    failed = [r for r in records if r["error"]]
    # "malformed" on a stream is JSON where an event stream was asked for: a protocol error, retried once
    assert {r["error_kind"] for r in failed} <= {"rate_limit", "server", "connection", "timeout", "protocol"}

    by_prompt = defaultdict(list)
    for request in log:
        by_prompt[request.prompt].append(request)
    waits = [b.time - a.time for requests in by_prompt.values() for a, b in zip(requests, requests[1:])
             if a.fault == "429"]
    assert waits and min(waits) >= RETRY_AFTER * 0.98  # server-side: the client waited as told


def test_sigint_stops_cleanly_and_marks_the_run_killed(tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 200)
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *openai_args(server, dataset)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(server.log) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "KILLED"
    records = read_records(tmp_path)
    assert 0 < len(records) < 200 and len({r["id"] for r in records}) == len(records)
    assert "experiment.resume=" in stderr


def test_auth_error_stops_the_run_at_once(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 100)
    proc = run_py(*openai_args(server, dataset, "experiment.concurrency=4"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": "sk-wrong-PLANTED-key-123456"})
    assert proc.returncode == 1
    assert "auth error" in proc.stderr and "stopped after" in proc.stderr
    assert len(server.log) <= 8  # the calls already in flight, not 100
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED"
    assert files_containing(tmp_path, "sk-wrong-PLANTED-key-123456") == []


def test_fail_fast_stops_at_a_non_retryable_error(server, tmp_path):
    server.faults = FaultPlan(script=["ok"] * 5 + ["400"])
    dataset = write_dataset(tmp_path / "prompts.jsonl", 100)
    proc = run_py(*openai_args(server, dataset, "experiment.concurrency=1", "experiment.fail_fast=true"),
                  cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 1 and "bad_request error on prompt 'q5'" in proc.stderr
    assert len(server.log) == 6


def test_without_fail_fast_errors_are_recorded_and_the_run_goes_on(server, tmp_path):
    server.faults = FaultPlan(script=["ok"] * 5 + ["400"])
    dataset = write_dataset(tmp_path / "prompts.jsonl", 20)
    proc = run_py(*openai_args(server, dataset, "experiment.concurrency=1"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    records = read_records(tmp_path)
    assert [r["error_kind"] for r in records].count("bad_request") == 1 and len(records) == 20
    assert "bad_request=1" in proc.stdout


def test_requests_per_minute_limit_paces_calls():
    limiter = RateLimiter(requests_per_minute=600)  # 10 s worth = 100 at once, then 10 a second
    start = time.monotonic()
    for _ in range(105):
        limiter.acquire()
    assert 0.4 <= time.monotonic() - start <= 1.5


def test_tokens_per_minute_counts_prompt_plus_max_tokens(server, api_env):
    from pikeclient.backends.openai import OpenAIClient

    client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", sampling={"max_tokens": 50},
                          rate_limit={"tokens_per_minute": 3600})  # 600 tokens at once, 60 a second
    start = time.monotonic()
    results = [client.chat([{"role": "user", "content": "hi"}]) for _ in range(12)]  # ~60 tokens each
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed <= 4
    assert sum(r.throttle_s for r in results) > 0.4 and all(r.latency_s < 0.5 for r in results)


def test_call_deadline_cuts_a_hanging_attempt(api_env):
    import asyncio

    from pikeclient.backends.openai import OpenAIClient
    from pikeclient.core.errors import LLMTimeoutError

    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={"hang": 1.0}, hang_s=5)) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", timeout=30, retry={"deadline": 0.3})
        start = time.monotonic()
        with pytest.raises(LLMTimeoutError, match="deadline"):
            asyncio.run(client.achat([{"role": "user", "content": "hi"}]))
        assert time.monotonic() - start < 2


def test_prompt_longer_than_the_context_window(tmp_path, tiny_model):
    (tmp_path / "long.jsonl").write_text(json.dumps({"id": "huge", "prompt": "word " * 3000}) + "\n")
    proc = run_py("llm=hf_meta_llama", f"llm.model={tiny_model}", "dataset.path=long.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    assert "dataset prompt 'huge'" in proc.stderr and "context window" in proc.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_secret_detection_leaves_ordinary_overrides_alone():
    args = ["llm=openai", "llm.api_key_env=MY_KEY", "sampling.max_tokens=64", "llm.model=gpt-4o"]
    assert secret_overrides(args, {"MY_KEY": "sk-1234567890abcdef"}) == []
    assert secret_overrides(["llm.model=sk-1234567890abcdef"], {"MY_KEY": "sk-1234567890abcdef"}) == ["llm.model"]


def _popen(args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MLFLOW_TRACKING_URI"}
    env.update(env_extra or {"OPENAI_API_KEY": API_KEY})
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_runs_started_together_never_share_a_folder_and_create_the_store_once(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 20)
    procs = [_popen(openai_args(server, dataset, "tracking.traces=false"), tmp_path) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    files = list((tmp_path / "runs" / "outputs").rglob("records.jsonl"))
    assert len({f.parent for f in files}) == 3
    for f in files:
        assert sorted(json.loads(line)["id"] for line in f.read_text().splitlines()) == sorted(f"q{i}" for i in range(20))
    assert sorted(r["status"] for r in mlflow_runs(tmp_path / "runs")) == ["FINISHED"] * 3


def test_two_sweeps_started_together_keep_their_jobs_apart(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 4)
    args = ("-m", *openai_args(server, dataset, "sampling.temperature=0,0.5", "tracking.traces=false"))
    procs = [_popen(args, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    runs = mlflow_runs(tmp_path / "runs")
    parents = [r for r in runs if r["tags"].get("pikeclient.role") == "sweep"]
    children = [r for r in runs if r not in parents]
    assert [p["status"] for p in parents] == ["FINISHED"] * 2
    assert len(children) == 4 and all(c["status"] == "FINISHED" for c in children)
    assert len(list((tmp_path / "runs" / "multirun").rglob("records.jsonl"))) == 4


def test_the_store_survives_a_kill_during_its_creation(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 3)
    runs = tmp_path / "runs"
    proc = _popen(openai_args(server, dataset), tmp_path)
    _wait_for(lambda: list(runs.glob(".mlflow.db.*.tmp*")) or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGKILL)  # the experiment and its tracking process, mid-migration
    proc.communicate()
    again = run_py(*openai_args(server, dataset), cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in mlflow_runs(runs)] == ["FINISHED"]


def test_sigterm_to_the_process_group_stops_like_ctrl_c(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 300)
    server.latency = 0.05
    proc = _popen(openai_args(server, dataset, "experiment.concurrency=2"), tmp_path)
    _wait_for(lambda: len(server.log) >= 20)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "KILLED"
    records = read_records(tmp_path)
    assert 0 < len(records) < 300 and len({r["id"] for r in records}) == len(records)


def test_a_run_whose_processes_were_killed_is_marked_killed_on_next_use(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 300)
    server.latency = 0.05
    proc = _popen(openai_args(server, dataset, "experiment.concurrency=2"), tmp_path)
    _wait_for(lambda: len(server.log) >= 20)
    os.killpg(proc.pid, signal.SIGKILL)  # nobody is left to end the run
    proc.communicate()
    [orphan] = mlflow_runs(tmp_path / "runs")
    assert orphan["status"] == "RUNNING"
    server.latency = 0.0
    again = run_py(*openai_args(server, dataset, "dataset.limit=2"), cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert again.returncode == 0, again.stderr
    statuses = {r["id"]: r["status"] for r in mlflow_runs(tmp_path / "runs")}
    assert statuses[orphan["id"]] == "KILLED" and sorted(statuses.values()) == ["FINISHED", "KILLED"]


def _tracking_processes(parent_pid):
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
            cmdline = open(stat.replace("stat", "cmdline"), "rb").read()
        except OSError:
            continue
        if int(fields[1]) == parent_pid and b"pikeclient.tracking.process" in cmdline:
            found.append(int(stat.split("/")[2]))
    return found


def test_a_tracking_process_dying_mid_run_fails_the_run_clearly(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 300)
    server.latency = 0.05
    proc = _popen(openai_args(server, dataset, "experiment.concurrency=2"), tmp_path)
    _wait_for(lambda: len(server.log) >= 20)
    [tracker] = _tracking_processes(proc.pid)
    os.kill(tracker, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert "the tracking process stopped" in stderr and "Traceback" not in stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED"


def test_keys_never_leave_the_process_whatever_path_they_take(tmp_path):
    # A key in a header, in a URL's user:key@ and echoed back by the server's 401 body.
    wrong, header = "sk-wrong-PLANTED-key-123456", "sk-header-PLANTED-999999"
    (tmp_path / "conf" / "llm").mkdir(parents=True)
    with FakeLLMServer(api_key=API_KEY, echo_key=True) as server:
        url = server.url.replace("http://", f"http://user:{API_KEY}@")
        (tmp_path / "conf" / "llm" / "leaky.yaml").write_text(
            "defaults: [openai]\n"
            f"base_url: {url}/v1\n"
            f"default_headers: {{X-Api-Key: {API_KEY}, Authorization: 'Bearer {header}'}}\n")
        proc = run_py("--config-dir", str(tmp_path / "conf"), "llm=leaky", "dataset.limit=3",
                      cwd=tmp_path, env={"OPENAI_API_KEY": wrong})
    assert proc.returncode == 1 and "auth error" in proc.stderr
    runs = tmp_path / "runs"
    basic = base64.b64encode(f"user:{API_KEY}".encode()).decode()  # user:key@ travels as a Basic header
    for secret in (wrong, header, API_KEY, basic):
        assert secret not in proc.stderr + proc.stdout
        assert files_containing(runs, secret) == []
    records = read_records(tmp_path)
    assert any("***" in (r["error"] or "") for r in records)  # the echoed key, masked
    for run in mlflow_runs(runs):
        text = json.dumps(run)
        assert wrong not in text and API_KEY not in text and header not in text
