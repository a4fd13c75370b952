"""The report's quality columns, the quality picture and ``--compare``, on runs whose answers are known:
two loopback servers with canned answers, one right on every question, one wrong on the last ten."""

import csv
import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pikeclient.testing.server import FakeLLMServer
from pikeclient.tracking.plots import pareto
from pikeclient.tracking.report import main as report_main
from tests.conftest import API_KEY, run_py

ENV = {"OPENAI_API_KEY": API_KEY}
QUESTIONS = 30
WRONG = 10  # server B answers the last ten wrong


def question(n: int) -> str:
    return f"Capital of country {n:02d}?"


def answers(wrong_from: int) -> dict[str, str]:
    return {question(n): f"It is city{n:02d}." if n < wrong_from else "I do not know." for n in range(QUESTIONS)}


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A sweep over two servers (A: all right, B: ten wrong), then A run once more on its own."""
    root = tmp_path_factory.mktemp("compare")
    path = root / "capitals.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{n:02d}", "prompt": question(n),
                                        "expectations": {"contains": f"city{n:02d}"}}) + "\n"
                            for n in range(QUESTIONS)))
    with FakeLLMServer(api_key=API_KEY, answers=answers(QUESTIONS)) as a, \
            FakeLLMServer(api_key=API_KEY, answers=answers(QUESTIONS - WRONG)) as b:
        prices = (f"pricing.endpoints=[{{url:'{a.url}',input:1.0,output:2.0}},"
                  f"{{url:'{b.url}',input:0.1,output:0.2}}]")
        common = ("llm=openai", f"dataset.path={path}", "tracking.traces=false", prices)
        sweep = run_py("-m", *common, f"llm.base_url={a.url}/v1,{b.url}/v1", cwd=root, env=ENV)
        assert sweep.returncode == 0, sweep.stderr
        again = run_py(*common, f"llm.base_url={a.url}/v1", cwd=root, env=ENV)
        assert again.returncode == 0, again.stderr
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pikeclient").experiment_id],
                              order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("pikeclient.role") == "sweep")
    jobs = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                  key=lambda r: int(r.data.tags["pikeclient.job_num"]))
    single = next(r for r in runs if r.data.tags.get("pikeclient.role") != "sweep"
                  and "mlflow.parentRunId" not in r.data.tags)
    return root, uri, client, parent, jobs, single


def test_two_runs_compared_report_the_known_difference_and_log_it_on_the_later(known, capsys):
    root, uri, client, _, (a, b), _ = known
    assert report_main(["--tracking-uri", uri, "--compare", a.info.run_id, b.info.run_id]) == 0
    out = capsys.readouterr().out
    [line] = [row for row in out.splitlines() if row.startswith("contains (mean)")]
    assert "-0.333" in line and "McNemar exact p=0.00195 (0 vs 10)" in line and line.endswith("B lower")
    assert f"{QUESTIONS} prompts answered by both (only A: 0, only B: 0)" in out
    assert any(row.startswith("latency_s (median, ms)") for row in out.splitlines())
    logged = client.get_run(b.info.run_id)  # B started last
    m = logged.data.metrics
    assert m["compare/contains/diff"] == pytest.approx(-WRONG / QUESTIONS) and m["compare/pairs"] == QUESTIONS
    assert m["compare/contains/detectable"] == 1.0 and m["compare/contains/p_value"] == pytest.approx(2 / 2**WRONG)
    assert m["compare/contains/ci_high"] < 0 and "compare/latency_s/diff" in m
    assert logged.data.tags["pikeclient.compare.a"].endswith(f"({a.info.run_id[:8]})")
    assert {"path": "comparison.json", "type": "table"} in json.loads(logged.data.tags["mlflow.loggedArtifacts"])
    table = json.loads(Path(client.download_artifacts(b.info.run_id, "comparison.json", str(root))).read_text())
    assert "B - A" in table["columns"] and any("contains" in row for row in table["data"])
    assert not any(k.startswith("compare/") for k in client.get_run(a.info.run_id).data.metrics)


def test_job_folders_compare_like_their_runs(known, capsys):
    _, uri, _, _, (a, b), _ = known
    folders = [r.data.tags["pikeclient.output_dir"] for r in (a, b)]
    assert report_main(["--tracking-uri", uri, "--compare", *folders]) == 0
    [line] = [row for row in capsys.readouterr().out.splitlines() if row.startswith("contains (mean)")]
    assert "-0.333" in line and line.endswith("B lower")


def test_identical_runs_show_no_detectable_difference(known, capsys):
    _, uri, _, _, (a, _), single = known
    assert report_main(["--tracking-uri", uri, "--compare", a.info.run_id, single.info.run_id]) == 0
    [line] = [row for row in capsys.readouterr().out.splitlines() if row.startswith("contains (mean)")]
    assert "+0 " in line and line.endswith("no detectable difference")


def test_a_sweep_compares_each_job_with_its_baseline(known, capsys):
    root, uri, client, parent, (a, b), _ = known
    assert report_main(["--tracking-uri", uri, "--compare", parent.info.run_id, "--baseline", "1"]) == 0
    out = capsys.readouterr().out
    assert f"A: {b.info.run_name}" in out  # job 1 is the baseline
    [line] = [row for row in out.splitlines() if row.startswith("contains (mean)")]
    assert "+0.333" in line and line.endswith("B higher")
    assert client.get_run(a.info.run_id).data.metrics["compare/contains/diff"] == pytest.approx(WRONG / QUESTIONS)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison.json", str(root))).read_text())
    assert table["columns"][:2] == ["run A", "run B"]


def test_the_report_shows_quality_beside_latency_and_cost(known, capsys):
    root, uri, *_ = known
    picture = root / "quality.png"
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--quality", str(picture)]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    assert "pass rate 95% CI" in out and "30/30" in out and "20/30" in out and "contains" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(float(r["contains/mean"]) for r in rows) == pytest.approx([2 / 3, 1.0])
    assert sorted(r["passed"] for r in rows) == ["20", "30"] and all(r["graded"] == "30" for r in rows)
    assert report_main(["--tracking-uri", uri, "--sweep", "latest", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(item["pass_rate"] for item in data) == pytest.approx([2 / 3, 1.0])
    assert all(len(item["pass_rate_ci"]) == 2 for item in data)


def test_the_pareto_front_keeps_the_runs_no_other_beats():
    # (cost, quality): the third is dearer and worse than the first; the fourth ties the second.
    assert pareto([(1.0, 0.6), (2.0, 0.9), (3.0, 0.5), (2.0, 0.9), (0.5, 0.2)]) == [4, 0, 1, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--compare", "/nonexistent/job", "0" * 32], "--compare /nonexistent/job: not a run id (32 hex digits) or a"),
    (["--compare", "/nonexistent/sweep"], "--compare /nonexistent/sweep: not a sweep (its parent run id, its folder"),
    (["--compare", "0" * 32, "1" * 32], f"--compare: no run {'0' * 32} in"),
    (["--baseline", "1"], "--baseline goes with --compare SWEEP"),
    (["--compare", "latest", "--baseline", "9"], "--baseline 9: not one of the sweep's 2 jobs"),
])
def test_bad_compare_arguments_are_one_line(known, capsys, args, message):
    _, uri, *_ = known
    assert report_main(["--tracking-uri", uri, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_single_run_or_a_folder_without_a_job_is_refused(known, tmp_path, capsys):
    _, uri, _, _, (a, _), _ = known
    assert report_main(["--tracking-uri", uri, "--compare", a.info.run_id]) == 1
    assert "a single run; give a second one to compare it with" in capsys.readouterr().err
    assert report_main(["--tracking-uri", uri, "--compare", str(tmp_path), a.info.run_id]) == 1
    assert "no run.json there (not a pikeclient job folder)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main(["--tracking-uri", uri, "--compare", "a", "b", "c"])
