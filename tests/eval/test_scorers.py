"""Every deterministic scorer on a table of answers: Unicode, whitespace, numbers written as words,
choice letters in prose, JSON in code fences, and the lines a scorer has nothing to say about."""

import inspect

import pytest

from pikeclient.eval import scorers
from pikeclient.eval.expectations import Expectations
from pikeclient.eval.normalize import choice_letter, final_number, normalize_answer, numbers
from pikeclient.eval.score import CODE, Score

SCORERS = {"exact_match": scorers.exact_match, "contains": scorers.contains, "regex_match": scorers.regex_match,
           "is_json": scorers.is_json, "numeric_match": scorers.numeric_match, "choice_match": scorers.choice_match,
           "response_length": scorers.response_length}

CASES = [
    # exact_match: SQuAD normalization (NFKC, case, punctuation, articles, whitespace)
    ("exact_match", {"answers": "Paris"}, "Paris", True),
    ("exact_match", {"answers": "Paris"}, "  paris. ", True),
    ("exact_match", {"answers": "Paris"}, "ＰＡＲＩＳ", True),  # full-width letters
    ("exact_match", {"answers": "Paris"}, "Paris。", True),  # ideographic full stop
    ("exact_match", {"answers": "the Eiffel Tower"}, "Eiffel   tower!", True),
    ("exact_match", {"answers": "Eiffel Tower"}, "An eiffel\ttower", True),
    ("exact_match", {"answers": ["NYC", "New York City"]}, "New York City", True),
    ("exact_match", {"answers": "Paris"}, "The capital is Paris.", False),
    ("exact_match", {"answers": "Paris"}, "", False),
    ("exact_match", {"answers": "Zürich"}, "ZÜRICH", True),
    ("exact_match", {"answers": "Zürich"}, "Zurich", False),  # accents are not punctuation
    ("exact_match", {"answers": 42}, "42.", True),
    # contains: case-insensitive, NFKC, whitespace runs
    ("contains", {"contains": "Paris"}, "The capital of France is PARIS.", True),
    ("contains", {"contains": "Paris"}, "The capital of France is Lyon.", False),
    ("contains", {"contains": ["Paris", "France"]}, "paris, france", True),
    ("contains", {"contains": ["Paris", "France"]}, "paris", False),
    ("contains", {"contains": {"any": ["Thursday", "Thu"]}}, "It is on thu.", True),
    ("contains", {"contains": {"any": ["Thursday", "Thu"]}}, "It is on Monday.", False),
    ("contains", {"contains": "New York"}, "new\n  york", True),
    ("contains", {"contains": "ﬁle"}, "the FILE", True),  # the fi ligature folds to "fi"
    ("contains", {"contains": "Straße"}, "STRASSE", True),  # casefold: ß is ss
    # regex_match: search by default, fullmatch and case options
    ("regex_match", {"regex": r"\d{4}-\d{2}-\d{2}"}, "Use 2024-05-17 here", True),
    ("regex_match", {"regex": {"pattern": r"\d{4}-\d{2}-\d{2}", "match_type": "fullmatch"}}, "Use 2024-05-17", False),
    ("regex_match", {"regex": {"pattern": "^bonjour", "case_insensitive": True}}, "Bonjour !", True),
    ("regex_match", {"regex": "^bonjour"}, "Bonjour !", False),
    # is_json: the whole answer or one fenced block; required keys; schema
    ("is_json", {"json": True}, '{"name": "Maria", "age": 34}', True),
    ("is_json", {"json": True}, '```json\n{"name": "Maria"}\n```', True),
    ("is_json", {"json": True}, "  [1, 2, 3]\n", True),
    ("is_json", {"json": True}, 'Here it is: {"name": "Maria"}', False),
    ("is_json", {"json": True}, '{"name": "Maria",}', False),
    ("is_json", {"json": {"required": ["name", "age"]}}, '{"name": "Maria", "age": 34}', True),
    ("is_json", {"json": {"required": ["name", "age"]}}, '{"name": "Maria"}', False),
    ("is_json", {"json": {"required": ["name"]}}, '["name"]', False),
    ("is_json", {"json": {"schema": {"type": "object", "properties": {"age": {"type": "integer"}}}}},
     '{"age": 34}', True),
    ("is_json", {"json": {"schema": {"type": "object", "properties": {"age": {"type": "integer"}}}}},
     '{"age": "34"}', False),
    # numeric_match: digits, separators, words, tolerance, the marked or last number
    ("numeric_match", {"number": 42}, "42", True),
    ("numeric_match", {"number": 42}, "The answer is forty-two.", True),
    ("numeric_match", {"number": 42}, "Forty two", True),
    ("numeric_match", {"number": 105}, "one hundred and five", True),
    ("numeric_match", {"number": 1234.5}, "It costs $1,234.50 in total.", True),
    ("numeric_match", {"number": 1500000}, "About 1.5 million people.", True),
    ("numeric_match", {"number": -7}, "minus seven", True),
    ("numeric_match", {"number": -3}, "It is \u22123 \u00b0C", True),  # the Unicode minus sign
    ("numeric_match", {"number": 42}, "４２", True),  # full-width digits
    ("numeric_match", {"number": 200}, "In 2.5 hours at 80 km/h it travels 200 km.", True),
    ("numeric_match", {"number": 200}, "The answer is 200 km, reached after 2.5 hours.", True),
    ("numeric_match", {"number": {"value": 200, "tolerance": 1}}, "about 199.5", True),
    ("numeric_match", {"number": {"value": 200, "tolerance": 1}}, "about 202", False),
    ("numeric_match", {"number": {"value": 1000, "relative": 0.05}}, "1040", True),
    ("numeric_match", {"number": 0.3}, "0.30000000000000004", True),
    ("numeric_match", {"number": 42}, "I don't know.", False),
    ("numeric_match", {"number": 4}, "2 + 2 = 4", True),
    # choice_match: the letter in the forms models write it
    ("choice_match", {"choice": "B"}, "B", True),
    ("choice_match", {"choice": "B"}, "(b)", True),
    ("choice_match", {"choice": "B"}, "The answer is (B).", True),
    ("choice_match", {"choice": "B"}, "**B**", True),
    ("choice_match", {"choice": "B"}, "B) Paris", True),
    ("choice_match", {"choice": "B"}, "Answer: b", True),
    ("choice_match", {"choice": "B"}, "A good guess is B.", True),  # "A" the article is no option
    ("choice_match", {"choice": "B"}, "The answer is C.", False),
    ("choice_match", {"choice": "B"}, "I am not sure.", False),
    ("choice_match", {"choice": "B"}, "Ｂ", True),  # full-width letter
    # response_length: chars or words, inclusive bounds
    ("response_length", {"length": {"max_length": 5}}, "hello", True),
    ("response_length", {"length": {"max_length": 5}}, "hello!", False),
    ("response_length", {"length": {"min_length": 2, "max_length": 3, "unit": "words"}}, "  one   two ", True),
    ("response_length", {"length": {"min_length": 2, "unit": "words"}}, "one", False),
]


