"""The over-saturation stop: a limit that ends an open loop once a queue is building up at the server.

After GuideLLM's ``over_saturation`` constraint (``scheduler/constraints/saturation.py``): a slope test
over a sliding window. GuideLLM stops when the number of requests in flight and the TTFT both have a
positive slope whose margin of error is under a fixed threshold (2.0, in the metric's own units, so the
same threshold means different things for seconds and for request counts), after 30 s by default.
Here three things must hold at once, each measured over the last ``window_s`` seconds:

- **latency grows**: the least-squares slope of the calls' latency (TTFT when streamed, and the
  latency from the scheduled time in an open loop, which also counts waiting for a free slot) against
  the time they ended is positive at 95% confidence (its t-interval leaves out zero), and large: at
  that slope the latency grows by at least ``growth`` (0.5: half) of its window median per window;
- **the queue grows**: requests in flight have a significantly positive slope too;
- **answers fall behind**: calls completed per second in the window are below ``1 - shortfall`` of the
  requested rate (with no requested rate, a replayed trace, this test is left out).

The relative size test is what GuideLLM lacks: a slope can be "significant" yet tiny (a latency drifting
by a millisecond a minute), and a run that only warms up or drifts is left alone. Calls in flight when
the stop comes still finish; the run is marked saturated (tag ``pikeclient.saturated``, a summary row).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.errors import ConfigError

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (beyond 30: 2.0, near enough).
_T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
         2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 2.0


def slope_interval(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The least-squares slope of ``points`` (x, y) and its 95% half-width; None for fewer than 3 points or
    no spread in x."""
    n = len(points)
    if n < 3:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
    error = math.sqrt(residual / (n - 2) / sxx)
    return slope, t975(n - 2) * error


def grows(points: list[tuple[float, float]]) -> bool:
    """A positive slope whose 95% interval leaves out zero."""
    fit = slope_interval(points)
    return fit is not None and fit[0] - fit[1] > 0


@dataclass
class OverSaturation:
    """The limit (``allows``/``most``/``observe``, like :class:`pikeclient.run.load.MaxDuration`): sending
    stops once the queue is judged to be building up. ``requested_rate`` is the open loop's rate."""

    requested_rate: float | None
    min_seconds: float = 5.0
    window_s: float = 5.0
    min_calls: int = 10
    growth: float = 0.5
    shortfall: float = 0.1
    reason: str | None = None
    _ended: deque = field(default_factory=deque)  # (elapsed at the end, latency)
    _queue: deque = field(default_factory=deque)  # (elapsed, requests in flight)

    @property
    def saturated(self) -> bool:
        return self.reason is not None

    def allows(self, sent: int, elapsed: float) -> bool:
        return not self.saturated

    def most(self, todo: int) -> int:
        return todo

    def observe(self, record: dict[str, Any], elapsed: float, in_flight: int) -> None:
        """One call ended ``elapsed`` seconds after the start, ``in_flight`` calls still out."""
        self._queue.append((elapsed, float(in_flight)))
        latency = _latency(record)
        if latency is not None:
            self._ended.append((elapsed, latency))
        for points in (self._ended, self._queue):
            while points and points[0][0] < elapsed - self.window_s:
                points.popleft()
        if not self.saturated and elapsed >= self.min_seconds:
            self.reason = self._verdict(elapsed)

    def _verdict(self, elapsed: float) -> str | None:
        ended = list(self._ended)
        if len(ended) < self.min_calls or not grows(list(self._queue)):
            return None
        fit = slope_interval(ended)
        if fit is None or fit[0] - fit[1] <= 0:
            return None
        span = min(self.window_s, elapsed)
        median = sorted(y for _, y in ended)[len(ended) // 2]
        if fit[0] * span < self.growth * median:
            return None
        completed = len(ended) / span
        if self.requested_rate is not None and completed >= (1 - self.shortfall) * self.requested_rate:
            return None
        behind = f", {completed:.1f} answers/s for {self.requested_rate:g} asked" if self.requested_rate else ""
        return (f"over-saturated after {elapsed:.1f} s: latency growing {fit[0]:.3f} s per s (median "
                f"{median:.3f} s) and requests in flight growing{behind}")


def _latency(record: dict[str, Any]) -> float | None:
    """What a queue lengthens: the wait for the first token if streamed, else the latency; from the scheduled
    time in an open loop (so a wait for a free ``max_in_flight`` slot counts too)."""
    if record.get("error") is not None or record.get("cached"):
        return None
    ttft, latency = record.get("ttft_s"), record.get("latency_s")
    queued = (record.get("latency_from_schedule_s") or 0.0) - (latency or 0.0)
    value = ttft if ttft is not None else latency
    return None if value is None else value + max(0.0, queued)


def build_over_saturation(enabled: bool, requested_rate: float | None, min_seconds: float, window_s: float,
                          min_calls: int) -> OverSaturation | None:
    """The limit ``experiment.stop_when_saturated`` asks for (None when off); a ConfigError names a bad key."""
    if not enabled:
        return None
    for key, value, low in (("saturation_min_s", min_seconds, 0.0), ("saturation_window_s", window_s, 0.0)):
        if not value > low or not math.isfinite(value):
            raise ConfigError(f"experiment.{key}={value} is out of range: allowed > 0 (seconds)")
    if min_calls < 3:
        raise ConfigError(f"experiment.saturation_min_calls={min_calls} is out of range: allowed >= 3")
    return OverSaturation(requested_rate, min_seconds, window_s, min_calls)
