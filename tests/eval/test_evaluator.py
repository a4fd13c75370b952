"""The evaluator: scorers chosen by _target_ (ours, a user's function, MLflow's @scorer and judges), run
in a worker thread, failures as counted errors, aggregate metrics, and the require_correct arithmetic."""

import threading

import pytest
from mlflow.entities import AssessmentSource, Feedback
from mlflow.genai.scorers import scorer
from omegaconf import OmegaConf

from pikeclient.config.factory import compose
from pikeclient.core.errors import ConfigError
from pikeclient.eval.evaluator import Evaluator, aggregate
from pikeclient.eval.expectations import Expectations
from pikeclient.eval.score import CODE, LLM_JUDGE, Score, as_scores, meets_slo, passed, verdict
from pikeclient.run.dataset import PromptItem, load_prompts
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY

SEEN_THREADS = set()


def not_empty(*, outputs, expectations=None):
    """A user's scorer: only the arguments it names are passed."""
    SEEN_THREADS.add(threading.current_thread().name)
    return bool(outputs.strip())


def word_count(*, outputs, per=1):
    return len(outputs.split()) / per


def broken(*, outputs):
    raise RuntimeError("scorer bug")


def feedbacks(*, outputs):
    return [Feedback(name="polite", value="yes", rationale="kind words"),
            Feedback(name="short", value=len(outputs) < 10)]


@scorer
def mlflow_style(outputs, expectations):
    return Feedback(value=outputs == expectations.get("expected_response"), rationale="compared")


def item(expects=None, text="Capital of France?"):
    parsed = Expectations.parse(expects, "t:1") if expects is not None else None
    return PromptItem("p", ({"role": "user", "content": text},), expectations=parsed)


def evaluate(scorers, record, prompt):
    return Evaluator(scorers).score(record, prompt)


def test_eval_none_builds_nothing_and_basic_builds_the_seven_scorers():
    assert Evaluator.from_config(OmegaConf.to_container(compose(["eval=none"]).eval)) is None
    basic = Evaluator.from_config(OmegaConf.to_container(compose(["eval=basic"]).eval))
    assert list(basic.scorers) == ["exact_match", "contains", "regex_match", "is_json", "numeric_match",
                                   "choice_match", "response_length"]
    fewer = compose(["eval=basic", "eval.scorers.response_length=null"]).eval
    fewer = Evaluator.from_config(OmegaConf.to_container(fewer))
    assert "response_length" not in fewer.scorers


def test_eval_judge_composes_a_judge_on_its_own_client(server, api_env):
    cfg = compose(["eval=judge", f"eval.judge.base_url={server.url}/v1", "eval.judge.model=grader"])
    evaluator = Evaluator.from_config(OmegaConf.to_container(cfg.eval, resolve=True), retry={"max_attempts": 1})
    assert list(evaluator.judges) == ["correctness", "guidelines"]
    assert evaluator.judge.model_id == "openai:/grader" and evaluator.judge.client.sampling.temperature == 0.0
    evaluator.close()


def test_a_scorer_of_the_users_own_by_target_with_bound_arguments():
    evaluator = Evaluator.from_config({"scorers": {
        "not_empty": {"_target_": "tests.eval.test_evaluator.not_empty"},
        "words": {"_target_": "tests.eval.test_evaluator.word_count", "per": 2},
        "mlflow_style": {"_target_": "tests.eval.test_evaluator.mlflow_style"}}})
    scores = evaluator.score({"response": "Paris is it", "error": None}, item({"expected_response": "Paris is it"}))
    assert scores["not_empty"] == Score(True, None, CODE, "not_empty")
    assert scores["words"].value == 1.5
    assert scores["mlflow_style"].value is True and scores["mlflow_style"].rationale == "compared"


def test_mlflows_feedbacks_become_scores():
    scores = evaluate({"fb": feedbacks}, {"response": "hi", "error": None}, item())
    assert scores["polite"].value is True and scores["polite"].rationale == "kind words"  # "yes" is a pass
    assert scores["short"].value is True
    judged = as_scores("c", Feedback(value="no", source=AssessmentSource("LLM_JUDGE", "openai:/gpt-4o")))
    assert judged["c"] == Score(False, None, LLM_JUDGE, "openai:/gpt-4o")
    failed = as_scores("c", Feedback(error=ValueError("judge down")))
    assert failed["c"].value is None and "judge down" in failed["c"].error


