"""Answer quality in real runs: run.py against loopback servers with canned answers (and a judge's canned
verdicts), results read back from the sqlite store through MLflow's API and from the records."""

import json
import os
import signal
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Expectation, Feedback

from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, mlflow_runs, run_py
from tests.test_reliability import _popen, _wait_for

ENV = {"OPENAI_API_KEY": API_KEY}


def capital(name, country):
    return {"id": name, "prompt": f"Capital of {country}?", "expectations": {"contains": CAPITALS[country],
                                                                           "expected_response": CAPITALS[country]}}


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome"}
LINES = [
    capital("fr", "France"), capital("de", "Germany"), capital("it", "Italy"),
    {"id": "sum", "prompt": "What is 6 x 7?", "expectations": {"number": 42}},
    {"id": "mc", "prompt": "Closest planet to the Sun? A) Venus B) Mercury", "expectations": {"choice": "B"}},
    {"id": "open", "prompt": "Say hello."},
]
ANSWERS = {"France": "Paris.", "Germany": "Munich.", "Italy": "Rome.", "6 x 7": "It is 42.", "Closest": "A"}
# The judge's verdicts, chosen by the question its prompt quotes: right, malformed, and a "no".
VERDICTS = {"France": '{"rationale": "Paris is right.", "result": "yes"}', "Germany": "Hmm, I would say no",
            "Italy": '```json\n{"rationale": "Not what I expected.", "result": "no"}\n```'}


def dataset(tmp_path: Path, lines=LINES) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def args(server, path, *extra):
    return ("llm=openai", f"llm.base_url={server.url}/v1", f"dataset.path={path}", "retry.initial_delay=0.01",
            "load.concurrency=2", *extra)


def judge_args(judge):
    return ("eval=judge", f"eval.judge.base_url={judge.url}/v1", "eval.judge.model=grader",
            "eval.concurrency=2")


