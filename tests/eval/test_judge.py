"""The LLM judge against the loopback server with canned verdicts: a yes, a no, one malformed verdict
(an error on that score, left out of the mean and counted) and a failed judge call; its calls and tokens
are its own, never the measured client's."""

import asyncio

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.eval.evaluator import Evaluator
from pikeclient.eval.expectations import Expectations
from pikeclient.eval.judge import Correctness, Guidelines, Judge, parse_verdict
from pikeclient.eval.score import LLM_JUDGE
from pikeclient.eval.scorers import contains
from pikeclient.run.dataset import PromptItem
from pikeclient.run.runner import run_prompts
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY


@pytest.mark.parametrize(("text", "value", "rationale"), [
    ('{"rationale": "It says Paris.", "result": "yes"}', True, "It says Paris."),
    ('{"result": "no", "rationale": "Wrong city."}', False, "Wrong city."),
    ('```json\n{"rationale": "ok", "result": "YES"}\n```', True, "ok"),
    ('Here is my verdict: {"result": "no"} Thanks.', False, None),
    ('{"result": true, "rationale": 3}', True, None),
])
def test_parse_verdict(text, value, rationale):
    assert parse_verdict(text) == (value, rationale)


@pytest.mark.parametrize("text", ["", "yes", "The answer is correct.", '{"result": "maybe"}', '{"rationale": "x"}',
                                  '{"result": "yes"', "[1, 2]", '{"result": 1}'])
def test_an_unreadable_verdict_is_an_error(text):
    with pytest.raises(ValueError, match="verdict"):
        parse_verdict(text)


PARIS = Expectations.parse({"expected_response": "Paris", "contains": "Paris"}, "t:1")
VERDICTS = {
    "<answer>\nParis is the capital.\n</answer>": '{"rationale": "States Paris.", "result": "yes"}',
    "<answer>\nLyon is the capital.\n</answer>": '{"rationale": "Lyon is not the capital.", "result": "no"}',
    "<answer>\nMarseille, not Paris, is the capital.\n</answer>": "Hmm, I would say it is mostly fine.",
    # The measured answers: the question picks them.
    "Q1": "Paris is the capital.", "Q2": "Lyon is the capital.", "Q3": "Marseille, not Paris, is the capital.",
}


@pytest.fixture
def judge_server():
    with FakeLLMServer(api_key=API_KEY, answers=VERDICTS) as srv:
        yield srv


def judge_block(server, **extra):
    return {"_target_": "pikeclient.backends.openai.OpenAIClient", "model": "judge-model",
            "base_url": f"{server.url}/v1", "api_key_env": "OPENAI_API_KEY", **extra}


def items():
    return [PromptItem(f"q{n}", ({"role": "user", "content": f"Q{n}: capital of France?"},), expectations=PARIS)
            for n in (1, 2, 3)]


def test_a_judge_with_fixed_verdicts_one_malformed(judge_server, api_env):
    evaluator = Evaluator.from_config({"scorers": {"contains": {"_target_": "pikeclient.eval.scorers.contains"}},
                                       "judges": {"correctness": {"_target_": "pikeclient.eval.judge.Correctness"}},
                                       "judge": judge_block(judge_server), "concurrency": 2})
    answers = ["Paris is the capital.", "Lyon is the capital.", "Marseille, not Paris, is the capital."]
    worker = evaluator.start()
    for index, (item, answer) in enumerate(zip(items(), answers)):
        worker.submit({"index": index, "response": answer, "error": None}, item)
    scores = worker.finish()
    judged = [scores[i]["correctness"] for i in range(3)]
    assert [s.value for s in judged] == [True, False, None]
    assert judged[0].rationale == "States Paris." and judged[0].source == LLM_JUDGE
    assert judged[0].source_id == "openai:/judge-model"
    assert judged[2].error.startswith("unparseable verdict: 'Hmm, I would say")
    metrics = evaluator.metrics(scores.values())
    assert metrics["correctness/mean"] == 0.5 and metrics["correctness/count"] == 2
    assert metrics["correctness/errors"] == 1
    assert metrics["contains/mean"] == pytest.approx(2 / 3)
    # Per call: a failed score fails the call; the malformed verdict leaves the third one open.
    assert metrics["quality/passed"] == 1 and metrics["quality/failed"] == 1 and metrics["quality/errors"] == 1
    assert metrics["quality/pass_rate"] == 0.5
    assert metrics["judge/calls"] == 3 and metrics["judge/errors"] == 1
    judge_requests = [r for r in judge_server.log if r.body.get("model") == "judge-model"]
    assert len(judge_requests) == 3
    words = sum(len(VERDICTS[k].split()) for k in list(VERDICTS)[:3])
    assert metrics["judge/completion_tokens"] == words
    assert metrics["judge/tokens"] == metrics["judge/prompt_tokens"] + words
    assert "judge/cost_usd" not in metrics  # no price given


