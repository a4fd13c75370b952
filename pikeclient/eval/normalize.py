"""Reading answers: SQuAD's answer normalization, numbers (digits and English number words), choice
letters and JSON in an answer. Pure functions of text, shared by the deterministic scorers."""

from __future__ import annotations

import json
import re
import string
import unicodedata
from typing import Any, ClassVar

_ASCII_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def fold(text: str) -> str:
    """Unicode NFKC (full-width and compatibility forms to plain ones), case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def normalize_answer(text: str) -> str:
    """SQuAD's normalization, Unicode-aware: NFKC, lower case (casefold), punctuation removed (ASCII
    punctuation as SQuAD, plus every Unicode punctuation character), articles a/an/the removed,
    whitespace collapsed. ``"  The Eiffel-Tower! "`` and ``"eiffeltower"`` normalize alike."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


# -- numbers ------------------------------------------------------------------------------------------

_UNITS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {word: 10 * n for n, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_NEGATIVE = ("minus", "negative")
# A sign only where it cannot be a dash between two things ("pages 3-5" is 3 and 5); thousands separated
# by commas ("1,234") or not; decimals; an exponent. \d matches every script's digits, as float() reads them.
_TOKEN = re.compile(
    r"(?P<num>(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\d)|(?<![\w.])[-+]?\.\d+)"
    r"|(?P<word>[^\W\d_]+)"
)
_ANSWER_MARK = re.compile(r"\b(?:answer|result|total)\b[^.\d\n]{0,20}$|=\s*$", re.IGNORECASE)


def numbers(text: str) -> list[tuple[int, float]]:
    """Every number in ``text`` with its position: digits (``-3``, ``1,234.5``, ``2e3``, ``４２``, ``٤٢``),
    and English cardinal words (``forty-two``, ``one hundred and five``, ``three million``, ``minus
    seven``; a number of digits followed by a scale word, ``1.5 million``). Not ordinals, fractions
    ("half") or "a dozen"."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")  # the minus sign
    text = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", text)  # forty-two
    found: list[tuple[int, float]] = []
    run: _WordNumber | None = None
    sign = 1.0
    for match in _TOKEN.finditer(text):
        word = (match.group("word") or "").lower()
        if run is not None and not (word == "and" and run.last in ("hundred", "scale")) and not run.takes(word):
            found.append(run.result())  # "three four" are two numbers; "two and three" too
            run = None
        if match.group("num") is not None:
            found.append((match.start(), sign * float(match.group("num").replace(",", ""))))
            sign = 1.0
        elif word in _SCALES and run is None and found and _adjacent(text, found[-1][0], match.start()):
            found[-1] = (found[-1][0], found[-1][1] * _SCALES[word])  # "1.5 million"
        elif _WordNumber.kind(word) is not None:
            run = run or _WordNumber(match.start(), sign)
            run.add(word)
            sign = 1.0
        elif word != "and" or run is None:
            sign = -1.0 if word in _NEGATIVE else 1.0
    if run is not None:
        found.append(run.result())
    return found


def _adjacent(text: str, start: int, end: int) -> bool:
    """Only spaces between the number starting at ``start`` and the word at ``end``."""
    return bool(re.fullmatch(r"\S+\s+", text[start:end]))


class _WordNumber:
    """A run of English number words, read left to right; ``takes`` says whether a word continues it."""

    # Which kind of word may follow which: "forty two", "one hundred and five", "two thousand three".
    FOLLOWS: ClassVar[dict[str, tuple[str, ...]]] = {
        "unit": ("start", "tens", "hundred", "scale"), "teen": ("start", "hundred", "scale"),
        "tens": ("start", "hundred", "scale"), "hundred": ("start", "unit", "teen"),
        "scale": ("start", "unit", "teen", "tens", "hundred")}

    def __init__(self, position: int, sign: float) -> None:
        self.position, self.sign = position, sign
        self.total, self.current, self.last = 0.0, 0.0, "start"

    @staticmethod
    def kind(word: str) -> str | None:
        if word in _UNITS:
            return "unit" if _UNITS[word] < 10 else "teen"
        if word in _TENS:
            return "tens"
        if word == "hundred":
            return "hundred"
        return "scale" if word in _SCALES else None

    def takes(self, word: str) -> bool:
        kind = self.kind(word)
        return kind is not None and self.last in self.FOLLOWS[kind]

    def add(self, word: str) -> None:
        kind = self.kind(word)
        if kind == "hundred":
            self.current = (self.current or 1) * 100
        elif kind == "scale":
            self.total += (self.current or 1) * _SCALES[word]
            self.current = 0
        else:
            self.current += _UNITS.get(word, _TENS.get(word, 0))
        self.last = kind or self.last

    def result(self) -> tuple[int, float]:
        return self.position, self.sign * (self.total + self.current)


def final_number(text: str) -> float | None:
    """The answer's number: the one after "answer is", "result:", "total of" or "=" where there is one,
    else the last number in the text (as GSM8K graders read a worked answer)."""
    found = numbers(text)
    if not found:
        return None
    marked = [value for position, value in found if _ANSWER_MARK.search(text[max(0, position - 30):position])]
    return marked[-1] if marked else found[-1][1]


# -- multiple choice ----------------------------------------------------------------------------------

def choice_letter(text: str, options: str) -> str | None:
    """The option letter an answer chose: ``B``, ``(b)``, ``B) Paris``, ``**C**``, ``The answer is (B).``,
    ``Answer: d``. A bare capital letter counts only when it is the only option letter standing alone
    (so "A" the article is not read as option A)."""
    letters = re.escape(options)
    text = unicodedata.normalize("NFKC", text).strip()
    patterns = (
        rf"^[\s*_(\[]*([{letters}{letters.lower()}])[\s*_)\].:]*$",  # the whole answer is the letter
        rf"(?i:\b(?:answer|option|choice)\b(?:\s+is)?)\s*[:\-]?\s*[*_(\[]*([{letters}{letters.lower()}])\b",
        rf"^[\s*_(\[]*([{letters}])[*_)\].:]",  # "B) Paris", "B. Paris"
        rf"\(([{letters}])\)",  # "(B)"
    )
    for pattern in patterns:
        match = re.search(pattern, text, re.MULTILINE) if pattern.startswith("^") else re.search(pattern, text)
        if match:
            return match.group(1).upper()
    alone = set(re.findall(rf"(?<![\w'])([{letters}])(?![\w'])(?!\s+[a-z])", text))
    return alone.pop() if len(alone) == 1 else None


# -- JSON ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```$", re.DOTALL)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when the answer is JSON: the whole answer, or one fenced code block (```json
    ... ```) that is the whole answer; ``(False, error message)`` otherwise."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return True, json.loads(body)
    except json.JSONDecodeError as error:
        return False, f"not JSON: {error.msg} at line {error.lineno} column {error.colno}"
