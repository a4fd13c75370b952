"""What a good answer looks like: the ``expectations`` object of a dataset line.

MLflow's names for what a judge reads (``expected_response``, ``expected_facts``, ``guidelines``) and
the checkable kinds people use in promptfoo, each parsed once into a small frozen object::

    {"id": "cap", "prompt": "Capital of France?", "expectations": {"contains": "Paris"}}
    {"id": "sum", "prompt": "What is 6 x 7?", "expectations": {"number": {"value": 42, "tolerance": 0}}}

Every kind has one parser (a ``parse`` classmethod) that accepts the dataset's shorthand and the parsed
object alike, so a scorer handed MLflow-style raw expectations (``mlflow.genai.evaluate``) reads them the
same way. A malformed expectation is a :class:`~pikeclient.core.errors.ConfigError` naming the line.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar, Literal

from pikeclient.core.errors import ConfigError

# -- value checks (ValueError; Expectations.parse adds the line and the kind) --------------------------


def _object(value: Any, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object with {', '.join(required + optional)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"missing {missing[0]!r}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(required + optional)})")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _texts(value: Any, name: str = "value") -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name} must not be an empty list")
    return tuple(_string(item, f"each {name}" if isinstance(value, (list, tuple)) else name) for item in items)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected true or false")
    return value


def _letter(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value.strip()) != 1 or value.strip().upper() not in string.ascii_uppercase:
        raise ValueError(f"{name}={value!r}: expected one letter A-Z")
    return value.strip().upper()


@dataclass(frozen=True)
class Contains:
    """Texts the answer must contain, compared case-insensitively: ``all`` of them or ``any`` one.

    ``"Paris"`` and ``["Paris", "France"]`` mean all; ``{"any": [...]}`` or ``{"all": [...]}`` say which."""

    texts: tuple[str, ...]
    mode: Literal["all", "any"] = "all"

    @classmethod
    def parse(cls, value: Any) -> Contains:
        if isinstance(value, cls):
            return value
        mode = "all"
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in ("all", "any"):
                raise ValueError("an object takes one key, 'any' or 'all'")
            mode, value = next(iter(value.items()))
        return cls(_texts(value), mode)

    def to_json(self) -> dict[str, list[str]]:
        return {self.mode: list(self.texts)}


@dataclass(frozen=True)
class RegexMatch:
    """A regular expression (Python's ``re``), with MLflow's ``RegexMatch`` options; compiled when parsed."""

    pattern: str
    match_type: Literal["search", "fullmatch"] = "search"
    case_insensitive: bool = False
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern, re.IGNORECASE if self.case_insensitive else 0)
        except re.error as error:
            raise ValueError(f"invalid pattern {self.pattern!r}: {error}") from None
        object.__setattr__(self, "compiled", compiled)

    @classmethod
    def parse(cls, value: Any) -> RegexMatch:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        options = _object(value, required=("pattern",), optional=("match_type", "case_insensitive"))
        match_type = options.get("match_type", "search")
        if match_type not in ("search", "fullmatch"):
            raise ValueError(f"match_type={match_type!r}: allowed search, fullmatch")
        return cls(_string(options["pattern"], "pattern"), match_type,
                   _bool(options.get("case_insensitive", False), "case_insensitive"))

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "match_type": self.match_type, "case_insensitive": self.case_insensitive}


@dataclass(frozen=True)
class JsonCheck:
    """The answer is JSON (the whole answer, or one fenced code block); optionally an object with
    ``required`` keys, or valid against a JSON ``schema`` (its draft from ``$schema``, else 2020-12)."""

    required: tuple[str, ...] = ()
    schema: Mapping[str, Any] | None = field(default=None, hash=False)
    validator: Any = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.schema is not None:
            from jsonschema import exceptions, validators  # only where a line asks for a schema

            cls = validators.validator_for(self.schema)
            try:
                cls.check_schema(self.schema)
            except exceptions.SchemaError as error:
                raise ValueError(f"invalid schema: {error.message}") from None
            object.__setattr__(self, "validator", cls(self.schema))

    @classmethod
    def parse(cls, value: Any) -> JsonCheck:
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        options = _object(value, optional=("required", "schema"))
        schema = options.get("schema")
        if schema is not None and not isinstance(schema, Mapping):
            raise ValueError("schema must be a JSON object")
        return cls(_texts(options["required"], "required") if "required" in options else (), schema)

    def to_json(self) -> dict[str, Any]:
        return {"required": list(self.required), "schema": self.schema}


@dataclass(frozen=True)
class NumberCheck:
    """A number, within ``tolerance`` (absolute) or ``relative`` (a share of the value) of it."""

    value: float
    tolerance: float = 0.0
    relative: float = 0.0

    @classmethod
    def parse(cls, value: Any) -> NumberCheck:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            return cls(_number(value, "value"))
        options = _object(value, required=("value",), optional=("tolerance", "relative"))
        check = cls(_number(options["value"], "value"), _number(options.get("tolerance", 0), "tolerance"),
                    _number(options.get("relative", 0), "relative"))
        if check.tolerance < 0 or check.relative < 0:
            raise ValueError("tolerance and relative must be >= 0")
        return check

    def accepts(self, number: float) -> bool:
        # A hair of slack for decimals that binary floats cannot hold (0.1 + 0.2).
        slack = max(self.tolerance, self.relative * abs(self.value), 1e-9 * max(abs(self.value), 1.0))
        return abs(number - self.value) <= slack

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "tolerance": self.tolerance, "relative": self.relative}


@dataclass(frozen=True)
class ChoiceCheck:
    """A multiple-choice letter; ``options`` are the letters the question offers (default A to D, or up
    to the answer's letter), so that no other capital letter in an answer is read as the choice."""

    answer: str
    options: str = "ABCD"

    @classmethod
    def parse(cls, value: Any) -> ChoiceCheck:
        if isinstance(value, cls):
            return value
        options = None
        if isinstance(value, Mapping):
            given = _object(value, required=("answer",), optional=("options",))
            value, options = given["answer"], given.get("options")
        answer = _letter(value, "answer")
        if options is None:
            options = string.ascii_uppercase[: max(4, string.ascii_uppercase.index(answer) + 1)]
        else:
            letters = [_letter(o, "options") for o in (options if isinstance(options, list) else list(str(options)))]
            options = "".join(dict.fromkeys(letters))
        if answer not in options:
            raise ValueError(f"answer {answer!r} is not one of the options {options!r}")
        return cls(answer, options)

    def to_json(self) -> dict[str, str]:
        return {"answer": self.answer, "options": self.options}


@dataclass(frozen=True)
class LengthBounds:
    """Length bounds with MLflow's ``ResponseLength`` names: ``min_length``/``max_length`` (inclusive)
    in ``chars`` (default) or ``words`` (whitespace-separated)."""

    min_length: int | None = None
    max_length: int | None = None
    unit: Literal["chars", "words"] = "chars"

    @classmethod
    def parse(cls, value: Any) -> LengthBounds:
        if isinstance(value, cls):
            return value
        options = _object(value, optional=("min_length", "max_length", "unit"))
        low, high = options.get("min_length"), options.get("max_length")
        if low is None and high is None:
            raise ValueError("give min_length, max_length or both")
        for name, bound in (("min_length", low), ("max_length", high)):
            if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
                raise ValueError(f"{name}={bound!r}: expected an integer >= 0")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_length={low} is above max_length={high}")
        unit = options.get("unit", "chars")
        if unit not in ("chars", "words"):
            raise ValueError(f"unit={unit!r}: allowed chars, words")
        return cls(low, high, unit)

    def measure(self, text: str) -> int:
        return len(text.split()) if self.unit == "words" else len(text)

    def to_json(self) -> dict[str, Any]:
        return {"min_length": self.min_length, "max_length": self.max_length, "unit": self.unit}


def _expected_response(value: Any) -> str:
    return _string(value, "value")


def _answers(value: Any) -> tuple[str, ...]:
    # Numbers are accepted answers too ("answers": [42, "forty-two"]); booleans are not.
    def text(v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    return _texts([text(v) for v in value] if isinstance(value, (list, tuple)) else text(value))


@dataclass(frozen=True)
class Expectations:
    """What one prompt expects of its answer; every field is optional (None: nothing of that kind)."""

    expected_response: str | None = None
    expected_facts: tuple[str, ...] | None = None
    guidelines: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None
    contains: Contains | None = None
    regex: RegexMatch | None = None
    json: JsonCheck | None = None
    number: NumberCheck | None = None
    choice: ChoiceCheck | None = None
    length: LengthBounds | None = None

    # One parser per kind: a new kind is a field here, a parser and a scorer, not a branch elsewhere.
    PARSERS: ClassVar[dict[str, Any]] = {
        "expected_response": _expected_response, "expected_facts": _texts, "guidelines": _texts,
        "answers": _answers, "contains": Contains.parse, "regex": RegexMatch.parse, "json": JsonCheck.parse,
        "number": NumberCheck.parse, "choice": ChoiceCheck.parse, "length": LengthBounds.parse,
    }

    @classmethod
    def parse(cls, data: Any, where: str) -> Expectations:
        """Parse a line's ``expectations`` object; ``where`` (``file:line``) starts every error message."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: 'expectations' must be a JSON object")
        values = {}
        for kind, value in data.items():
            parser = cls.PARSERS.get(kind)
            if parser is None:
                raise ConfigError(f"{where}: expectations.{kind}: unknown kind (allowed: {', '.join(cls.PARSERS)})")
            try:
                values[kind] = parser(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{where}: expectations.{kind}: {error}") from None
        return cls(**values)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @cached_property
    def mapping(self) -> dict[str, Any]:
        """What scorers get as ``expectations`` (MLflow's shape: a dict by name). MLflow's own names hold
        plain strings and lists, as its judges read them; pikeclient's kinds hold the parsed objects."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-able values by name: for records and for MLflow Expectation assessments."""
        return {name: value.to_json() if hasattr(value, "to_json") else value for name, value in self.mapping.items()}


def expectation(expectations: Mapping[str, Any] | None, kind: str) -> Any:
    """The parsed expectation of ``kind`` in a scorer's ``expectations`` (raw or parsed), or None."""
    if not expectations or expectations.get(kind) is None:
        return None
    return Expectations.PARSERS[kind](expectations[kind])