def test_a_scorer_that_raises_is_an_error_on_its_score_only():
    scores = evaluate({"broken": broken, "not_empty": not_empty}, {"response": "x", "error": None}, item())
    assert scores["broken"].value is None and scores["broken"].error == "RuntimeError: scorer bug"
    assert scores["not_empty"].value is True


def test_failed_calls_are_not_scored():
    assert evaluate({"not_empty": not_empty}, {"response": None, "error": "HTTP 500"}, item()) == {}


@pytest.mark.parametrize(("spec", "message"), [
    ({"model": "x"}, "eval.scorers.s: give a _target_"),
    ({"_target_": "no_such_module.scorer"}, "eval.scorers.s._target_=no_such_module.scorer: cannot import it"),
    ({"_target_": "pikeclient.eval.evaluator.SCORER_ARGUMENTS"},
     "eval.scorers.s._target_=pikeclient.eval.evaluator.SCORER_ARGUMENTS: a tuple"),
    ({"_target_": "mlflow.genai.scorers.RegexMatch"}, "eval.scorers.s: "),  # its required pattern is missing
])
def test_a_bad_scorer_entry_is_one_line(spec, message):
    with pytest.raises(ConfigError) as caught:
        Evaluator.from_config({"scorers": {"s": spec}})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["quality", "a/b", "", "Latency", "judge"])
def test_scorer_names_must_make_metric_names(name):
    with pytest.raises(ConfigError, match="scorer name"):
        Evaluator({name: not_empty})


def test_mlflows_builtin_scorers_plug_in_by_target():
    evaluator = Evaluator.from_config({"scorers": {
        "starts": {"_target_": "mlflow.genai.scorers.RegexMatch", "pattern": "^Paris"},
        "short": {"_target_": "mlflow.genai.scorers.ResponseLength", "max_length": 5}}})
    scores = evaluator.score({"response": "Paris, France", "error": None}, item())
    assert scores["starts"].value is True and scores["short"].value is False


def test_mlflows_judges_plug_in_by_target_against_a_judge_endpoint(monkeypatch):
    """Correctness and make_judge, served by the loopback server through MLflow's own OpenAI adapter."""
    verdicts = {"Paris is the capital": '{"rationale": "The response is correct", "result": "yes"}',
                "sorry to bother": '{"rationale": "Polite.", "result": "yes"}'}
    with FakeLLMServer(api_key=API_KEY, answers=verdicts) as srv:
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("OPENAI_API_BASE", f"{srv.url}/v1")
        monkeypatch.setenv("MLFLOW_MODEL_CATALOG_URI", "")  # no price catalog fetch from GitHub (offline)
        evaluator = Evaluator.from_config({"judges": {
            "correctness": {"_target_": "mlflow.genai.scorers.Correctness", "model": "openai:/grader"},
            "polite": {"_target_": "mlflow.genai.judges.make_judge", "name": "polite", "model": "openai:/grader",
                       "instructions": "Is {{ outputs }} polite? Answer yes or no."}}})
        worker = evaluator.start()
        worker.submit({"index": 0, "response": "Paris is the capital, sorry to bother", "error": None},
                      item({"expected_response": "Paris"}))
        scores = worker.finish()[0]
    assert scores["correctness"] == Score(True, "The response is correct", LLM_JUDGE, "openai:/grader")
    assert scores["polite"].value is True and scores["polite"].source == LLM_JUDGE


def test_the_worker_scores_in_its_own_thread_and_reports_each_call():
    reported = []
    evaluator = Evaluator({"not_empty": not_empty})
    worker = evaluator.start(max_pending=1, on_scores=lambda key, scores, stage: reported.append((key, stage)))
    for index in range(50):  # a queue of one: submit waits for room, never deadlocks
        worker.submit({"index": index, "response": "x" if index % 2 else " ", "error": None}, item())
    scores = worker.finish()
    assert sorted(reported) == [(i, "code") for i in range(50)] and len(scores) == 50
    assert sum(s["not_empty"].value for s in scores.values()) == 25
    assert "pikeclient-scoring" in SEEN_THREADS
    with pytest.raises(RuntimeError):
        worker.submit({"index": 99, "response": "x", "error": None}, item())


