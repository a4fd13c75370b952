"""Is B really better than A? A paired comparison of two runs over the same prompts.

Calls are paired by prompt id and repeat, so each difference compares the same question answered by
both runs (far tighter than comparing two means). Per scorer: the mean of the paired differences
(B - A) with a paired bootstrap interval and, for pass/fail scores, McNemar's test on the discordant
pairs (exact binomial below 25 of them, else chi-square with continuity correction). Per timing
(``latency_s``, ``ttft_s``): the median of the paired differences with a bootstrap interval. A difference
whose interval covers zero (or, pass/fail, whose McNemar p-value is 0.05 or more) is reported as "no
detectable difference".

MLflow 3.17 has no paired comparison to reuse: ``mlflow.genai`` aggregates one run's scores (``<scorer>/mean``)
and its UI shows evaluation runs side by side, without intervals or tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.statistics import bootstrap_ci, percentile
from pikeclient.eval.score import numeric

TIMINGS = ("latency_s", "ttft_s")
NO_DIFFERENCE = "no detectable difference"
EXACT_BELOW = 25  # discordant pairs under which McNemar's test is the exact binomial one
ALPHA = 0.05  # McNemar's level, matching the 95% intervals


@dataclass(frozen=True)
class Difference:
    """B - A over the paired calls: ``estimate`` (mean, or median for timings) with its interval."""

    name: str
    pairs: int
    a: float  # A's mean (or median) over the pairs
    b: float
    estimate: float
    ci_low: float
    ci_high: float
    statistic: str = "mean"
    # pass/fail only: pairs only B passed, pairs only A passed, and McNemar's two-sided p-value
    b_only: int | None = None
    a_only: int | None = None
    p_value: float | None = None
    test: str | None = None

    @property
    def detectable(self) -> bool:
        """The interval leaves zero out and, for pass/fail scores, McNemar's test agrees (p < 0.05): on few
        discordant pairs a percentile bootstrap's interval is too narrow, and the exact test says so."""
        return not self.ci_low <= 0.0 <= self.ci_high and (self.p_value is None or self.p_value < ALPHA)

    @property
    def verdict(self) -> str:
        if not self.detectable:
            return NO_DIFFERENCE
        return "B higher" if self.estimate > 0 else "B lower"

    def describe(self) -> str:
        text = (f"{self.name}: A {self.a:.4g}, B {self.b:.4g}, B - A {self.estimate:+.4g} "
                f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}] over {self.pairs} pairs: {self.verdict}")
        if self.p_value is not None:
            text += f" (McNemar {self.test}: {self.b_only} vs {self.a_only} discordant, p={self.p_value:.3g})"
        return text


@dataclass(frozen=True)
class Comparison:
    """Every paired difference of two runs, and how many calls found no partner."""

    pairs: int
    only_a: int
    only_b: int
    differences: dict[str, Difference] = field(default_factory=dict)

    def metrics(self, prefix: str = "compare/") -> dict[str, float]:
        """Flat metrics to log on the later run (or a sweep's parent): ``compare/<name>/diff`` and friends."""
        out = {f"{prefix}pairs": float(self.pairs)}
        for name, d in self.differences.items():
            out.update({f"{prefix}{name}/diff": d.estimate, f"{prefix}{name}/ci_low": d.ci_low,
                        f"{prefix}{name}/ci_high": d.ci_high, f"{prefix}{name}/detectable": float(d.detectable)})
            if d.p_value is not None:
                out[f"{prefix}{name}/p_value"] = d.p_value
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per difference: a table for a report or ``mlflow.log_table``."""
        return [{"name": d.name, "pairs": d.pairs, "statistic": d.statistic, "A": d.a, "B": d.b, "B - A": d.estimate,
                 "ci_low": d.ci_low, "ci_high": d.ci_high, "p_value": d.p_value, "verdict": d.verdict}
                for d in self.differences.values()]


def compare(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *, resamples: int = 1000,
            seed: int = 0, level: float = 0.95) -> Comparison:
    """Compare run B with run A from their records (``id``, ``repeat``, ``scores``, ``latency_s``, ...)."""
    pairs, only_a, only_b = pair_records(a, b)
    differences: dict[str, Difference] = {}
    for name in _score_names(pairs):
        values = [(numeric(_score(ra, name)), numeric(_score(rb, name))) for ra, rb in pairs]
        paired = [(x, y) for x, y in values if x is not None and y is not None]
        if paired:
            differences[name] = _difference(name, paired, resamples, seed, level, _is_pass_fail(pairs, name))
    for timing in TIMINGS:
        paired = [(ra[timing], rb[timing]) for ra, rb in pairs if _measured(ra, timing) and _measured(rb, timing)]
        if paired:
            differences[timing] = _timing_difference(timing, paired, resamples, seed, level)
    return Comparison(len(pairs), only_a, only_b, differences)


def pair_records(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], int, int]:
    """Calls of both runs with the same (prompt id, repeat), in A's order; and the unpaired counts."""
    by_key = {}
    for record in b:
        key = _key(record)
        if key in by_key:
            raise ValueError(f"run B has two calls for prompt {key[0]!r} (repeat {key[1]})")
        by_key[key] = record
    pairs, seen = [], set()
    for record in a:
        key = _key(record)
        if key in seen:
            raise ValueError(f"run A has two calls for prompt {key[0]!r} (repeat {key[1]})")
        seen.add(key)
        if key in by_key:
            pairs.append((record, by_key[key]))
    return pairs, len(a) - len(pairs), len(b) - len(pairs)


