"""One score of one answer, in MLflow's Feedback shape, and what a call's scores add up to.

A scorer may return a plain value, a :class:`Score`, an MLflow ``Feedback`` (or a list of them) or None
(the line expects nothing this scorer checks). :func:`as_scores` turns any of these into Scores without
importing mlflow: a Feedback is read by its attributes. In records a score is ``Score.to_dict()``::

    {"value": true, "rationale": "...", "source": "CODE", "source_id": "exact_match", "error": null}

``value`` True/False is pass/fail; a number is a graded score; ``error`` set means the score could not
be computed (a failed or unparseable judge call): its value is None, it is left out of every mean and
counted in ``<scorer>/errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pikeclient.core.errors import one_line

CODE = "CODE"
LLM_JUDGE = "LLM_JUDGE"
HUMAN = "HUMAN"

ScoreValue = bool | int | float | str | None


@dataclass(frozen=True)
class Score:
    """A scorer's verdict on one answer, with where it came from (MLflow's ``AssessmentSource``: the type,
    and the scorer's name or the judge's model)."""

    value: ScoreValue = None
    rationale: str | None = None
    source: str = CODE
    source_id: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, error: BaseException | str, *, source: str = CODE, source_id: str | None = None) -> Score:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {one_line(error)}"
        return cls(None, None, source, source_id, message)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "rationale": self.rationale, "source": self.source,
                "source_id": self.source_id, "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        return cls(data.get("value"), data.get("rationale"), data.get("source", CODE), data.get("source_id"),
                   data.get("error"))


def as_scores(name: str, result: Any, *, source: str = CODE, source_id: str | None = None) -> dict[str, Score]:
    """A scorer's return value as ``{name: Score}``; {} for None; a list of Feedbacks by their own names."""
    if result is None:
        return {}
    if isinstance(result, list):
        scores: dict[str, Score] = {}
        for item in result:
            scores.update(as_scores(getattr(item, "name", None) or name, item, source=source, source_id=source_id))
        return scores
    if isinstance(result, Score):
        return {name: result}
    if hasattr(result, "value") and hasattr(result, "rationale"):  # an MLflow Feedback
        return {name: _from_feedback(result, source, source_id)}
    if isinstance(result, (bool, int, float, str)):
        return {name: Score(_plain(result), None, source, source_id)}
    raise TypeError(f"scorer {name!r} returned a {type(result).__name__}: expected a value, a Score, a Feedback "
                    "or None")


def _from_feedback(feedback: Any, source: str, source_id: str | None) -> Score:
    origin = getattr(feedback, "source", None)
    source = str(getattr(origin, "source_type", None) or source)
    source_id = getattr(origin, "source_id", None) or source_id
    error = getattr(feedback, "error", None)
    if error is not None:
        message = getattr(error, "error_message", None) or getattr(error, "error_code", None) or str(error)
        return Score(None, feedback.rationale, source, source_id, one_line(Exception(message)))
    return Score(_plain(feedback.value), feedback.rationale, source, source_id)


def _plain(value: Any) -> ScoreValue:
    """MLflow's judges answer "yes"/"no" (a str enum): pass/fail, as MLflow aggregates them."""
    if isinstance(value, str):
        lowered = str(value.value if hasattr(value, "value") else value).strip().lower()
        if lowered in ("yes", "no"):
            return lowered == "yes"
        return str(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)


def numeric(value: ScoreValue) -> float | None:
    """A score's value as a number for means (True 1.0, False 0.0), or None (text, no value)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


Verdict = Literal["pass", "fail", "error"]


def verdict(scores: Mapping[str, Score | Mapping[str, Any]]) -> Verdict | None:
    """A call's verdict from its scores: ``fail`` if any pass/fail score failed, else ``error`` if any score
    could not be computed, else ``pass`` if it has pass/fail scores (all passed), else None (nothing to pass)."""
    outcome: Verdict | None = None
    for score in scores.values():
        value, error = _get(score, "value"), _get(score, "error")
        if value is False:
            return "fail"
        if error is not None:
            outcome = "error"
        elif value is True and outcome is None:
            outcome = "pass"
    return outcome


def passed(scores: Mapping[str, Score | Mapping[str, Any]]) -> bool:
    """Whether a call passed all its pass/fail scores (``slo.require_correct``): a call with none passes;
    a score that could not be computed is not a pass."""
    return verdict(scores) in ("pass", None)


def meets_slo(slo_met: bool, scores: Mapping[str, Score | Mapping[str, Any]], require_correct: bool) -> bool:
    """Whether a call counts toward goodput: fast enough, and with ``require_correct`` also right."""
    return slo_met and (not require_correct or passed(scores))


def _get(score: Score | Mapping[str, Any], name: str) -> Any:
    return score.get(name) if isinstance(score, Mapping) else getattr(score, name)