def test_a_failing_consumer_does_not_stop_the_scoring(caplog):
    def explode(key, scores, stage):
        raise OSError("disk full")

    worker = Evaluator({"not_empty": not_empty}).start(on_scores=explode)
    worker.submit({"index": 0, "response": "x", "error": None}, item())
    worker.submit({"index": 1, "response": "y", "error": None}, item())
    assert len(worker.finish()) == 2 and "disk full" in caplog.text


def test_aggregate_on_known_scores():
    calls = [{"em": Score(True), "n": Score(0.5)}, {"em": Score(False), "n": Score(1.0)},
             {"em": Score(True), "n": Score.failed("judge down")}, {"em": Score(True), "label": Score("blue")}, {}]
    metrics = aggregate(calls, resamples=500)
    assert metrics["em/mean"] == 0.75 and metrics["em/count"] == 4 and metrics["em/errors"] == 0
    assert metrics["em/ci_low"] <= 0.75 <= metrics["em/ci_high"] and 0 <= metrics["em/ci_low"]
    assert metrics["n/mean"] == 0.75 and metrics["n/count"] == 2 and metrics["n/errors"] == 1
    assert "label/mean" not in metrics and metrics["label/count"] == 0  # text is kept in records, not averaged
    # Calls: pass, fail, error (its only pass/fail score passed but another could not be computed), pass.
    assert (metrics["quality/passed"], metrics["quality/failed"], metrics["quality/errors"]) == (2, 1, 1)
    assert metrics["quality/pass_rate"] == 2 / 3
    # Records read back from records.jsonl hold dicts: the same figures.
    assert aggregate([{k: s.to_dict() for k, s in call.items()} for call in calls], resamples=500) == metrics


def test_aggregate_of_nothing_is_nothing():
    assert aggregate([{}, {}]) == {}


@pytest.mark.parametrize(("scores", "expected_verdict", "is_passed"), [
    ({}, None, True),
    ({"words": Score(12.0)}, None, True),
    ({"em": Score(True), "contains": Score(True)}, "pass", True),
    ({"em": Score(True), "contains": Score(False)}, "fail", False),
    ({"em": Score(True), "judge": Score.failed("timeout")}, "error", False),
    ({"em": Score(False), "judge": Score.failed("timeout")}, "fail", False),
    ({"em": {"value": True, "error": None}}, "pass", True),
])
def test_verdict_and_passed(scores, expected_verdict, is_passed):
    assert verdict(scores) == expected_verdict
    assert passed(scores) is is_passed


def test_require_correct_arithmetic():
    """Goodput counts calls that met the SLOs and, with require_correct, passed their pass/fail scores."""
    calls = [(True, {"em": Score(True)}), (True, {"em": Score(False)}), (False, {"em": Score(True)}),
             (True, {}), (True, {"em": Score(True), "judge": Score.failed("bad verdict")}),
             (False, {"em": Score(False)})]
    assert sum(meets_slo(met, scores, require_correct=False) for met, scores in calls) == 4
    assert sum(meets_slo(met, scores, require_correct=True) for met, scores in calls) == 2
    wall_s = 2.0
    assert sum(meets_slo(met, scores, True) for met, scores in calls) / wall_s == 1.0  # goodput, requests/s


def test_scoring_the_shipped_sets_with_known_answers():
    """qa.jsonl scored with answers written to pass, then to fail: every scored line passes, then fails."""
    evaluator = Evaluator.from_config(OmegaConf.to_container(compose(["eval=basic"]).eval))
    right = {"Tokyo": "cap-japan", "B": "mc-closest", "144": "multiply", '{"city": "Madrid"}': "json-city",
             "- apple\n- pear\n- plum": "three-fruits", "The answer is minus seven.": "negative"}
    prompts = {p.id: p for p in load_prompts("pkg://pikeclient/data/qa.jsonl")}
    for answer, prompt_id in right.items():
        scores = evaluator.score({"response": answer, "error": None}, prompts[prompt_id])
        assert scores and all(s.value is True for s in scores.values()), (prompt_id, scores)
        wrong = evaluator.score({"response": "I do not know.", "error": None}, prompts[prompt_id])
        assert verdict(wrong) == "fail", (prompt_id, wrong)
