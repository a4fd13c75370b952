"""Load strategies and limits: when the next request goes, and how many may be in flight.

Each strategy is one small class behind one interface, after GuideLLM's ``scheduler/strategies.py``:

- ``concurrency`` (closed loop): N workers, each sending its next prompt when the last one returned;
- ``synchronous``: the same with one worker;
- ``constant`` and ``poisson`` (open loop): requests are due at ``rate`` per second, evenly spaced or
  with exponential gaps, whether or not earlier ones returned; ``max_in_flight`` is a safety cap.

Limits (``max_requests``, ``max_duration``) are separate small objects that combine with any strategy.
The timing itself (sleeping until a request is due, recording how late it really went) lives in the
runner (``pikeclient.run.experiment``), not here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pikeclient.core.errors import ConfigError


@dataclass(frozen=True)
class Concurrency:
    """Closed loop: ``concurrency`` requests in flight, the next one sent when one returns."""

    concurrency: int = 8
    name = "concurrency"
    open_loop = False

    @property
    def max_in_flight(self) -> int:
        return self.concurrency

    def offsets(self) -> Iterator[float] | None:
        return None  # no schedule: a worker sends as soon as it is free

    def describe(self) -> str:
        return f"{self.name}({self.concurrency})"


@dataclass(frozen=True)
class Synchronous(Concurrency):
    """One request at a time."""

    concurrency: int = 1
    name = "synchronous"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Constant:
    """Open loop: a request every ``1 / rate`` seconds."""

    rate: float
    max_in_flight: int = 1024
    name = "constant"
    open_loop = True

    def offsets(self) -> Iterator[float]:
        """Seconds after the start at which each request is due."""
        index = 0
        while True:
            yield index / self.rate
            index += 1

    def describe(self) -> str:
        return f"{self.name}({self.rate:g}/s)"


@dataclass(frozen=True)
class Poisson:
    """Open loop: arrivals of a Poisson process at ``rate`` per second (exponential gaps), seeded."""

    rate: float
    max_in_flight: int = 1024
    seed: int = 0
    name = "poisson"
    open_loop = True

    def offsets(self) -> Iterator[float]:
        rng = random.Random(self.seed)
        due = 0.0
        while True:
            yield due
            due += rng.expovariate(self.rate)

    def describe(self) -> str:
        return f"{self.name}({self.rate:g}/s)"


Strategy = Concurrency | Synchronous | Constant | Poisson
STRATEGIES = {"concurrency": Concurrency, "synchronous": Synchronous, "constant": Constant, "poisson": Poisson}


# The settings each strategy reads; any other load.* setting given with it would be ignored.
USES = {"concurrency": ("concurrency",), "synchronous": (), "constant": ("rate", "max_in_flight"),
        "poisson": ("rate", "max_in_flight", "seed")}


def build_strategy(kind: str, *, concurrency: int | None = None, rate: float | None = None,
                   max_in_flight: int | None = None, seed: int | None = None) -> Strategy:
    """The strategy ``load.kind`` names, checked; a ConfigError names the key.

    A setting the strategy would ignore (``load.rate`` with ``load=concurrency``, ``load.concurrency``
    with ``load=synchronous``) is refused: the run would not be the one asked for."""
    if kind not in STRATEGIES:
        raise ConfigError(f"load.kind={kind!r}: allowed {', '.join(STRATEGIES)}")
    given = {"concurrency": concurrency, "rate": rate, "max_in_flight": max_in_flight, "seed": seed}
    for name, value in given.items():
        if value is not None and name not in USES[kind]:
            users = ", ".join(k for k, uses in USES.items() if name in uses)
            raise ConfigError(f"load.{name}={value} is not used by load={kind}; it applies to load={users}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigError(f"load.max_in_flight={max_in_flight} is out of range: allowed >= 1")
    if kind == "synchronous":
        return Synchronous()
    if kind == "concurrency":
        concurrency = 8 if concurrency is None else concurrency
        if concurrency < 1:
            raise ConfigError(f"load.concurrency={concurrency} is out of range: allowed >= 1")
        return Concurrency(concurrency)
    if rate is None or not 0 < rate < math.inf:
        raise ConfigError(f"load.rate={rate} is out of range: load={kind} needs a finite rate > 0 (requests per "
                          "second; for as fast as possible, use load=concurrency)")
    cap = 1024 if max_in_flight is None else max_in_flight
    return Constant(rate, cap) if kind == "constant" else Poisson(rate, cap, 0 if seed is None else seed)


@dataclass(frozen=True)
class MaxRequests:
    """Send at most ``count`` requests."""

    count: int

    def allows(self, sent: int, elapsed: float) -> bool:
        return sent < self.count

    def most(self, todo: int) -> int:
        """At most how many of ``todo`` requests this limit lets go."""
        return min(todo, self.count)


@dataclass(frozen=True)
class MaxDuration:
    """Send no request later than ``seconds`` after the start (requests in flight then still finish)."""

    seconds: float

    def allows(self, sent: int, elapsed: float) -> bool:
        return elapsed < self.seconds

    def most(self, todo: int) -> int:
        return todo  # unknown before the run: as many as fit in the time


Limit = MaxRequests | MaxDuration


def build_limits(max_requests: int | None, max_duration: float | None) -> list[Limit]:
    limits: list[Limit] = []
    if max_requests is not None:
        if max_requests < 1:
            raise ConfigError(f"experiment.max_requests={max_requests} is out of range: allowed >= 1")
        limits.append(MaxRequests(max_requests))
    if max_duration is not None:
        if not max_duration > 0:
            raise ConfigError(f"experiment.max_duration={max_duration} is out of range: allowed > 0 (seconds)")
        limits.append(MaxDuration(max_duration))
    return limits