def records(tmp_path: Path) -> dict[str, dict]:
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def traces(tmp_path: Path, run: dict) -> dict[str, list]:
    """Each call's assessments, by prompt id, through MLflow's API as the UI reads them."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    by_id: dict[str, list] = {}
    for trace in client.search_traces(locations=[str(run["experiment_id"])], run_id=run["id"]):
        by_id.setdefault(trace.data.spans[0].attributes["pikeclient.prompt_id"], []).extend(trace.info.assessments)
    return by_id


def test_a_run_scores_every_answer_into_records_metrics_summary_and_traces(tmp_path):
    with FakeLLMServer(api_key=API_KEY, answers=ANSWERS) as server:
        proc = run_py(*args(server, dataset(tmp_path)), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    m = run["metrics"]
    assert m["contains/mean"] == pytest.approx(2 / 3) and m["contains/count"] == 3 and m["contains/errors"] == 0
    assert m["numeric_match/mean"] == 1.0 and m["choice_match/mean"] == 0.0
    assert (m["quality/passed"], m["quality/failed"], m["quality/errors"]) == (3, 2, 0)
    assert m["quality/pass_rate"] == pytest.approx(3 / 5)
    assert m["contains/ci_low"] <= m["contains/mean"] <= m["contains/ci_high"]
    assert not any(k.startswith("judge/") for k in m)  # eval=basic: no judge
    assert "answers right                     3 of 5 (60.0%" in proc.stdout
    assert "1 with nothing to check" in proc.stdout and "contains mean" in proc.stdout
    assert "  fr (right): Paris.\n  de (wrong): Munich.\n" in proc.stdout  # the first answers, graded
    found = records(tmp_path)
    assert found["fr"]["scores"]["contains"] == {"value": True, "rationale": "contains all of ['Paris']",
                                                 "source": "CODE", "source_id": "contains", "error": None}
    assert found["de"]["scores"]["contains"]["value"] is False and found["open"]["scores"] == {}
    assert not list((tmp_path / "runs" / "outputs").rglob("scores.jsonl"))  # the journal has served
    assessments = traces(tmp_path, run)
    assert len(assessments) == 6
    fr = {(type(a).__name__, a.name): a for a in assessments["fr"]}
    assert fr[("Feedback", "contains")].value is True and fr[("Feedback", "contains")].source.source_type == "CODE"
    assert fr[("Expectation", "contains")].value == {"all": ["Paris"]}
    assert fr[("Expectation", "expected_response")].value == "Paris"
    de = [a for a in assessments["de"] if isinstance(a, Feedback)]
    assert [(a.name, a.value) for a in de] == [("contains", False)]
    assert assessments["open"] == []  # nothing expected, nothing scored


def test_a_judge_with_fixed_verdicts_one_malformed_counts_apart_from_the_run(tmp_path):
    with FakeLLMServer(api_key=API_KEY, answers=ANSWERS) as server, \
            FakeLLMServer(api_key=API_KEY, answers=VERDICTS) as judge:
        prices = (f"pricing.endpoints=[{{url:'{server.url}',input:1.0,output:2.0}},"
                  f"{{url:'{judge.url}',input:100.0,output:200.0}}]")
        proc = run_py(*args(server, dataset(tmp_path), *judge_args(judge), prices), cwd=tmp_path, env=ENV)
        measured, judged = len(server.log), len(judge.log)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    m = run["metrics"]
    assert m["correctness/mean"] == 0.5 and m["correctness/count"] == 2 and m["correctness/errors"] == 1
    assert (m["judge/calls"], m["judge/errors"]) == (3, 1) and judged == 3
    # fr and sum pass; de fails its contains (a failure outweighs the judge's error), it the judge, mc its choice
    assert (m["quality/passed"], m["quality/failed"], m["quality/errors"]) == (2, 3, 0)
    found = records(tmp_path)
    assert found["de"]["scores"]["correctness"]["error"].startswith("unparseable verdict: 'Hmm, I would say no'")
    assert found["de"]["scores"]["correctness"]["value"] is None
    assert found["fr"]["scores"]["correctness"]["source"] == "LLM_JUDGE"
    assert found["fr"]["scores"]["correctness"]["source_id"] == "openai:/grader"
    # The judge's calls are in none of the run's figures: calls, latency, tokens, cost, throughput.
    assert measured == 6 and m["calls/total"] == 6
    answered = list(found.values())
    assert m["tokens/total"] == sum(r["usage"]["total_tokens"] for r in answered)
    assert m["Cost/usd"] == pytest.approx(sum(r["usage"]["prompt_tokens"] * 1e-6 + r["usage"]["completion_tokens"]
                                              * 2e-6 for r in answered))
    assert m["Latency/max"] == max(r["latency_s"] for r in answered)
    assert m["Throughput/requests_per_s"] == pytest.approx(6 / m["run/wall_s"])
    assert m["judge/tokens"] > 0 and m["judge/cost_usd"] == pytest.approx(
        m["judge/prompt_tokens"] * 1e-4 + m["judge/completion_tokens"] * 2e-4)
    assert "judge calls / tokens" in proc.stdout
    fr = {a.name: a for a in traces(tmp_path, run)["fr"] if isinstance(a, Feedback)}
    assert fr["correctness"].value is True and fr["correctness"].rationale == "Paris is right."
    assert (fr["correctness"].source.source_type, fr["correctness"].source.source_id) == ("LLM_JUDGE", "openai:/grader")
    de = {a.name: a for a in traces(tmp_path, run)["de"] if isinstance(a, Feedback)}
    assert de["correctness"].error.error_message.startswith("unparseable verdict")


def test_require_correct_counts_only_right_answers_as_meeting_the_slos(tmp_path):
    with FakeLLMServer(api_key=API_KEY, answers=ANSWERS) as server:
        proc = run_py(*args(server, dataset(tmp_path), "slo.latency_s=60", "slo.require_correct=true"),
                      cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    m = run["metrics"]
    found = records(tmp_path)
    # fast enough all of them; right: fr, it, sum, and "open" (nothing to check passes); wrong: de, mc
    assert {i for i, r in found.items() if r["slo_met"]} == {"fr", "it", "sum", "open"}
    assert m["SLO/attainment"] == pytest.approx(4 / 6)
    assert m["SLO/goodput"] == pytest.approx(4 / m["run/wall_s"])


def test_without_require_correct_a_wrong_answer_meets_the_slos(tmp_path):
    with FakeLLMServer(api_key=API_KEY, answers=ANSWERS) as server:
        proc = run_py(*args(server, dataset(tmp_path), "slo.latency_s=60"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["SLO/attainment"] == 1.0 and all(r["slo_met"] for r in records(tmp_path).values())


def test_a_dataset_without_expectations_is_not_scored(tmp_path):
    plain = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(3)]
    with FakeLLMServer(api_key=API_KEY) as server:
        proc = run_py(*args(server, dataset(tmp_path, plain)), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert not any(k.startswith("quality/") for k in run["metrics"]) and "answers right" not in proc.stdout
    assert all("scores" not in r for r in records(tmp_path).values())


def test_a_failed_run_resumed_keeps_its_scores_and_judges_only_the_new_answers(tmp_path):
    """The first call fails (a 400, not retried), so the run ends FAILED (max_error_rate=0) with the other
    answers scored and judged; the resumed run calls that prompt again and judges only its answer."""
    path = dataset(tmp_path)
    with FakeLLMServer(api_key=API_KEY, answers=ANSWERS, faults=FaultPlan(script=["400"])) as server, \
            FakeLLMServer(api_key=API_KEY, answers=VERDICTS) as judge:
        command = args(server, path, *judge_args(judge), "load.concurrency=1", "experiment.max_error_rate=0")
        first = run_py(*command, cwd=tmp_path, env=ENV)
        assert first.returncode == 1, first.stderr
        before = records(tmp_path)
        assert before["fr"]["error"] is not None and before["de"]["scores"]["correctness"]["error"]
        assert len(judge.log) == 2  # de and it; fr failed
        again = run_py(*command, "experiment.resume=latest", cwd=tmp_path, env=ENV)
        judged_again = [r.prompt for r in judge.log[2:]]
    assert again.returncode == 0, again.stderr
    assert len(judged_again) == 1 and "Capital of France?" in judged_again[0]
    after = records(tmp_path)
    for name in ("de", "it", "sum", "mc"):
        assert after[name]["scores"] == before[name]["scores"]
    assert after["fr"]["scores"]["correctness"]["value"] is True
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["metrics"]["correctness/count"] == 2
    assert run["metrics"]["judge/calls"] == 3  # both attempts' judge calls
    for prompt_id, assessments in traces(tmp_path, run).items():
        names = [a.name for a in assessments if isinstance(a, Feedback)]
        assert len(names) == len(set(names)), (prompt_id, names)  # logged once, never twice
        assert len([a for a in assessments if isinstance(a, Expectation)]) == len(LINES_BY_ID[prompt_id])


LINES_BY_ID = {line["id"]: line.get("expectations", {}) for line in LINES}


def counted(*, inputs, outputs):
    """A user's scorer that notes every answer it scores (in the file the test names), and passes it."""
    with open(os.environ["SCORED_LOG"], "a", encoding="utf-8") as log:
        log.write(inputs["messages"][-1]["content"] + "\n")
    return True


