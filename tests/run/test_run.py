"""run.py end to end as a subprocess; results read back from the sqlite MLflow store."""

import json
from pathlib import Path

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
    assert metrics["calls/total"] == 20 and metrics["Errors/count"] == 0
    for key in ("Latency/mean", "Latency/p50", "Latency/p90", "Latency/p99", "Latency/max",
                "tokens/prompt_total", "tokens/completion_total", "tokens/total", "Throughput/output_tokens_per_s",
                "Errors/retries"):
        assert key in metrics
    assert run["params"]["llm._target_"] == "pikeclient.backends.openai.OpenAIClient"
    assert run["params"]["sampling.temperature"] == "0.0"
    assert run["tags"]["pikeclient.choice.llm"] == "openai"
    [records_file] = (runs_dir / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert len(records) == 20 and {r["id"] for r in records} == {r["id"] for r in records}
    assert sum(r["usage"]["completion_tokens"] for r in records) == metrics["tokens/completion_total"]
    artifacts = list((runs_dir / "mlartifacts").rglob("*"))
    assert any(p.name == "records.jsonl" for p in artifacts) and any(p.name == "config.yaml" for p in artifacts)
    assert files_containing(tmp_path, API_KEY) == []
    assert len(server.log) == 20


def test_default_run_needs_no_key_and_no_network(tmp_path, smollm2):
    # The default model (llm=smollm2), converted once; the run itself needs no network.
    proc = run_py("dataset.limit=4", "sampling.max_tokens=8", f"llm.models_dir={Path(smollm2).parent}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["metrics"]["calls/total"] == 4 and run["metrics"]["Errors/count"] == 0
    assert run["tags"]["pikeclient.provider"] == "hf_local" and "SmolLM2" in run["tags"]["pikeclient.model"]
    # the model computes in the client's process: its CPU is the model's work, no "client limited" verdict
    assert "client limited" not in proc.stdout and "the client limited this run" not in proc.stderr
    assert run["tags"]["pikeclient.client_limited"] == "false"


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