@pytest.mark.parametrize(("name", "expects", "answer", "value"), CASES,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(CASES)])
def test_scorer_table(name, expects, answer, value):
    parsed = Expectations.parse(expects, "t:1").mapping
    score = SCORERS[name](inputs={"messages": []}, outputs=answer, expectations=parsed)
    assert isinstance(score, Score) and score.value is value, score
    assert score.source == CODE and score.rationale and score.error is None
    # The raw dataset form (as mlflow.genai.evaluate would pass it) scores the same.
    assert SCORERS[name](outputs=answer, expectations=expects).value is value


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_scorer_says_nothing_when_the_line_expects_nothing_of_its_kind(name):
    assert SCORERS[name](inputs={}, outputs="anything", expectations={"expected_response": "x"}) is None
    assert SCORERS[name](inputs={}, outputs="anything", expectations={}) is None
    assert SCORERS[name](inputs={}, outputs="anything", expectations=None) is None


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorers_have_mlflows_keyword_only_signature(name):
    parameters = inspect.signature(SCORERS[name]).parameters
    assert list(parameters) == ["inputs", "outputs", "expectations", "trace"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_outputs_may_be_a_traces_output_dict():
    score = scorers.contains(outputs={"text": "Paris", "finish_reason": "stop"}, expectations={"contains": "paris"})
    assert score.value is True


@pytest.mark.parametrize(("text", "expected"), [
    ("forty-two", [42]), ("one hundred and five", [105]), ("three four", [3, 4]), ("two and three", [2, 3]),
    ("nineteen eighty-four", [19, 84]), ("one million two hundred thousand", [1_200_000]),
    ("twenty-one thousand", [21_000]), ("a million", [1_000_000]), ("zero", [0]),
    ("pages 3-5", [3, 5]), ("-3 and +4", [-3, 4]), ("1,234,567", [1_234_567]), ("1,23", [1, 23]),
    ("2e3", [2000]), (".5", [0.5]), ("٤٢", [42]), ("v1.2", []),
])
def test_numbers(text, expected):
    assert [value for _, value in numbers(text)] == expected


def test_final_number_prefers_the_marked_answer():
    assert final_number("The answer is 42. Check: 6 x 7 = 42, not 41.") == 42
    assert final_number("6 x 7 = 42") == 42
    assert final_number("no numbers") is None


@pytest.mark.parametrize(("text", "letter"), [
    ("C", "C"), ("c.", "C"), ("[D]", "D"), ("Option B", "B"), ("The correct choice is d", "D"),
    ("A and B are wrong; C is right? Not sure.", None), ("I", None), ("E", None),
])
def test_choice_letter(text, letter):
    assert choice_letter(text, "ABCD") == letter


def test_normalize_answer_is_squads():
    assert normalize_answer("  The  Cat's  hat! ") == "cats hat"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("«Guillemets»—dash") == "guillemetsdash"
