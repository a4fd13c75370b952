"""What a person reads: run labels, the report's formats and pictures, the summary, MLflow's extras."""

import csv
import io
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pikeclient.cli import first_answers
from pikeclient.eval.compare import compare
from pikeclient.eval.evaluator import aggregate
from pikeclient.eval.judge import JudgeUsage
from pikeclient.eval.score import Score
from pikeclient.run.cost import Price
from pikeclient.run.stats import RunStats, format_summary
from pikeclient.testing.server import FakeLLMServer
from pikeclient.tracking.plots import curve_points
from pikeclient.tracking.report import Row, format_table, label_rows
from pikeclient.tracking.report import main as report_main
from tests.conftest import API_KEY, run_py

ENV = {"OPENAI_API_KEY": API_KEY, "AZURE_OPENAI_API_KEY": API_KEY}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory):
    """README's sweep: two backends x two temperatures, both pointed at one loopback server."""
    root = tmp_path_factory.mktemp("report")
    with FakeLLMServer(api_key=API_KEY) as server:
        proc = run_py("-m", "llm=azure_openai,openai", "sampling.temperature=0,0.7", f"base_url={server.url}/v1",
                      "dataset.limit=3", "tracking.traces=false", cwd=root, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return root, f"sqlite:///{root / 'runs' / 'mlflow.db'}"


def test_runs_are_labelled_by_what_the_sweep_varied_and_nothing_is_cut(two_backends, capsys):
    root, uri = two_backends
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--plot", str(root / "report.png")]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    for label in ("llm=azure_openai temperature=0.0", "llm=azure_openai temperature=0.7",
                  "llm=openai temperature=0.0", "llm=openai temperature=0.7"):
        assert label in out, out
    for noise in ("api_key_env", "azure_endpoint", "api_version", "deployment"):  # the llm choice says it
        assert noise not in out
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_child_runs_are_named_by_what_varies_first(two_backends):
    _, uri = two_backends
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pikeclient").experiment_id])
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("pikeclient.role") != "sweep")
    varied = ["llm=azure_openai temperature=0 ", "llm=azure_openai temperature=0.7 ", "llm=openai temperature=0 ",
              "llm=openai temperature=0.7 "]
    assert [name[: len(start)] for name, start in zip(names, varied)] == varied  # then what every job has
    assert all("limit=3" in name for name in names) and not any("base_url" in name for name in names)


def test_report_as_csv_and_json(two_backends, capsys):
    _, uri = two_backends
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and {r["backend"] for r in rows} == {"azure_openai", "openai"}
    assert all(float(r["p50"]) >= 0 and r["label"].startswith("llm=") for r in rows)
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 4 and all(item["calls"] == 3 for item in data)


def test_runs_record_their_dataset_source_and_only_the_params_that_describe_them(two_backends):
    root, uri = two_backends
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pikeclient").experiment_id])
    child = next(r for r in runs if r.data.tags.get("pikeclient.role") != "sweep")
    [used] = child.inputs.dataset_inputs
    job = json.loads((Path(child.data.tags["pikeclient.output_dir"]) / "run.json").read_text())
    assert used.dataset.name == "prompts" and used.dataset.digest == job["dataset"]["digest"]
    tags = child.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"].endswith("run.py") and tags["mlflow.source.type"] == "LOCAL"
    params = child.data.params
    assert not [k for k in params if k.startswith("pricing.")]  # the shared price table is no setting of a run
    assert "dataset.path" in params and "dataset.input_tokens" not in params  # a prompt file, not synthetic
    assert tags["pikeclient.price"] == "none"


def test_a_long_label_is_listed_in_full_under_the_table():
    long = "a-setting-with-a-very-long-value-that-tells-the-runs-apart-" * 2
    rows = [Row(run_id=str(i), name=f"r{i}", backend="openai", model="m", calls=1, errors=0, p50=0.1, p95=0.2,
                tokens=3, tokens_per_s=1.0, params={"x.tag": f"{long}{i}"}) for i in range(2)]
    out = format_table(rows)
    flat = re.sub(r"\s+", "", out)
    assert f"tag={long}0" in flat and f"tag={long}1" in flat  # whole, wrapped not cut
    assert "~" not in out and max(map(len, out.splitlines())) <= 100


