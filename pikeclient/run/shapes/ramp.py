"""Rate curves: when the k-th request of an open loop is due, for a steady rate or one that ramps up.

Arrivals are drawn in *operational time* ``u``, where requests come at one per unit on average (evenly:
``u = k``; Poisson or gamma gaps of mean 1); the curve maps ``u`` to seconds through the inverse of the
cumulative rate ``Λ(t) = ∫ rate(s) ds`` (the time-rescaling theorem), so a ramp changes the rate without
changing the shape of the gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pikeclient.core.errors import ConfigError

SHAPES = ("linear", "exponential")


@dataclass(frozen=True)
class Ramp:
    """From ``start_rate`` to the target rate over ``seconds``, ``linear`` or ``exponential`` (the rate
    multiplied by the same factor every second); the target rate afterwards."""

    seconds: float
    start_rate: float = 0.0
    shape: str = "linear"

    @classmethod
    def build(cls, seconds: float | None, start_rate: float | None, shape: str | None) -> Ramp | None:
        """The ramp ``load.ramp_up`` and its options describe, checked; None without one."""
        if seconds is None:
            if start_rate is not None or shape is not None:
                raise ConfigError("load.ramp_start_rate and load.ramp_shape need load.ramp_up (the ramp's seconds)")
            return None
        if not 0 < seconds < math.inf:
            raise ConfigError(f"load.ramp_up={seconds} is out of range: allowed a finite number of seconds > 0")
        shape = shape or "linear"
        if shape not in SHAPES:
            raise ConfigError(f"load.ramp_shape={shape!r}: allowed {', '.join(SHAPES)}")
        start = 0.0 if start_rate is None else start_rate
        if shape == "exponential" and not start > 0:
            raise ConfigError("load.ramp_shape=exponential needs load.ramp_start_rate > 0 (an exponential never "
                              "leaves 0)")
        if not 0 <= start < math.inf:
            raise ConfigError(f"load.ramp_start_rate={start_rate} is out of range: allowed a finite rate >= 0")
        return cls(seconds, start, shape)

    def describe(self) -> str:
        return f"{self.shape} ramp from {self.start_rate:g}/s over {self.seconds:g} s"


def time_at(u: float, rate: float, ramp: Ramp | None = None) -> float:
    """Seconds at which operational time ``u`` is reached: ``u / rate`` at a steady ``rate``."""
    if ramp is None or u <= 0:
        return max(0.0, u) / rate
    seconds, start = ramp.seconds, ramp.start_rate
    if ramp.shape == "exponential" and not math.isclose(start, rate):
        growth = math.log(rate / start)
        reached = start * seconds * (rate / start - 1) / growth  # arrivals during the ramp
        if u <= reached:
            return seconds * math.log1p(u * growth / (start * seconds)) / growth
    else:
        reached = (start + rate) * seconds / 2
        if u <= reached:
            a, b = (rate - start) / (2 * seconds), start  # Λ(t) = a t² + b t; the root in a stable form
            return 2 * u / (b + math.sqrt(b * b + 4 * a * u))
    return seconds + (u - reached) / rate
