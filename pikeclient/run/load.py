"""Load strategies and limits: when the next request goes, and how many may be in flight.

Each strategy is one small class behind one interface, after GuideLLM's ``scheduler/strategies.py``:

- ``concurrency`` (closed loop): N workers, each sending its next prompt when the last one returned;
- ``synchronous``: the same with one worker;
- ``constant`` and ``poisson`` (open loop): requests are due at ``rate`` per second, evenly spaced or
  with gamma gaps (``burstiness``; 1: a Poisson process), whether or not earlier ones returned, after an
  optional ramp from a start rate (``ramp_up``); ``max_in_flight`` is a safety cap;
- ``replay`` (open loop, :mod:`pikeclient.run.shapes.replay`): a trace's requests at the trace's times;
- ``sessions`` (:mod:`pikeclient.run.shapes.sessions`): simulated users playing conversations turn by turn.

Limits (``max_requests``, ``max_duration``, and the over-saturation stop of :mod:`pikeclient.run.saturation`)
are separate small objects that combine with any strategy.
The timing itself (sleeping until a request is due, recording how late it really went) lives in the
runner (``pikeclient.run.experiment``), not here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem
from pikeclient.run.saturation import OverSaturation
from pikeclient.run.shapes.ramp import Ramp, time_at
from pikeclient.run.shapes.replay import Replay
from pikeclient.run.shapes.sessions import Sessions

T = TypeVar("T")


class _Scheduled:
    """An open loop whose requests are due at offsets that do not depend on which prompt goes."""

    def offsets(self) -> Iterator[float]:
        raise NotImplementedError

    def schedule(self, todo: Iterable[T]) -> Iterator[tuple[T, float]]:
        """Each request with the seconds after the start at which it is due."""
        return zip(todo, self.offsets())


@dataclass(frozen=True)
class Concurrency:
    """Closed loop: ``concurrency`` requests in flight, the next one sent when one returns."""

    concurrency: int = 8
    name = "concurrency"
    open_loop = False
    SETTINGS: ClassVar[tuple[str, ...]] = ("concurrency",)

    @property
    def max_in_flight(self) -> int:
        return self.concurrency

    def offsets(self) -> Iterator[float] | None:
        return None  # no schedule: a worker sends as soon as it is free

    def describe(self) -> str:
        return f"{self.name}({self.concurrency})"

    @classmethod
    def build(cls, concurrency: int | None = None, **_: Any) -> Concurrency:
        concurrency = 8 if concurrency is None else concurrency
        if concurrency < 1:
            raise ConfigError(f"load.concurrency={concurrency} is out of range: allowed >= 1")
        return cls(concurrency)


@dataclass(frozen=True)
class Synchronous(Concurrency):
    """One request at a time."""

    concurrency: int = 1
    name = "synchronous"
    SETTINGS: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> str:
        return self.name

    @classmethod
    def build(cls, **_: Any) -> Synchronous:
        return cls()


@dataclass(frozen=True)
class Constant(_Scheduled):
    """Open loop: a request every ``1 / rate`` seconds (after ``ramp``, if any, from its start rate)."""

    rate: float
    max_in_flight: int = 1024
    ramp: Ramp | None = None
    name = "constant"
    open_loop = True
    SETTINGS: ClassVar[tuple[str, ...]] = ("rate", "max_in_flight", "ramp_up", "ramp_start_rate", "ramp_shape")

    def offsets(self) -> Iterator[float]:
        """Seconds after the start at which each request is due."""
        index = 0
        while True:
            yield time_at(index, self.rate, self.ramp)
            index += 1

    def describe(self) -> str:
        ramp = f", {self.ramp.describe()}" if self.ramp else ""
        return f"{self.name}({self.rate:g}/s{ramp})"

    @classmethod
    def build(cls, rate: float | None = None, max_in_flight: int | None = None, ramp_up: float | None = None,
              ramp_start_rate: float | None = None, ramp_shape: str | None = None, **_: Any) -> Constant:
        return cls(_rate(rate, cls.name), 1024 if max_in_flight is None else max_in_flight,
                   Ramp.build(ramp_up, ramp_start_rate, ramp_shape))


@dataclass(frozen=True)
class Poisson(_Scheduled):
    """Open loop: arrivals at ``rate`` per second with gamma-distributed gaps, seeded. ``burstiness`` is the
    gamma's shape, as ``vllm bench serve`` defines it: 1 is a Poisson process (exponential gaps), below 1
    burstier, above 1 more even; the gaps' coefficient of variation is ``1 / sqrt(burstiness)``."""

    rate: float
    max_in_flight: int = 1024
    seed: int = 0
    burstiness: float = 1.0
    ramp: Ramp | None = None
    name = "poisson"
    open_loop = True
    SETTINGS: ClassVar[tuple[str, ...]] = ("rate", "max_in_flight", "seed", "burstiness", "ramp_up",
                                           "ramp_start_rate", "ramp_shape")

    def offsets(self) -> Iterator[float]:
        rng = random.Random(self.seed)
        shape = self.burstiness
        due = 0.0  # operational time: arrivals at one per unit on average
        while True:
            yield time_at(due, self.rate, self.ramp)
            due += rng.expovariate(1.0) if shape == 1 else rng.gammavariate(shape, 1 / shape)

    def describe(self) -> str:
        bursts = f", burstiness {self.burstiness:g}" if self.burstiness != 1 else ""
        ramp = f", {self.ramp.describe()}" if self.ramp else ""
        return f"{self.name}({self.rate:g}/s{bursts}{ramp})"

    @classmethod
    def build(cls, rate: float | None = None, max_in_flight: int | None = None, seed: int | None = None,
              burstiness: float | None = None, ramp_up: float | None = None, ramp_start_rate: float | None = None,
              ramp_shape: str | None = None, **_: Any) -> Poisson:
        burstiness = 1.0 if burstiness is None else burstiness
        if not 0 < burstiness < math.inf:
            raise ConfigError(f"load.burstiness={burstiness} is out of range: allowed a finite number > 0 (1: "
                              "Poisson, < 1: burstier)")
        return cls(_rate(rate, cls.name), 1024 if max_in_flight is None else max_in_flight,
                   0 if seed is None else seed, burstiness, Ramp.build(ramp_up, ramp_start_rate, ramp_shape))


