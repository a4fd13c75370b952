"""An LLM judge: any pikeclient client grades answers against ``expected_response``/``expected_facts``
(:class:`Correctness`) or ``guidelines`` (:class:`Guidelines`), as MLflow's judges of the same names.

The judge has its own client, built like ``llm`` from the ``eval.judge`` block (``_target_``, key
variable, model): never the measured client, so it shares no connection pool, concurrency or rate limit
with the calls being measured, and its calls, tokens and cost are counted apart (:class:`JudgeUsage`).
It is asked for a strict JSON verdict, ``{"rationale": "...", "result": "yes" | "no"}`` (MLflow's own
verdict format); an unparseable verdict or a failed judge call is an error on that score, never a "no".
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, LLMError, one_line
from pikeclient.eval.expectations import expectation
from pikeclient.eval.score import LLM_JUDGE, Score
from pikeclient.eval.scorers import text_of

log = logging.getLogger(__name__)

SYSTEM = "You are a strict grader. You judge one answer at a time and reply with a single JSON object only."
REPLY = ('Reply with only this JSON object, no markdown and nothing before or after it:\n'
         '{"rationale": "<one or two sentences>", "result": "yes" or "no"}')
CORRECTNESS = ('Judge whether the answer to the question is correct.\n\n{material}\n\nThe result is "yes" if the '
               "answer agrees with the reference answer and states every expected fact (in any words), and "
               'nothing in it contradicts them; otherwise "no".\n\n' + REPLY)
GUIDELINES = ('Judge whether the answer follows every guideline.\n\n{material}\n\nThe result is "yes" if the '
              'answer follows every guideline, "no" if it breaks any.\n\n' + REPLY)
# How the judge is sampled unless eval.judge_sampling says otherwise: deterministic, room for a rationale.
JUDGE_SAMPLING = {"temperature": 0.0, "max_tokens": 512}


@dataclass
class JudgeUsage:
    """The judge's own calls, apart from the run's: never in its latency, tokens, cost or throughput."""

    calls: int = 0
    errors: int = 0  # failed calls and unparseable verdicts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    uncounted: int = 0  # calls whose token counts are unknown
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        with self.lock:
            self.calls += 1
            if prompt_tokens is None or completion_tokens is None:
                self.uncounted += 1
            else:
                self.prompt_tokens += prompt_tokens
                self.completion_tokens += completion_tokens

    def failed_call(self) -> None:
        """A call that failed after its retries: counted, with no tokens (failed requests are not billed)."""
        with self.lock:
            self.calls += 1
            self.errors += 1

    def unreadable(self) -> None:
        """A verdict that could not be read (its call and tokens were counted by :meth:`add`)."""
        with self.lock:
            self.errors += 1

    def to_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "uncounted": self.uncounted}

    def absorb(self, earlier: Mapping[str, Any]) -> None:
        """Add an earlier attempt's usage (``to_dict``): a resumed run's judge figures cover the whole run."""
        with self.lock:
            for name in ("calls", "errors", "prompt_tokens", "completion_tokens", "uncounted"):
                setattr(self, name, getattr(self, name) + int(earlier.get(name) or 0))

    def metrics(self, price: Any = None) -> dict[str, float]:
        """``judge/calls``, ``judge/errors``, ``judge/tokens`` (and its parts) and, with a ``price`` (anything
        with ``cost(prompt_tokens, completion_tokens)`` and ``currency``, as ``pikeclient.run.cost.Price``)
        and every call counted, ``judge/cost_<currency>`` (``judge/cost_usd``). MLflow's chart view shows
        them in their own section, apart from the run's Latency, tokens and Cost."""
        out = {"judge/calls": float(self.calls), "judge/errors": float(self.errors),
               "judge/prompt_tokens": float(self.prompt_tokens),
               "judge/completion_tokens": float(self.completion_tokens),
               "judge/tokens": float(self.prompt_tokens + self.completion_tokens)}
        if price is not None and not self.uncounted:
            out[f"judge/cost_{price.currency.lower()}"] = price.cost(self.prompt_tokens, self.completion_tokens)
        return out


