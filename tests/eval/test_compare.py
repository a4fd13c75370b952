"""Paired comparison of two runs: the known difference is found, identical runs show none."""

import random

import pytest

from pikeclient.eval.compare import NO_DIFFERENCE, compare, mcnemar, pair_records
from pikeclient.eval.score import Score


def run(passes, latencies, *, numeric=None, repeat=0, error_at=()):
    records = []
    for n, (ok, latency) in enumerate(zip(passes, latencies)):
        record = {"id": f"p{n}", "repeat": repeat, "error": "HTTP 500" if n in error_at else None,
                  "latency_s": None if n in error_at else latency,
                  "scores": {} if n in error_at else {"exact_match": Score(ok).to_dict()}}
        if numeric is not None and n not in error_at:
            record["scores"]["f1"] = {"value": numeric[n], "error": None}
        records.append(record)
    return records


def test_a_known_difference_is_reported():
    rng = random.Random(1)
    a_latency = [1.0 + rng.random() for _ in range(100)]
    a = run([n < 50 for n in range(100)], a_latency, numeric=[0.5] * 100)
    b = run([n < 80 for n in range(100)], [x + 0.2 for x in a_latency], numeric=[0.6] * 100)
    result = compare(a, b, resamples=500)
    assert (result.pairs, result.only_a, result.only_b) == (100, 0, 0)
    em = result.differences["exact_match"]
    assert (em.a, em.b, em.estimate) == (0.5, 0.8, pytest.approx(0.3))
    assert 0.15 < em.ci_low < 0.3 < em.ci_high < 0.45 and em.verdict == "B higher"
    assert (em.b_only, em.a_only, em.test) == (30, 0, "chi2") and em.p_value < 1e-6
    f1 = result.differences["f1"]
    assert f1.estimate == pytest.approx(0.1) and f1.p_value is None and f1.detectable
    latency = result.differences["latency_s"]
    assert latency.statistic == "median" and latency.estimate == pytest.approx(0.2)
    assert latency.ci_low == pytest.approx(0.2) and latency.ci_high == pytest.approx(0.2)
    assert latency.verdict == "B higher"


def test_identical_runs_show_no_detectable_difference():
    rng = random.Random(2)
    records = run([rng.random() < 0.6 for _ in range(60)], [rng.random() for _ in range(60)])
    result = compare(records, [dict(r) for r in records])
    assert result.differences and all(d.verdict == NO_DIFFERENCE for d in result.differences.values())
    assert result.differences["exact_match"].p_value == 1.0
    assert result.differences["latency_s"].estimate == 0.0
    assert "no detectable difference" in result.differences["exact_match"].describe()


def test_a_small_difference_on_few_prompts_is_not_detectable():
    a = run([True, True, False, True, False, True, True, False], [1.0] * 8)
    b = run([True, True, True, True, False, True, False, True], [1.0] * 8)
    em = compare(a, b).differences["exact_match"]
    assert em.estimate == pytest.approx(0.125) and em.verdict == NO_DIFFERENCE
    assert (em.b_only, em.a_only, em.test) == (2, 1, "exact") and em.p_value == 1.0


def test_pairs_are_matched_by_prompt_and_repeat_and_failed_calls_left_out():
    a = run([True] * 4, [1.0] * 4) + run([True] * 4, [1.0] * 4, repeat=1)
    b = list(reversed(run([False] * 4, [2.0] * 4, error_at=(3,)))) + [{"id": "new", "error": None, "scores": {}}]
    pairs, only_a, only_b = pair_records(a, b)
    assert [(x["id"], x["repeat"], y["repeat"]) for x, y in pairs] == [(f"p{n}", 0, 0) for n in range(4)]
    assert (only_a, only_b) == (4, 1)
    result = compare(a, b)
    assert result.differences["exact_match"].pairs == 3  # the failed call has no score to pair
    assert result.differences["latency_s"].pairs == 3 and result.differences["latency_s"].estimate == 1.0


def test_cached_answers_have_no_timing_to_compare():
    a = run([True, True], [1.0, 1.0])
    b = run([True, True], [0.5, 0.5])
    b[0]["cached"] = True
    assert compare(a, b).differences["latency_s"].pairs == 1


def test_a_run_with_a_prompt_twice_cannot_be_paired():
    with pytest.raises(ValueError, match="run B has two calls for prompt 'p0'"):
        pair_records(run([True], [1.0]), run([True], [1.0]) * 2)


@pytest.mark.parametrize(("b_only", "a_only", "p", "test"), [
    (0, 0, 1.0, "exact"), (5, 0, 0.0625, "exact"), (3, 1, 0.625, "exact"), (2, 10, 2 * 79 / 4096, "exact"),
])
def test_mcnemar_exact(b_only, a_only, p, test):
    assert mcnemar(b_only, a_only) == (pytest.approx(p), test)


def test_mcnemar_chi_square_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    p, test = mcnemar(30, 10)
    assert test == "chi2" and p == pytest.approx(stats.chi2.sf((20 - 1) ** 2 / 40, 1))


def test_metrics_and_rows_to_log_the_comparison():
    a = run([n < 5 for n in range(20)], [1.0] * 20)
    b = run([n < 15 for n in range(20)], [1.0] * 20)
    result = compare(a, b, resamples=200)
    metrics = result.metrics()
    assert metrics["compare/pairs"] == 20 and metrics["compare/exact_match/diff"] == pytest.approx(0.5)
    assert metrics["compare/exact_match/detectable"] == 1.0 and metrics["compare/exact_match/p_value"] < 0.01
    assert metrics["compare/latency_s/detectable"] == 0.0
    rows = {row["name"]: row for row in result.rows()}
    assert rows["latency_s"]["verdict"] == NO_DIFFERENCE and rows["exact_match"]["verdict"] == "B higher"