def _rate(rate: float | None, kind: str) -> float:
    if rate is None or not 0 < rate < math.inf:
        raise ConfigError(f"load.rate={rate} is out of range: load={kind} needs a finite rate > 0 (requests per "
                          "second; for as fast as possible, use load=concurrency)")
    return rate


Strategy = Concurrency | Synchronous | Constant | Poisson | Replay | Sessions
STRATEGIES: dict[str, Any] = {cls.name: cls for cls in (Concurrency, Synchronous, Constant, Poisson, Replay, Sessions)}


def build_strategy(kind: str, **given: Any) -> Strategy:
    """The strategy ``load.kind`` names, built from the ``load.*`` settings it reads; a ConfigError names the key.

    A setting the strategy would ignore (``load.rate`` with ``load=concurrency``, ``load.concurrency``
    with ``load=synchronous``) is refused: the run would not be the one asked for."""
    if kind not in STRATEGIES:
        raise ConfigError(f"load.kind={kind!r}: allowed {', '.join(STRATEGIES)}")
    for name, value in given.items():
        if value is not None and name not in STRATEGIES[kind].SETTINGS:
            users = ", ".join(k for k, cls in STRATEGIES.items() if name in cls.SETTINGS)
            raise ConfigError(f"load.{name}={value} is not used by load={kind}; it applies to load={users}")
    max_in_flight = given.get("max_in_flight")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigError(f"load.max_in_flight={max_in_flight} is out of range: allowed >= 1")
    return STRATEGIES[kind].build(**{k: v for k, v in given.items() if v is not None})


def offered_rate(strategy: Strategy, items: Sequence[PromptItem]) -> float | None:
    """Requests per second an open loop asks for (a replayed trace: its mean rate); None for a closed loop."""
    if not strategy.open_loop:
        return None
    rate = getattr(strategy, "rate", None)
    return rate if rate is not None else strategy.rate_of(items)


@dataclass(frozen=True)
class MaxRequests:
    """Send at most ``count`` requests."""

    count: int

    def allows(self, sent: int, elapsed: float) -> bool:
        return sent < self.count

    def observe(self, record: dict[str, Any], elapsed: float, in_flight: int) -> None:
        """A call ended (the over-saturation stop watches these; this limit needs nothing from them)."""

    def most(self, todo: int) -> int:
        """At most how many of ``todo`` requests this limit lets go."""
        return min(todo, self.count)


@dataclass(frozen=True)
class MaxDuration:
    """Send no request later than ``seconds`` after the start (requests in flight then still finish)."""

    seconds: float

    def allows(self, sent: int, elapsed: float) -> bool:
        return elapsed < self.seconds

    def observe(self, record: dict[str, Any], elapsed: float, in_flight: int) -> None:
        """A call ended: nothing to learn from it."""

    def most(self, todo: int) -> int:
        return todo  # unknown before the run: as many as fit in the time


Limit = MaxRequests | MaxDuration | OverSaturation


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
