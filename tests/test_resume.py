"""Resume, end to end: sweeps interrupted anywhere, folders owned by one process, answers matched to requests."""

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, mlflow_runs, run_py
from tests.test_reliability import _popen, _wait_for, openai_args, write_dataset

ENV = {"OPENAI_API_KEY": API_KEY}


def sweep_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs" / "multirun").rglob("sweep.json"))


def job_records(folder: Path) -> list[dict]:
    path = folder / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def by_job(log, temperatures=(0.0, 0.7)) -> dict[float, Counter]:
    """Requests per prompt, for each job of a sweep over sampling.temperature."""
    return {t: Counter(r.prompt for r in log if r.body.get("temperature", 0.0) == t) for t in temperatures}


def sweep_args(server, dataset, *extra):
    return ("-m", *openai_args(server, dataset, "sampling.temperature=0,0.7", "experiment.concurrency=2",
                               "tracking.traces=false", *extra))


def interrupt(proc, how):
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    else:  # the whole process group: nobody is left to say anything
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=120)


def job_finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "run.json").read_text()).get("status") == "FINISHED"
    except (OSError, ValueError):
        return False


# Where the sweep is stopped: during its first job (Ctrl-C), right after its first job (everything
# killed), before any job ran (everything killed as soon as the sweep had its parent run), and during
# both jobs at once in joblib's worker processes (Ctrl-C reaches the whole process group).
JOBLIB = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
POINTS = {
    "during a job": ("sigint", lambda root, server: len(server.log) >= 20, ()),
    "between jobs": ("sigkill", lambda root, server: any(job_finished(d / "0") for d in sweep_dirs(root)), ()),
    "before any job": ("sigkill", lambda root, server: any((d / "mlflow_parent_run.json").exists()
                                                           for d in sweep_dirs(root)), ()),
    "during jobs in joblib workers": ("sigint", lambda root, server: len(server.log) >= 20, JOBLIB),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_sweep_interrupted_anywhere_resumes_with_latest_and_calls_only_what_is_missing(tmp_path, point):
    how, reached, launcher = POINTS[point]
    dataset = write_dataset(tmp_path / "prompts.jsonl", 40)
    with FakeLLMServer(api_key=API_KEY, latency=0.03) as server:
        first = _popen(sweep_args(server, dataset, *launcher), tmp_path)
        _wait_for(lambda: reached(tmp_path, server) or first.poll() is not None)
        _, stderr = interrupt(first, how)
        [folder] = sweep_dirs(tmp_path)
        if how == "sigint":
            assert first.returncode == 130 and "Traceback" not in stderr
            assert f"experiment.resume={folder.relative_to(tmp_path)}\n" in stderr  # the sweep's folder, not a job's
            assert not [r for r in mlflow_runs(tmp_path / "runs") if r["status"] == "RUNNING"]  # none left RUNNING
        before = {num: {r["prompt"] for r in job_records(folder / str(num)) if r["error"] is None} for num in (0, 1)}
        mark = len(server.log)
        again = run_py(*sweep_args(server, dataset, *launcher), "experiment.resume=latest", cwd=tmp_path, env=ENV)
        second = server.log[mark:]
    assert again.returncode == 0, again.stderr
    assert sweep_dirs(tmp_path) == [folder]  # completed in its own folder
    prompts = {f"question {i} asks something" for i in range(40)}
    for num, temperature in ((0, 0.0), (1, 0.7)):
        records = job_records(folder / str(num))
        assert sorted(r["prompt"] for r in records) == sorted(prompts)  # one record per prompt
        called = by_job(second)[temperature]
        assert set(called) == prompts - before[num] and max(called.values(), default=1) == 1
    runs = mlflow_runs(tmp_path / "runs")
    [parent] = [r for r in runs if r["tags"].get("pikeclient.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent["status"] == "FINISHED"
    assert sorted(c["status"] for c in children) == ["FINISHED", "FINISHED"]
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parent["id"]}
    assert all(c["metrics"]["calls/total"] == 40 for c in children)


def test_latest_is_the_latest_sweep_of_the_same_command(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 4)
    assert run_py(*sweep_args(server, dataset), cwd=tmp_path, env=ENV).returncode == 0
    other = run_py(*sweep_args(server, dataset, "sampling.max_tokens=32"), cwd=tmp_path, env=ENV)
    assert other.returncode == 0
    first, _ = sweep_dirs(tmp_path)
    mark = len(server.log)
    again = run_py(*sweep_args(server, dataset), "experiment.resume=latest", cwd=tmp_path, env=ENV)
    assert again.returncode == 0, again.stderr
    assert len(server.log) == mark and again.stderr.count("already complete") == 2
    assert str(first) in again.stderr  # the first sweep (same command), though the other is newer
    # A job folder of the sweep, or the sweep folder, names it too.
    assert run_py(*sweep_args(server, dataset), f"experiment.resume={first / '1'}", cwd=tmp_path,
                  env=ENV).returncode == 0
    assert len(server.log) == mark
    unknown = run_py(*sweep_args(server, dataset, "sampling.top_p=0.5"), "experiment.resume=latest", cwd=tmp_path,
                     env=ENV)
    assert unknown.returncode == 1 and "no earlier sweep of this command" in unknown.stderr


def test_a_run_still_going_cannot_be_resumed_beside_it(tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 60)
    with FakeLLMServer(api_key=API_KEY, latency=0.1) as server:
        args = openai_args(server, dataset, "experiment.concurrency=1")
        running = _popen(args, tmp_path)
        _wait_for(lambda: len(server.log) >= 3)
        second = run_py(*args, "experiment.resume=latest", cwd=tmp_path, env=ENV)
        running.send_signal(signal.SIGINT)
        running.communicate(timeout=120)
        called = Counter(r.prompt for r in server.log)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is still running in process {running.pid} on host" in second.stderr
    assert max(called.values()) == 1  # no prompt was sent twice


def test_a_sweep_still_going_cannot_be_resumed_or_shared(tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 40)
    shared = tmp_path / "shared-sweep"
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        args = sweep_args(server, dataset, f"hydra.sweep.dir={shared}")
        running = _popen(args, tmp_path)
        _wait_for(lambda: len(server.log) >= 3)
        beside = run_py(*args, cwd=tmp_path, env=ENV)  # a second sweep given the same folder
        resumed = run_py(*sweep_args(server, dataset), f"experiment.resume={shared}", cwd=tmp_path, env=ENV)
        out, err = running.communicate(timeout=300)
        assert running.returncode == 0, err
        later = run_py(*args, cwd=tmp_path, env=ENV)  # the folder holds a finished sweep now
    for proc in (beside, resumed):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"sweep folder {shared} is still running in process {running.pid}" in proc.stderr
    assert later.returncode == 1 and "already holds a sweep" in later.stderr
    runs = mlflow_runs(tmp_path / "runs")
    assert len(runs) == 3 and all(r["status"] == "FINISHED" for r in runs)  # one parent, two children
    for num in (0, 1):
        assert len(job_records(shared / str(num))) == 40


def kill_midway(tmp_path, dataset, server, count=15):
    args = openai_args(server, dataset, "experiment.concurrency=1")
    proc = _popen(args, tmp_path)
    _wait_for(lambda: len(server.log) >= count)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return args


def rewrite(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("change, message", [
    ("text", "prompt 'q3' (index 3) changed since"),
    ("swap", "prompt '1' (index 0) changed since"),  # a file without ids: the line number is the id
    ("truncate", "the dataset has 36 prompts, the run in"),
    ("unanswered", "the dataset differs from the one the run in"),
    ("append", "(4 added): to call the added prompts too, resume with experiment.resume_grown=true"),
])
def test_resume_refuses_a_dataset_that_changed(server, tmp_path, change, message):
    lines = [{"prompt": f"question {i} asks something"} if change == "swap" else
             {"id": f"q{i}", "prompt": f"question {i} asks something"} for i in range(40)]
    dataset = tmp_path / "prompts.jsonl"
    rewrite(dataset, lines)
    server.latency = 0.02
    args = kill_midway(tmp_path, dataset, server)
    if change == "text":
        lines[3]["prompt"] = "another question"
    elif change == "swap":
        lines[0], lines[1] = lines[1], lines[0]
    elif change == "truncate":
        lines = lines[:36]
    elif change == "unanswered":
        lines[39]["prompt"] = "another question"
    else:
        lines += [{"id": f"new{i}", "prompt": f"new question {i}"} for i in range(4)]
    rewrite(dataset, lines)
    mark = len(server.log)
    proc = run_py(*args, "experiment.resume=latest", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(server.log) == mark


def test_a_grown_dataset_is_resumed_when_asked_and_the_added_prompts_are_called(server, tmp_path):
    lines = [{"id": f"q{i}", "prompt": f"question {i} asks something"} for i in range(40)]
    dataset = tmp_path / "prompts.jsonl"
    rewrite(dataset, lines)
    server.latency = 0.02
    args = kill_midway(tmp_path, dataset, server)
    [job] = {p.parent for p in (tmp_path / "runs" / "outputs").rglob("run.json")}
    answered = {r["prompt"] for r in job_records(job) if r["error"] is None}
    rewrite(dataset, lines + [{"id": f"new{i}", "prompt": f"new question {i}"} for i in range(4)])
    mark = len(server.log)
    proc = run_py(*args, "experiment.resume=latest", "experiment.resume_grown=true", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "4 prompts added to the dataset since" in proc.stderr
    called = Counter(r.prompt for r in server.log[mark:])
    everything = {line["prompt"] for line in lines} | {f"new question {i}" for i in range(4)}
    assert set(called) == everything - answered and max(called.values()) == 1
    assert sorted(r["prompt"] for r in job_records(job)) == sorted(everything)


def test_a_finished_run_resumed_again_calls_nothing_and_stays_as_it_was(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 6)
    args = openai_args(server, dataset)
    assert run_py(*args, cwd=tmp_path, env=ENV).returncode == 0
    [before] = mlflow_runs(tmp_path / "runs")
    mark = len(server.log)
    again = run_py(*args, "experiment.resume=latest", cwd=tmp_path, env=ENV)
    assert again.returncode == 0 and "already complete (6 of 6 prompts answered" in again.stderr
    assert len(server.log) == mark
    [after] = mlflow_runs(tmp_path / "runs")
    assert after["metrics"] == before["metrics"] and after["status"] == "FINISHED"


def test_a_million_repeats_with_a_request_limit_start_at_once(server, tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", 10)
    proc = run_py(*openai_args(server, dataset, "experiment.repeats=1000000", "experiment.max_requests=10"),
                  cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == 10


def test_ctrl_c_while_preparing_prompts_stops_and_says_nothing_was_recorded(server, tmp_path):
    # A huge synthetic prompt for a model whose context window is unknown: sized with tiktoken, slowly.
    args = ("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=my-model", "dataset=synthetic",
            "dataset.count=50", "dataset.input_tokens=2000000")
    proc = _popen(args, tmp_path)
    _wait_for(lambda: b"Instantiating client" in job_log(tmp_path) or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "no call was recorded and no MLflow run was made" in stderr and "Traceback" not in stderr
    assert "marked KILLED" not in stderr
    assert server.log == []


def job_log(root: Path) -> bytes:
    """What the job logged so far (Hydra's log file in the job folder)."""
    return b"".join(p.read_bytes() for p in (root / "runs" / "outputs").rglob("*.log"))
