"""Expectations: every kind's shorthand and full form, and one clear line for every malformed one."""

import pytest

from pikeclient.core.errors import ConfigError
from pikeclient.eval.expectations import (
    ChoiceCheck,
    Contains,
    Expectations,
    JsonCheck,
    LengthBounds,
    NumberCheck,
    RegexMatch,
    expectation,
)
from pikeclient.run.dataset import load_prompts


@pytest.mark.parametrize(("kind", "given", "parsed"), [
    ("expected_response", "Paris", "Paris"),
    ("expected_facts", "Paris is the capital", ("Paris is the capital",)),
    ("expected_facts", ["a", "b"], ("a", "b")),
    ("guidelines", "Answer in French", ("Answer in French",)),
    ("answers", "Paris", ("Paris",)),
    ("answers", ["Paris", 42, 1.5], ("Paris", "42", "1.5")),
    ("contains", "Paris", Contains(("Paris",), "all")),
    ("contains", ["Paris", "France"], Contains(("Paris", "France"), "all")),
    ("contains", {"any": ["Paris", "paris"]}, Contains(("Paris", "paris"), "any")),
    ("contains", {"all": "x"}, Contains(("x",), "all")),
    ("regex", r"^\d{4}-\d{2}-\d{2}$", RegexMatch(r"^\d{4}-\d{2}-\d{2}$")),
    ("regex", {"pattern": "paris", "case_insensitive": True, "match_type": "fullmatch"},
     RegexMatch("paris", "fullmatch", True)),
    ("json", True, JsonCheck()),
    ("json", {"required": ["name", "age"]}, JsonCheck(("name", "age"))),
    ("json", {"required": "name"}, JsonCheck(("name",))),
    ("number", 42, NumberCheck(42.0)),
    ("number", -0.5, NumberCheck(-0.5)),
    ("number", {"value": 200, "tolerance": 0.5}, NumberCheck(200.0, 0.5)),
    ("number", {"value": 1e6, "relative": 0.01}, NumberCheck(1e6, 0.0, 0.01)),
    ("choice", "b", ChoiceCheck("B", "ABCD")),
    ("choice", "F", ChoiceCheck("F", "ABCDEF")),
    ("choice", {"answer": "C", "options": ["A", "B", "C"]}, ChoiceCheck("C", "ABC")),
    ("choice", {"answer": "c", "options": "abc"}, ChoiceCheck("C", "ABC")),
    ("length", {"max_length": 20}, LengthBounds(None, 20)),
    ("length", {"min_length": 2, "max_length": 5, "unit": "words"}, LengthBounds(2, 5, "words")),
])
def test_each_kind_parses(kind, given, parsed):
    expectations = Expectations.parse({kind: given}, "f.jsonl:1")
    assert getattr(expectations, kind) == parsed
    assert bool(expectations)
    # Parsers take their own output: scorers can be handed raw or parsed expectations alike.
    assert expectation(expectations.mapping, kind) == parsed
    assert expectation({kind: given}, kind) == parsed


def test_a_json_schema_is_checked_and_kept():
    check = Expectations.parse({"json": {"schema": {"type": "object", "required": ["a"]}}}, "f:1").json
    assert check.validator is not None and check.schema == {"type": "object", "required": ["a"]}


def test_to_json_round_trips_through_parse():
    data = {"answers": ["Paris"], "contains": {"any": ["a", "b"]}, "regex": "x", "json": {"required": ["k"]},
            "number": {"value": 3, "tolerance": 1}, "choice": "B", "length": {"max_length": 9},
            "expected_response": "r", "expected_facts": ["f"], "guidelines": ["g"]}
    once = Expectations.parse(data, "f:1")
    assert Expectations.parse(once.to_json(), "f:1") == once


def test_empty_expectations_expect_nothing():
    assert not Expectations.parse({}, "f:1")
    assert Expectations().mapping == {}


@pytest.mark.parametrize(("given", "message"), [
    ([], "f.jsonl:7: 'expectations' must be a JSON object"),
    ({"contain": "x"}, "f.jsonl:7: expectations.contain: unknown kind (allowed: expected_response,"),
    ({"expected_response": ""}, "expectations.expected_response: value must be a non-empty string"),
    ({"expected_facts": []}, "expectations.expected_facts: value must not be an empty list"),
    ({"answers": [True]}, "expectations.answers: each value must be a non-empty string"),
    ({"answers": None}, "expectations.answers: value must be a non-empty string"),
    ({"contains": {"some": ["x"]}}, "expectations.contains: an object takes one key, 'any' or 'all'"),
    ({"contains": {"any": ["x", 3]}}, "expectations.contains: each value must be a non-empty string"),
    ({"regex": "(unclosed"}, "expectations.regex: invalid pattern '(unclosed'"),
    ({"regex": {"pattern": "x", "match_type": "prefix"}}, "match_type='prefix': allowed search, fullmatch"),
    ({"regex": {"pattern": "x", "flags": "i"}}, "expectations.regex: unknown key 'flags'"),
    ({"regex": {"pattern": "x", "case_insensitive": "yes"}}, "case_insensitive='yes': expected true or false"),
    ({"json": False}, "expectations.json: expected an object with required, schema"),
    ({"json": {"schema": {"type": "nonsense"}}}, "expectations.json: invalid schema:"),
    ({"json": {"schema": "object"}}, "expectations.json: schema must be a JSON object"),
    ({"number": "42"}, "expectations.number: value='42': expected a finite number"),
    ({"number": True}, "expectations.number: value=True: expected a finite number"),
    ({"number": {"value": 1, "tolerance": -1}}, "expectations.number: tolerance and relative must be >= 0"),
    ({"number": {"tolerance": 1}}, "expectations.number: missing 'value'"),
    ({"choice": "AB"}, "expectations.choice: answer='AB': expected one letter A-Z"),
    ({"choice": 1}, "expectations.choice: answer=1: expected one letter A-Z"),
    ({"choice": {"answer": "E", "options": "ABCD"}}, "expectations.choice: answer 'E' is not one of the options"),
    ({"length": {}}, "expectations.length: give min_length, max_length or both"),
    ({"length": {"min_length": 5, "max_length": 2}}, "expectations.length: min_length=5 is above max_length=2"),
    ({"length": {"max_length": -1}}, "expectations.length: max_length=-1: expected an integer >= 0"),
    ({"length": {"max_length": 3, "unit": "tokens"}}, "expectations.length: unit='tokens': allowed chars, words"),
])
def test_malformed_expectations_name_the_line(given, message):
    with pytest.raises(ConfigError) as caught:
        Expectations.parse(given, "f.jsonl:7")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_dataset_reader_keeps_expectations_and_fails_on_a_bad_one(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "prompt": "Capital of France?", "expectations": {"contains": "Paris"}}\n'
                    '{"id": "b", "messages": [{"role": "user", "content": "6x7?"}], "expectations": {"number": 42}}\n'
                    '{"id": "c", "prompt": "Say hi"}\n')
    items = load_prompts(str(good))
    assert items[0].expectations.contains == Contains(("Paris",))
    assert items[1].expectations.number == NumberCheck(42.0)
    assert items[2].expectations is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "x", "expectations": {"number": "many"}}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expectations.number: value='many': expected a finite"):
        load_prompts(str(bad))


def test_the_shipped_prompt_sets_parse():
    for name in ("prompts", "qa"):
        items = load_prompts(f"pkg://pikeclient/data/{name}.jsonl")
        assert sum(item.expectations is not None for item in items) >= 5