def test_a_run_killed_midway_resumes_and_scores_every_answer_once(tmp_path):
    lines = [{"id": f"q{i}", "prompt": f"question {i}", "expectations": {"contains": "question"}} for i in range(40)]
    path = dataset(tmp_path, lines)
    scored = tmp_path / "scored.log"
    with FakeLLMServer(api_key=API_KEY, latency=0.02) as server:
        command = args(server, path, "load.concurrency=1", "+eval.scorers.counted={_target_:"
                       "tests.run.test_quality.counted}")
        first = _popen(command, tmp_path, {**ENV, "SCORED_LOG": str(scored)})
        _wait_for(lambda: len(server.log) >= 15)
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
        assert not scored.exists()  # answers are scored after the measured calls, never beside them
        [job] = {p.parent for p in (tmp_path / "runs" / "outputs").rglob("run.json")}
        answered = {r["id"] for r in map(json.loads, (job / "records.jsonl").read_text().splitlines()[:-1])}
        assert len(answered) >= 10
        again = run_py(*command, "experiment.resume=latest", cwd=tmp_path, env={**ENV, "SCORED_LOG": str(scored)})
    assert again.returncode == 0, again.stderr
    rescored = [f"q{line.split()[-1]}" for line in scored.read_text().splitlines()]
    assert sorted(rescored) == sorted(f"q{i}" for i in range(40))  # every answer scored once, the earlier ones too
    assert not (job / "scores.jsonl").exists()
    found = records(tmp_path)
    assert len(found) == 40 and all(r["scores"]["contains"]["value"] is True for r in found.values())
    assert all(r["scores"]["counted"]["value"] is True for r in found.values())
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["contains/count"] == 40 and run["metrics"]["quality/pass_rate"] == 1.0
    assessments = traces(tmp_path, run)
    assert len(assessments) == 40
    for prompt_id, found_here in assessments.items():
        names = sorted(a.name for a in found_here if isinstance(a, Feedback))
        assert names == ["contains", "counted"], (prompt_id, names)  # each logged once, on its call's trace


def test_a_run_killed_while_judging_keeps_the_verdicts_it_had(tmp_path):
    lines = [{"id": f"q{i}", "prompt": f"Capital of land {i}?", "expectations": {"expected_response": f"city {i}"}}
             for i in range(8)]
    path = dataset(tmp_path, lines)
    verdicts = {f"land {i}?": '{"rationale": "Fine.", "result": "yes"}' for i in range(8)}
    with FakeLLMServer(api_key=API_KEY) as server, FakeLLMServer(api_key=API_KEY, answers=verdicts,
                                                                 latency=0.2) as judge:
        command = args(server, path, *judge_args(judge), "eval.concurrency=1")
        first = _popen(command, tmp_path)
        _wait_for(lambda: len(judge.log) >= 3)
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
        [journal] = (tmp_path / "runs" / "outputs").rglob("scores.jsonl")
        complete = [line for line in journal.read_text().splitlines() if line.endswith("}")]  # not one a kill cut
        judged = {entry["id"] for entry in map(json.loads, complete) if entry["stage"] == "judges"}
        assert judged and len(server.log) == 8
        mark = len(judge.log)
        again = run_py(*command, "experiment.resume=latest", cwd=tmp_path, env=ENV)
        judged_again = {r.prompt for r in judge.log[mark:]}
    assert again.returncode == 0, again.stderr
    assert "already complete" not in again.stderr and len(server.log) == 8  # every answer was kept
    assert len(judged_again) == 8 - len(judged) and not any(f"land {q[1:]}?" in p for q in judged
                                                             for p in judged_again)
    found = records(tmp_path)
    assert all(r["scores"]["correctness"]["value"] is True for r in found.values())
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["correctness/count"] == 8