def test_the_saturation_curve_plots_completed_throughput():
    # Asked 60/s of a server that completes 40/s: requests went out at 56.7/s, answers came at 38.8/s.
    rows = [Row(run_id=str(rate), name="r", backend="openai", model="m", calls=100, errors=0, p50=p50, p95=None,
                tokens=None, tokens_per_s=None, requested_rate=rate, sent_rate=sent, completed_rate=done)
            for rate, sent, done, p50 in ((10, 10.0, 9.9, 0.1), (40, 39.0, 37.0, 0.3), (60, 56.66, 38.8, 2.0))]
    [(label, points)] = curve_points(label_rows(rows)).items()
    assert [x for x, *_ in points] == [9.9, 37.0, 38.8]  # completed, not sent: the curve bends back


def test_the_summary_title_is_cut_with_a_mark():
    title = "pikeclient: " + " ".join(f"key{i}=value{i}" for i in range(20))
    first = format_summary(RunStats(), title).splitlines()[0]
    assert len(first) == 100 and first.endswith("…")


def test_first_answers_are_listed_in_prompt_order(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"index": i, "id": f"q{i}", "response": f"answer {i}"}) + "\n"
                               for i in (5, 2, 0, 9, 1)))
    lines = first_answers(records).splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["q0", "q1", "q2"]


def test_every_metric_a_run_logs_is_documented():
    from pikeclient.run.stats import Slo
    from tests.run.test_load import _record

    stats = RunStats(slo=Slo(latency_s=1.0))
    for i in range(200):
        record = {**_record(i * 0.1, 0.1), "ttft_s": 0.01, "itl_s": 0.001, "tpot_s": 0.002, "send_delay_s": 0.0001,
                  "dispatch_delay_s": 0.001, "slot_wait_s": 0.0, "latency_from_schedule_s": 0.11,
                  "output_tokens_per_s": 10.0}
        stats.slo_verdict(record)
        stats.add(record)
    stats.add({**_record(0, 0.1), "error": "x", "error_kind": "timeout", "latency_s": None})
    for turn in (1, 2):  # a multi-turn session
        stats.add({**_record(turn, 0.1), "session_id": "s", "turn": turn, "turns": 2, "ttft_s": 0.01})
    stats.wall_s, stats.requested_rate, stats.loop_lags = 20.0, 10.0, [0.001]
    usage = JudgeUsage(calls=3, errors=1, prompt_tokens=30, completion_tokens=9)
    stats.quality = {**aggregate([{"exact_match": Score(True), "correctness": Score.failed("judge down")},
                                  {"exact_match": Score(False), "correctness": Score(True)}]),
                     **usage.metrics(Price("m", 1.0, 2.0, "USD"))}
    comparison = compare([{"id": "a", "latency_s": 0.1, "error": None, "scores": {"exact_match": Score(True)}}],
                         [{"id": "a", "latency_s": 0.2, "error": None, "scores": {"exact_match": Score(False)}}])
    documented = set(re.findall(r"`([A-Za-z<>]+(?:/[A-Za-z0-9_<>]+)+)`", DOCS.read_text()))
    for name in [*stats.metrics(), *stats.series(), *comparison.metrics()]:
        generic = re.sub(r"^(Errors/)(timeout)$", r"\1<kind>", re.sub(r"^(tokens/source_)\w+$", r"\1<source>", name))
        generic = re.sub(r"^(exact_match|correctness)/", "<scorer>/", generic)
        generic = re.sub(r"^compare/(exact_match|latency_s)/", "compare/<name>/", generic)
        generic = re.sub(r"^judge/cost_usd$", "judge/cost_<currency>", generic)
        generic = re.sub(r"(mean|max|p\d\d)$", "<stat>", generic) if not generic.startswith("<scorer>") else generic
        assert name in documented or generic in documented, name
