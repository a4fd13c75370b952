"""run.py end to end as a subprocess; results read back from the sqlite MLflow store."""

import json
from pathlib import Path

import pytest

from tests.conftest import API_KEY, files_containing, mlflow_runs, run_py


def openai_args(server, *extra):
    return ("llm=openai", f"llm.base_url={server.url}/v1", "retry.initial_delay=0.01", *extra)


def test_openai_run_logs_metrics_records_and_no_key(server, tmp_path):
    proc = run_py(*openai_args(server), cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert "latency p50 / p95" in proc.stdout
    runs_dir = tmp_path / "runs"
    [run] = mlflow_runs(runs_dir)
    assert run["status"] == "FINISHED"
    metrics = run["metrics"]
    assert metrics["calls"] == 20 and metrics["errors"] == 0
    for key in ("latency_s_mean", "latency_s_p50", "latency_s_p90", "latency_s_p99", "latency_s_max",
                "prompt_tokens_total", "completion_tokens_total", "total_tokens", "output_tokens_per_s", "retries"):
        assert key in metrics
    assert run["params"]["llm._target_"] == "pikeclient.backends.openai.OpenAIClient"
    assert run["params"]["sampling.temperature"] == "0.0"
    assert run["tags"]["pikeclient.choice.llm"] == "openai"
    [records_file] = (runs_dir / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert len(records) == 20 and {r["id"] for r in records} == {r["id"] for r in records}
    assert sum(r["usage"]["completion_tokens"] for r in records) == metrics["completion_tokens_total"]
    artifacts = list((runs_dir / "mlartifacts").rglob("*"))
    assert any(p.name == "records.jsonl" for p in artifacts) and any(p.name == "config.yaml" for p in artifacts)
    assert files_containing(tmp_path, API_KEY) == []
    assert len(server.log) == 20


def test_default_run_needs_no_key_and_no_network(tmp_path, smollm2):
    # The default model (llm=smollm2), converted once; the run itself needs no network.
    proc = run_py("dataset.limit=4", "sampling.max_tokens=8", f"llm.models_dir={Path(smollm2).parent}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["metrics"]["calls"] == 4 and run["metrics"]["errors"] == 0
    assert run["tags"]["pikeclient.provider"] == "hf_local" and "SmolLM2" in run["tags"]["pikeclient.model"]


def test_multirun_gives_one_run_per_job_in_one_experiment(server, tmp_path):
    proc = run_py("-m", *openai_args(server, "sampling.temperature=0,0.7", "dataset.limit=3"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    runs = [r for r in mlflow_runs(tmp_path / "runs") if r["tags"].get("pikeclient.role") != "sweep"]
    assert len(runs) == 2 and len({r["experiment_id"] for r in runs}) == 1
    assert sorted(r["tags"]["pikeclient.job_num"] for r in runs) == ["0", "1"]
    assert len({r["tags"]["pikeclient.sweep_dir"] for r in runs}) == 1
    assert sorted(r["params"]["sampling.temperature"] for r in runs) == ["0.0", "0.7"]


def test_mlflow_tracking_uri_from_environment(server, tmp_path):
    store = tmp_path / "elsewhere.db"
    proc = run_py(*openai_args(server, "dataset.limit=2"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": API_KEY, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert proc.returncode == 0, proc.stderr
    assert store.exists() and not (tmp_path / "runs" / "mlflow.db").exists()


def test_errors_are_recorded_and_the_run_still_finishes(server, tmp_path):
    from pikeclient.testing.server import FaultPlan

    server.faults = FaultPlan(rates={"500": 1.0})
    proc = run_py(*openai_args(server, "dataset.limit=3", "retry.max_attempts=2"), cwd=tmp_path,
                  env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["errors"] == 3 and run["metrics"]["errors_server"] == 3 and run["metrics"]["retries"] == 3
    [records_file] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert all(r["error_kind"] == "server" and r["attempts"] == 2 and r["response"] is None for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("llm=openai",), "environment variable OPENAI_API_KEY is not set"),
        (("llm=azure_openai",), "environment variable AZURE_OPENAI_API_KEY is not set"),
        (("llm=nope",), "Available options in 'llm'"),
        (("sampling.temperature=3",), "sampling.temperature=3.0 is out of range: allowed [0, 2]"),
        (("sampling.top_p=0",), "sampling.top_p=0.0 is out of range: allowed (0, 1]"),
        (("sampling.max_tokens=0",), "sampling.max_tokens=0 is out of range: allowed >= 1"),
        (("experiment.concurrency=0",), "experiment.concurrency=0 is out of range: allowed >= 1"),
        (("sampling.temprature=1",), "Key 'temprature' not in 'SamplingConfig'"),
        (("sampling.max_tokens=abc",), "Value 'abc' of type 'str' could not be converted to Integer"),
        (("dataset.path=missing.jsonl",), "dataset.path: no such file"),
        (("llm=openai", "llm.base_url=localhost:1234"), "llm.base_url='localhost:1234' is not an http(s) URL"),
        (("llm=openai", "+llm.bogus=1"), "unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_input_fails_in_one_line_and_leaves_no_finished_run(args, message, tmp_path):
    env = {"OPENAI_API_KEY": API_KEY} if "llm.base_url=localhost:1234" in args or "+llm.bogus=1" in args else {}
    proc = run_py(*args, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    runs_dir = tmp_path / "runs"
    # Checked before a run is created: the tracking process (already importing MLflow) is stopped unused.
    assert not (runs_dir / "mlflow.db").exists()
    assert not list(runs_dir.rglob("records.jsonl"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "prompt": "ok"}\n{not json\n', "bad.jsonl:2: invalid JSON"),
        ('{"id": "a", "prompt": "ok"}\n{"id": "a", "prompt": "again"}\n', "bad.jsonl:2: duplicate id 'a'"),
        ('{"id": "a", "prompt": "  "}\n', "bad.jsonl:1: empty prompt"),
        ('{"id": "a", "text": "no prompt"}\n', "bad.jsonl:1: needs a 'prompt' string"),
    ],
)
def test_bad_dataset_names_file_and_line(content, message, tmp_path):
    (tmp_path / "bad.jsonl").write_text(content)
    proc = run_py("dataset.path=bad.jsonl", "tracking=none", cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