def mcnemar(b_only: int, a_only: int) -> tuple[float, str]:
    """McNemar's two-sided p-value from the discordant pairs, and which test gave it."""
    n = b_only + a_only
    if n == 0:
        return 1.0, "exact"
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b_only, a_only) + 1)) / 2**n
        return min(1.0, 2 * tail), "exact"
    chi2 = (abs(b_only - a_only) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2)), "chi2"  # chi-square with one degree of freedom


def _difference(name: str, paired: list[tuple[float, float]], resamples: int, seed: int, level: float,
                pass_fail: bool) -> Difference:
    diffs = [y - x for x, y in paired]
    low, high = bootstrap_ci(diffs, _mean, resamples=resamples, seed=seed, level=level)
    extra: dict[str, Any] = {}
    if pass_fail:
        b_only = sum(1 for x, y in paired if y > x)
        a_only = sum(1 for x, y in paired if x > y)
        p_value, test = mcnemar(b_only, a_only)
        extra = {"b_only": b_only, "a_only": a_only, "p_value": p_value, "test": test}
    return Difference(name, len(paired), _mean([x for x, _ in paired]), _mean([y for _, y in paired]),
                      _mean(diffs), low, high, "mean", **extra)


def _timing_difference(name: str, paired: list[tuple[float, float]], resamples: int, seed: int,
                       level: float) -> Difference:
    diffs = [y - x for x, y in paired]
    low, high = bootstrap_ci(diffs, _median, resamples=resamples, seed=seed, level=level)
    return Difference(name, len(paired), _median([x for x, _ in paired]), _median([y for _, y in paired]),
                      _median(diffs), low, high, "median")


def _score_names(pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[str]:
    names: dict[str, None] = {}
    for ra, rb in pairs:
        for name in (ra.get("scores") or {}):
            if name in (rb.get("scores") or {}):
                names[name] = None
    return list(names)


def _is_pass_fail(pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]], name: str) -> bool:
    present = [v for pair in pairs for r in pair if (v := _score(r, name)) is not None]
    return bool(present) and all(isinstance(v, bool) for v in present)


def _score(record: Mapping[str, Any], name: str) -> Any:
    score = (record.get("scores") or {}).get(name)
    if score is None or _get(score, "error") is not None:
        return None
    return _get(score, "value")


def _get(score: Any, name: str) -> Any:
    return score.get(name) if isinstance(score, Mapping) else getattr(score, name, None)


def _measured(record: Mapping[str, Any], timing: str) -> bool:
    """A timing this run really measured: answered, not from the response cache."""
    return record.get("error") is None and not record.get("cached") and record.get(timing) is not None


def _key(record: Mapping[str, Any]) -> tuple[str, int]:
    return str(record["id"]), int(record.get("repeat") or 0)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _median(values: list[float]) -> float:
    return percentile(values, 50)
