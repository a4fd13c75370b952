"""Pure statistics shared by run statistics, quality scores and run comparisons (no third-party imports)."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); ``values`` must be non-empty."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def quantile_ci(values: list[float], q: float, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the ``q``-th percentile: the order statistics ``x(l)``
    and ``x(u)`` between which the true percentile lies with probability >= ``level`` (the number of
    values below it is binomial(n, q/100)). No resampling: one sort, however many values (a bootstrap of
    10,000 latencies took seconds of CPU, re-sorting resamples in Python)."""
    ordered = sorted(values)
    n, p = len(ordered), q / 100
    tail = (1 - level) / 2
    if n > 1000:  # the binomial is normal enough; its quantiles by the normal approximation
        z = _normal_quantile(1 - tail)
        spread = z * math.sqrt(n * p * (1 - p))
        low, high = math.floor(n * p - spread), math.ceil(n * p + spread)
    else:
        cdf, low, high, k = 0.0, 0, n, 0
        while k <= n:
            cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                            + (k * math.log(p) if k else 0.0) + ((n - k) * math.log(1 - p) if n - k else 0.0))
            if cdf <= tail:
                low = k + 1  # P(B <= k) <= tail: the interval starts above x(k+1) (1-based)
            if cdf >= 1 - tail:
                high = k + 1
                break
            k += 1
    return ordered[max(0, min(n - 1, low - 1))], ordered[max(0, min(n - 1, high - 1))]


def _normal_quantile(probability: float) -> float:
    """The standard normal's quantile (Acklam's rational approximation is more than enough here)."""
    return statistics.NormalDist().inv_cdf(probability)


def bootstrap_ci(values: list[float], statistic: Any, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic(values)`` (seeded: reproducible)."""
    rng = random.Random(seed)
    n = len(values)
    estimates = sorted(statistic([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - level) / 2 * 100
    return percentile(estimates, tail), percentile(estimates, 100 - tail)