def test_judge_cost_from_a_price(judge_server, api_env):
    class Price:
        currency = "USD"

        def cost(self, prompt_tokens, completion_tokens):
            return prompt_tokens * 1e-6 + completion_tokens * 2e-6

    judge = Judge.from_config(judge_block(judge_server))
    Correctness(judge)(inputs={"messages": [{"role": "user", "content": "Q1"}]}, outputs="Paris is the capital.",
                       expectations=PARIS.mapping)
    usage = judge.usage
    metrics = usage.metrics(Price())
    assert metrics["judge/cost_usd"] == pytest.approx(usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6)


def test_a_failed_judge_call_is_an_error_on_the_score(api_env):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(script=["500"])) as srv:
        judge = Judge.from_config(judge_block(srv), retry={"max_attempts": 1})
        score = Guidelines(judge)(inputs={"messages": [{"role": "user", "content": "Hi"}]}, outputs="Hello",
                                  expectations={"guidelines": ["Be polite"]})
    assert score.value is None and score.error.startswith("judge call failed (server): HTTP 500")
    assert judge.usage.metrics() == {"judge/calls": 1.0, "judge/errors": 1.0, "judge/prompt_tokens": 0.0,
                                     "judge/completion_tokens": 0.0, "judge/tokens": 0.0}


def test_judges_say_nothing_without_their_expectations(judge_server, api_env):
    judge = Judge.from_config(judge_block(judge_server))
    assert Correctness(judge)(inputs={}, outputs="x", expectations={"guidelines": ["g"]}) is None
    assert Guidelines(judge)(inputs={}, outputs="x", expectations={"expected_response": "r"}) is None
    assert judge_server.log == []


def test_the_judge_prompt_carries_question_answer_reference_and_facts(judge_server, api_env):
    judge = Judge.from_config(judge_block(judge_server))
    Correctness(judge)(inputs={"messages": [{"role": "user", "content": "Q1: capital?"}]},
                       outputs="Paris is the capital.",
                       expectations={"expected_response": "Paris", "expected_facts": ["Paris is in France"]})
    body = judge_server.log[-1].body
    assert body["temperature"] == 0.0 and body["max_tokens"] == 512
    system, user = body["messages"]
    assert system["role"] == "system" and "JSON" in system["content"]
    for part in ("<question>\nQ1: capital?\n</question>", "<answer>\nParis is the capital.\n</answer>",
                 "<reference>\nParis\n</reference>", "<expected_facts>\n- Paris is in France\n</expected_facts>",
                 '"result": "yes" or "no"'):
        assert part in user["content"]


def test_judge_calls_never_count_in_the_measured_run(judge_server, api_env):
    """The measured calls go through run_prompts with the scoring worker on its on_record hook; the judge
    runs afterwards on its own client. The run's figures hold the measured calls only."""
    measured = OpenAIClient(model="measured-model", base_url=f"{judge_server.url}/v1")
    evaluator = Evaluator.from_config({"scorers": {"contains": {"_target_": "pikeclient.eval.scorers.contains"}},
                                       "judges": {"correctness": {"_target_": "pikeclient.eval.judge.Correctness"}},
                                       "judge": judge_block(judge_server)})
    worker = evaluator.start()
    records = []

    def on_record(record, item):
        records.append(record)
        worker.submit(record, item)

    stats = asyncio.run(run_prompts(measured, items(), 3, on_record=on_record))
    scores = worker.finish()
    measured_requests = [r for r in judge_server.log if r.body.get("model") == "measured-model"]
    judge_requests = [r for r in judge_server.log if r.body.get("model") == "judge-model"]
    assert len(measured_requests) == 3 and len(judge_requests) == 3
    assert stats.calls == 3 and stats.measured == 3
    assert stats.completion_tokens == sum(len(r["response"].split()) for r in records) == 4 + 4 + 6
    assert stats.prompt_tokens == 3 * 4  # the server counts words: "Qn: capital of France?"
    assert len(stats.latencies) == 3
    assert evaluator.metrics(scores.values())["judge/calls"] == 3
    assert [scores[r["index"]]["correctness"].value for r in sorted(records, key=lambda r: r["index"])] == \
        [True, False, None]


def test_a_judge_needs_a_judge_block():
    with pytest.raises(ConfigError, match="eval.judges.correctness needs a judge: set eval.judge"):
        Evaluator.from_config({"judges": {"correctness": {"_target_": "pikeclient.eval.judge.Correctness"}}})


def test_a_bad_judge_block_is_named_as_such(api_env):
    with pytest.raises(ConfigError, match=r"^eval\.judge\.model is empty"):
        Judge.from_config({"_target_": "pikeclient.backends.openai.OpenAIClient", "model": ""})
    with pytest.raises(ConfigError, match=r"^eval\.judge\.bogus: unknown argument of OpenAIClient"):
        Judge.from_config({"_target_": "pikeclient.backends.openai.OpenAIClient", "model": "m", "bogus": 1})


def test_contains_is_unaffected_by_the_judge():
    assert contains(outputs="Paris", expectations=PARIS.mapping).value is True
