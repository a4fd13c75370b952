"""Scores and expectations round-trip through a real sqlite store as MLflow assessments on traces written
as the tracking process writes them (CallLogger), read back through MLflow's public API."""

import time

import mlflow
import pytest
from mlflow.entities import Feedback

from pikeclient.eval.expectations import Expectations
from pikeclient.eval.score import CODE, LLM_JUDGE, Score
from pikeclient.eval.scorers import exact_match
from pikeclient.tracking.assessments import AssessmentLogger, as_mlflow_scorer, to_feedback
from pikeclient.tracking.process import CallLogger, MlflowRun, get_or_create_experiment, open_client

EXPECTS = Expectations.parse({"answers": ["Paris"], "contains": {"any": ["Paris"]},
                              "expected_facts": ["Paris is the capital of France"]}, "t:1").to_json()


def scores(n):
    return {"exact_match": Score(n % 2 == 0, "matches 'Paris'" if n % 2 == 0 else "no match", CODE, "exact_match"),
            "correctness": (Score(True, "States the capital.", LLM_JUDGE, "openai:/gpt-4o-mini") if n != 1 else
                            Score.failed("unparseable verdict: 'Sure'", source=LLM_JUDGE,
                                         source_id="openai:/gpt-4o-mini"))}


@pytest.fixture
def traced_run(tmp_path):
    """A run with four calls' traces in a fresh sqlite store, written by the tracking process's CallLogger."""
    client = open_client(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    experiment = get_or_create_experiment(client, "quality", str(tmp_path / "artifacts"))
    run = MlflowRun.create(client, experiment, run_name="scored")
    calls = CallLogger(run, {"model": "gpt-4o-mini", "provider": "openai"}, traces=True)
    now = time.time()
    calls.write([({"index": n, "id": f"q{n}", "start_time": now + n, "latency_s": 0.1, "attempts": 1, "error": None,
                   "response": "Paris" if n % 2 == 0 else "Lyon", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}},
                  [{"role": "user", "content": "Capital of France?"}]) for n in range(4)])
    calls.close()
    return client, experiment, run, calls.trace_ids


@pytest.mark.parametrize("bulk", [True, False], ids=["one-transaction", "create_assessment"])
def test_scores_and_expectations_round_trip(traced_run, bulk):
    client, experiment, run, trace_ids = traced_run
    logger = AssessmentLogger(client, experiment, run_id=run.run_id, expectations_source="qa.jsonl", bulk=bulk)
    assert logger.bulk is bulk
    written = logger.log((trace_id, scores(n), EXPECTS) for n, trace_id in enumerate(trace_ids))
    assert written == 4 * (2 + 3)
    first = client.get_trace(trace_ids[0]).info.assessments
    by_name = {(type(a).__name__, a.name): a for a in first}
    em = by_name[("Feedback", "exact_match")]
    assert em.value is True and em.rationale == "matches 'Paris'"
    assert (em.source.source_type, em.source.source_id) == ("CODE", "exact_match")
    assert em.metadata[mlflow.tracing.constant.AssessmentMetadataKey.SOURCE_RUN_ID] == run.run_id
    judged = by_name[("Feedback", "correctness")]
    assert (judged.source.source_type, judged.source.source_id) == ("LLM_JUDGE", "openai:/gpt-4o-mini")
    assert by_name[("Expectation", "answers")].value == ["Paris"]
    assert by_name[("Expectation", "contains")].value == {"any": ["Paris"]}
    assert by_name[("Expectation", "expected_facts")].value == ["Paris is the capital of France"]
    assert by_name[("Expectation", "answers")].source.source_type == "HUMAN"
    second = {a.name: a for a in client.get_trace(trace_ids[1]).info.assessments if isinstance(a, Feedback)}
    assert second["exact_match"].value is False
    assert second["correctness"].value is None
    assert second["correctness"].error.error_message == "unparseable verdict: 'Sure'"
    # The run's traces, searched as the UI does, carry them too.
    traces = mlflow.MlflowClient(client.tracking_uri).search_traces(locations=[experiment], run_id=run.run_id)
    assert len(traces) == 4
    assert all(len(t.info.assessments) == 5 for t in traces)


def test_a_missing_trace_is_skipped_with_a_warning(traced_run, caplog):
    client, experiment, run, trace_ids = traced_run
    logger = AssessmentLogger(client, experiment, bulk=True)
    assert logger.log([("tr-" + "0" * 32, scores(0), None), (trace_ids[0], scores(0), None)]) == 2
    assert "1 traces not found" in caplog.text


def test_the_sqlite_store_takes_the_one_transaction_path(traced_run):
    client, experiment, _, _ = traced_run
    assert AssessmentLogger(client, experiment).bulk is True


def test_a_pikeclient_scorer_works_in_mlflow():
    wrapped = as_mlflow_scorer(exact_match)
    feedback = wrapped(outputs="paris.", expectations={"answers": ["Paris"]})
    assert isinstance(feedback, Feedback) and feedback.value is True and feedback.name == "exact_match"
    assert wrapped.run(outputs="Lyon", expectations={"answers": "Paris"}).value is False
    assert wrapped(outputs="x", expectations={}) is None


def test_to_feedback_from_a_records_dict():
    feedback = to_feedback("contains", {"value": False, "rationale": "missing", "source": "CODE",
                                        "source_id": "contains", "error": None})
    assert feedback.value is False and feedback.source.source_id == "contains"


@pytest.mark.parametrize("which", ["feedback", "error", "number", "expectation"])
def test_the_bulk_row_is_mlflows_own_row(which):
    """The rows written in one transaction fill the assessments table as MLflow's own conversion of the
    same Feedback or Expectation does (ids and times aside)."""
    from mlflow.store.tracking.dbmodels.models import SqlAssessments

    from pikeclient.tracking.assessments import expectation_row, feedback_row, to_expectations

    run = "r" * 32
    score = {"feedback": Score(True, "why", CODE, "em"), "number": Score(0.25, None, CODE, None),
             "error": Score.failed("judge down", source=LLM_JUDGE, source_id="openai:/m")}.get(which)
    if score is not None:
        ours, entity = feedback_row("em", score, run), to_feedback("em", score, trace_id="tr-1", run_id=run)
    else:
        ours = expectation_row("answers", ["Paris"], "qa.jsonl")
        entity = to_expectations({"answers": ["Paris"]}, trace_id="tr-1", source_id="qa.jsonl")[0]
    theirs = SqlAssessments.from_mlflow_entity(entity)
    columns = {c.name for c in SqlAssessments.__table__.columns}
    where = {"trace_id", "experiment_id", "trace_timestamp_ms", "created_timestamp", "last_updated_timestamp"}
    assert set(ours) == columns - where
    for column in sorted(columns - where - {"assessment_id"}):
        assert ours[column] == getattr(theirs, column), column
    assert ours["assessment_id"].startswith("a-")
