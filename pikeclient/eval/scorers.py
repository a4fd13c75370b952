"""Deterministic scorers, each a plain function in MLflow's ``@scorer`` shape.

``scorer(*, inputs, outputs, expectations, trace=None) -> Score | None``: ``inputs`` is
``{"messages": [...]}``, ``outputs`` the answer's text, ``expectations`` a dict by kind (see
:mod:`pikeclient.eval.expectations`; raw dataset values work too). A scorer returns None when the line
expects nothing it checks, otherwise a pass/fail :class:`~pikeclient.eval.score.Score` with a rationale.
``conf/eval/basic.yaml`` names them by ``_target_``; a scorer of your own is a function with the same
signature named the same way (``pikeclient.tracking.assessments.as_mlflow_scorer`` hands one to MLflow).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pikeclient.eval.expectations import expectation
from pikeclient.eval.normalize import choice_letter, final_number, fold, normalize_answer, parse_json_answer
from pikeclient.eval.score import Score

SHOWN = 80  # characters of an answer quoted in a rationale
F = TypeVar("F", bound=Callable[..., Any])


def reads(kind: str) -> Callable[[F], F]:
    """Mark a scorer as reading only the ``kind`` expectation: the evaluator skips it on lines without one
    (a scorer without the mark is called on every answer)."""

    def mark(fn: F) -> F:
        fn.reads = kind  # type: ignore[attr-defined]
        return fn

    return mark


@reads("answers")
def exact_match(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                trace: Any = None) -> Score | None:
    """``answers``: the answer equals one of the accepted answers after SQuAD's normalization (Unicode
    NFKC, case, punctuation, articles, whitespace). Strict: "Paris." matches "paris", "It is Paris" does
    not (use ``contains`` for that)."""
    answers = expectation(expectations, "answers")
    if answers is None:
        return None
    got = normalize_answer(text_of(outputs))
    for answer in answers:
        if got == normalize_answer(answer):
            return _score(True, f"matches {answer!r}", "exact_match")
    return _score(False, f"{_quote(outputs)} matches none of {list(answers)!r}", "exact_match")


@reads("contains")
def contains(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
             trace: Any = None) -> Score | None:
    """``contains``: all (or any) of the texts occur in the answer, ignoring case, Unicode compatibility
    forms and runs of whitespace."""
    spec = expectation(expectations, "contains")
    if spec is None:
        return None
    answer = fold(text_of(outputs))
    found = [t for t in spec.texts if fold(t) in answer]
    ok = bool(found) if spec.mode == "any" else len(found) == len(spec.texts)
    if spec.mode == "any":
        why = f"contains {found[0]!r}" if ok else f"contains none of {list(spec.texts)!r}"
    else:
        missing = [t for t in spec.texts if t not in found]
        why = f"contains all of {list(spec.texts)!r}" if ok else f"missing {missing!r}"
    return _score(ok, why, "contains")


@reads("regex")
def regex_match(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                trace: Any = None) -> Score | None:
    """``regex``: the pattern is found in the answer (``match_type: fullmatch``: matches all of it)."""
    spec = expectation(expectations, "regex")
    if spec is None:
        return None
    text = text_of(outputs)
    found = spec.compiled.fullmatch(text) if spec.match_type == "fullmatch" else spec.compiled.search(text)
    verb = "matches" if found else "does not match"
    return _score(found is not None, f"{verb} {spec.pattern!r} ({spec.match_type})", "regex_match")


@reads("json")
def is_json(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
            trace: Any = None) -> Score | None:
    """``json``: the answer is JSON (whole, or one fenced code block), with the ``required`` keys of an
    object, valid against ``schema`` if given."""
    spec = expectation(expectations, "json")
    if spec is None:
        return None
    ok, value = parse_json_answer(text_of(outputs))
    if not ok:
        return _score(False, value, "is_json")
    if spec.required:
        if not isinstance(value, dict):
            kind = type(value).__name__
            return _score(False, f"a JSON {kind}, not an object with {list(spec.required)!r}", "is_json")
        missing = [k for k in spec.required if k not in value]
        if missing:
            return _score(False, f"missing keys {missing!r}", "is_json")
    if spec.validator is not None:
        problem = next(iter(spec.validator.iter_errors(value)), None)
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "(root)"
            return _score(False, f"schema: {where}: {problem.message}", "is_json")
    return _score(True, "valid JSON" + (" with the required keys" if spec.required else ""), "is_json")


@reads("number")
def numeric_match(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                  trace: Any = None) -> Score | None:
    """``number``: the answer's number (after "answer is"/"="/..., else its last number; digits or English
    number words, see :func:`pikeclient.eval.normalize.numbers`) is within the tolerance of the value."""
    spec = expectation(expectations, "number")
    if spec is None:
        return None
    got = final_number(text_of(outputs))
    if got is None:
        return _score(False, "no number in the answer", "numeric_match")
    within = f"within {spec.tolerance:g}" if spec.tolerance else "equal to"
    if spec.relative:
        within = f"within {spec.tolerance:g} or {spec.relative:.2%} of"
    ok = spec.accepts(got)
    return _score(ok, f"read {got:g}, {'' if ok else 'not '}{within} {spec.value:g}", "numeric_match")


@reads("choice")
def choice_match(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                 trace: Any = None) -> Score | None:
    """``choice``: the option letter the answer chose ("B", "(B)", "The answer is B.") is the right one."""
    spec = expectation(expectations, "choice")
    if spec is None:
        return None
    got = choice_letter(text_of(outputs), spec.options)
    if got is None:
        return _score(False, f"no option letter ({spec.options}) found", "choice_match")
    return _score(got == spec.answer, f"chose {got}, expected {spec.answer}", "choice_match")


@reads("length")
def response_length(*, inputs: Any = None, outputs: Any = None, expectations: Mapping[str, Any] | None = None,
                    trace: Any = None) -> Score | None:
    """``length``: the answer's length in characters (or words) is within the bounds (as MLflow's
    ``ResponseLength``)."""
    spec = expectation(expectations, "length")
    if spec is None:
        return None
    size = spec.measure(text_of(outputs))
    low = spec.min_length if spec.min_length is not None else 0
    high = spec.max_length if spec.max_length is not None else float("inf")
    return _score(low <= size <= high, f"{size} {spec.unit}, bounds [{low}, {high:g}]", "response_length")


def text_of(outputs: Any) -> str:
    """An answer's text: a string, or the ``text``/``content``/``response`` of a dict (a trace's outputs)."""
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, Mapping):
        for key in ("text", "content", "response"):
            if isinstance(outputs.get(key), str):
                return outputs[key]
    return "" if outputs is None else str(outputs)


def _score(value: bool, rationale: str, name: str) -> Score:
    return Score(value, rationale, source_id=name)


def _quote(outputs: Any) -> str:
    text = " ".join(text_of(outputs).split())
    return repr(text if len(text) <= SHOWN else text[:SHOWN] + "...")
