"""What the MLflow UI shows: sweep structure, metrics against records, TTFT, cost, traces, report."""

import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

from pikeclient.testing.server import FakeLLMServer
from pikeclient.tracking.report import main as report_main
from tests.conftest import API_KEY, files_containing, run_py

PRICE_IN, PRICE_OUT = 0.15, 0.60  # named for the loopback endpoint (self-hosted servers have no list price)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 4-job sweep (streaming x temperature) against the loopback server; the store it leaves."""
    root = tmp_path_factory.mktemp("sweep")
    with FakeLLMServer(api_key=API_KEY) as server:
        price = f"pricing.endpoints=[{{url:'{server.url}/v1',input:{PRICE_IN},output:{PRICE_OUT}}}]"
        proc = run_py("-m", "llm=openai", f"llm.base_url={server.url}/v1", "llm.stream=false,true",
                      "sampling.temperature=0,0.7", "dataset.limit=6", price, cwd=root,
                      env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pikeclient").experiment_id
    return root, client, experiment


def children_and_parent(client, experiment):
    runs = client.search_runs([experiment])
    parents = [r for r in runs if r.data.tags.get("pikeclient.role") == "sweep"]
    return [r for r in runs if r not in parents], parents


def records_of(root, run):
    sweep_dir = run.data.tags["pikeclient.sweep_dir"]
    path = root / sweep_dir / run.data.tags["pikeclient.job_num"] / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_is_one_parent_with_four_children(sweep):
    _, client, experiment = sweep
    children, parents = children_and_parent(client, experiment)
    [parent] = parents
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs"] == 4 and parent.data.metrics["sweep/jobs_failed"] == 0
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["pikeclient.job_num"] for c in children) == ["0", "1", "2", "3"]
    assert {c.data.tags["pikeclient.choice.llm"] for c in children} == {"openai"}
    assert {c.data.tags["pikeclient.sweep_dir"] for c in children} == {parent.data.tags["pikeclient.sweep_dir"]}


def test_metrics_agree_with_records(sweep):
    root, client, experiment = sweep
    for run in children_and_parent(client, experiment)[0]:
        records = records_of(root, run)
        latencies = [r["latency_s"] for r in records if r["error"] is None]
        m = run.data.metrics
        assert m["Latency/p50"] == pytest.approx(statistics.median(latencies))
        assert m["Latency/mean"] == pytest.approx(statistics.fmean(latencies))
        assert m["Latency/max"] == pytest.approx(max(latencies))
        assert m["tokens/completion_total"] == sum(r["usage"]["completion_tokens"] for r in records)
        history = client.get_metric_history(run.info.run_id, "call/latency_s")
        assert sorted((h.step, h.value) for h in history) == sorted((r["index"], r["latency_s"]) for r in records)


def test_time_to_first_token_only_for_streaming_runs(sweep):
    _, client, experiment = sweep
    for run in children_and_parent(client, experiment)[0]:
        streaming = run.data.params["llm.stream"] == "True"
        for key in ("TTFT/p50", "TTFT/p90", "TTFT/p99", "ITL/p50", "TPOT/p50"):
            assert (key in run.data.metrics) is streaming


def test_cost_matches_the_price_table(sweep):
    _, client, experiment = sweep
    for run in children_and_parent(client, experiment)[0]:
        m = run.data.metrics
        expected = (m["tokens/prompt_total"] * PRICE_IN + m["tokens/completion_total"] * PRICE_OUT) / 1e6
        assert m["Cost/usd"] == pytest.approx(expected)


def test_one_llm_trace_per_call_linked_to_the_run(sweep):
    _, client, experiment = sweep
    run = children_and_parent(client, experiment)[0][0]
    traces = client.search_traces(locations=[experiment], run_id=run.info.run_id, max_results=100)
    assert len(traces) == run.data.metrics["calls/total"] == 6
    trace = traces[0]
    assert trace.data.spans[0].span_type == "LLM"
    usage = trace.info.token_usage
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0


def test_table_artifact_and_hydra_folder(sweep, monkeypatch):
    root, client, experiment = sweep
    run = children_and_parent(client, experiment)[0][0]
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"records.jsonl", "records_table.json", "hydra"} <= paths
    assert "table" in run.data.tags.get("mlflow.loggedArtifacts", "")
    # load_table searches runs through the global tracking URI, not the client's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    table = client.load_table(experiment, "records_table.json", run_ids=[run.info.run_id])
    assert len(table) == run.data.metrics["calls/total"] and {"prompt", "response", "latency_s"} <= set(table.columns)


def test_no_key_anywhere(sweep):
    root, _, _ = sweep
    assert files_containing(root, API_KEY) == []


def test_report_table_and_plot(sweep, capsys):
    root, _, _ = sweep
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--plot", str(root / "report.png")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "run", "backend", "model"]
    assert len([line for line in lines if "gpt-4o-mini" in line]) == 4
    assert max(map(len, lines[:6])) <= 100
    # Each run is labelled by what differs between the runs, nothing else:
    labels = sorted(" ".join(line.split()[1:3]).lower() for line in lines[2:6])
    assert labels == ["stream=false temperature=0.0", "stream=false temperature=0.7",
                      "stream=true temperature=0.0", "stream=true temperature=0.7"]
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_input(tmp_path, capsys):
    assert report_main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 1
    assert "no tracking store" in capsys.readouterr().err


def test_failed_job_marks_the_sweep_failed(server, tmp_path):
    proc = run_py("-m", "llm=openai", f"llm.base_url={server.url}/v1", "dataset.limit=2",
                  "sampling.max_tokens=5,0", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode != 0
    from tests.conftest import mlflow_runs

    runs = mlflow_runs(tmp_path / "runs")
    [parent] = [r for r in runs if r["tags"].get("pikeclient.role") == "sweep"]
    assert parent["status"] == "FAILED"


def test_mlflow_ui_serves_the_sweep(sweep, tmp_path):
    from pikeclient.tracking.ui_check import find_chromium, free_port, mlflow_ui, screenshot, served_sweep

    root, client, experiment = sweep
    with mlflow_ui(f"sqlite:///{root / 'runs' / 'mlflow.db'}", free_port()) as base:
        served = served_sweep(base, "pikeclient")
        children, [parent] = children_and_parent(client, experiment)
        assert served["parent"] == parent.info.run_id
        assert set(served["children"]) == {c.info.run_id for c in children}
        for child in children:
            assert served["children"][child.info.run_id]["calls/total"] == child.data.metrics["calls/total"]
        chromium = find_chromium()
        if chromium is not None:
            from pikeclient.tracking.ui_check import compare_url

            png = screenshot(compare_url(base, served), tmp_path / "compare.png", chromium)
            assert png.read_bytes()[:4] == b"\x89PNG"