class Judge:
    """One judge client and its usage; :meth:`grade` asks it for one verdict (thread-safe)."""

    def __init__(self, client: BaseLLMClient) -> None:
        self.client = client
        described = client.describe()
        self.model_id = f"{described.get('provider', 'unknown')}:/{described.get('model', client.model)}"
        self.usage = JudgeUsage()

    @classmethod
    def from_config(cls, judge: Mapping[str, Any], sampling: Mapping[str, Any] | None = None,
                    retry: Mapping[str, Any] | None = None) -> Judge:
        """Build the judge's client from an ``llm``-like block (``eval.judge``), with its own sampling."""
        from pikeclient.config.factory import build_client

        try:
            client = build_client(dict(judge), {**JUDGE_SAMPLING, **(sampling or {})}, dict(retry or {}), {})
        except ConfigError as error:  # the factory names llm.*: here it is the judge's block
            raise ConfigError(re.sub(r"^llm\b", "eval.judge", str(error))) from None
        return cls(client)

    def grade(self, template: str, material: str) -> Score:
        """Ask for a verdict; a failed call or an unreadable verdict is an error on the score."""
        prompt = template.replace("{material}", material)  # not format(): the template shows JSON braces
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        try:
            result = self.client.chat(messages)
        except LLMError as error:
            self.usage.failed_call()
            return Score.failed(f"judge call failed ({error.kind}): {one_line(error)}", source=LLM_JUDGE,
                                source_id=self.model_id)
        self.usage.add(result.usage.prompt_tokens, result.usage.completion_tokens)
        try:
            value, rationale = parse_verdict(result.text)
        except ValueError as error:
            self.usage.unreadable()
            return Score.failed(str(error), source=LLM_JUDGE, source_id=self.model_id)
        return Score(value, rationale, LLM_JUDGE, self.model_id)

    def close(self) -> None:
        self.client.close()


def parse_verdict(text: str) -> tuple[bool, str | None]:
    """``(passed, rationale)`` from ``{"result": "yes"|"no", "rationale": ...}`` (a code fence or words
    around the one object are tolerated); ValueError for anything else."""
    body = re.sub(r"^```\w*\s*|\s*```$", "", text.strip())
    start, end = body.find("{"), body.rfind("}")
    try:
        verdict = json.loads(body[start:end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        verdict = None
    if not isinstance(verdict, dict):
        raise ValueError(f"unparseable verdict: {_clip(text)!r}")
    result = verdict.get("result")
    if isinstance(result, str) and result.strip().lower() in ("yes", "no"):
        passed = result.strip().lower() == "yes"
    elif isinstance(result, bool):
        passed = result
    else:
        raise ValueError(f"verdict without a yes/no result: {_clip(text)!r}")
    rationale = verdict.get("rationale")
    return passed, rationale if isinstance(rationale, str) else None


class Correctness:
    """Is the answer right? Graded against ``expected_response`` and/or ``expected_facts``."""

    name = "correctness"

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def __call__(self, *, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                 trace: Any = None) -> Score | None:
        reference = expectation(expectations, "expected_response")
        facts = expectation(expectations, "expected_facts")
        if reference is None and facts is None:
            return None
        parts = [_tag("question", question_of(inputs)), _tag("answer", text_of(outputs))]
        if reference is not None:
            parts.append(_tag("reference", reference))
        if facts is not None:
            parts.append(_tag("expected_facts", "\n".join(f"- {fact}" for fact in facts)))
        return self.judge.grade(CORRECTNESS, "\n".join(parts))


class Guidelines:
    """Does the answer follow the line's ``guidelines``?"""

    name = "guidelines"

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def __call__(self, *, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                 trace: Any = None) -> Score | None:
        guidelines = expectation(expectations, "guidelines")
        if guidelines is None:
            return None
        material = "\n".join([_tag("question", question_of(inputs)), _tag("answer", text_of(outputs)),
                              _tag("guidelines", "\n".join(f"- {g}" for g in guidelines))])
        return self.judge.grade(GUIDELINES, material)


def question_of(inputs: Any) -> str:
    """The question a judge reads: the one message's text, or the whole conversation, one turn a line."""
    messages = inputs.get("messages") if isinstance(inputs, Mapping) else None
    if not messages:
        return "" if inputs is None else str(inputs)
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in messages)


def _tag(name: str, text: str) -> str:
    return f"<{name}>\n{text}\n</{name}>"


def _clip(text: str, size: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= size else flat[:size] + "..."
