"""``load=sessions``: simulated users, each playing a conversation turn by turn (the loop that plays them:
:mod:`pikeclient.run.sessions`).

Turn k goes with the real answers to turns 1..k-1 in its history, after the user's think time. Users come
as a fixed number playing one conversation after another (``users``: a closed loop over sessions), or as
new sessions arriving at ``rate`` per second (a Poisson process; ``max_in_flight`` sessions at most at once).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pikeclient.core.errors import ConfigError

# Think time distributions, each with the mean ``think_time_s``.
THINK_TIMES = {
    "fixed": lambda rng, mean: mean,
    "exponential": lambda rng, mean: rng.expovariate(1 / mean),
    "uniform": lambda rng, mean: rng.uniform(0, 2 * mean),
}


@dataclass(frozen=True)
class Sessions:
    users: int | None = 8
    rate: float | None = None  # new sessions per second, instead of a fixed number of users
    think_time_s: float = 0.0
    think_time_dist: str = "fixed"
    seed: int = 0
    max_in_flight: int = 8  # users, or (with rate) sessions at once at most
    name = "sessions"
    open_loop = False
    sessions = True  # the runner plays conversations, not single prompts
    SETTINGS: ClassVar[tuple[str, ...]] = ("users", "rate", "think_time_s", "think_time_dist", "seed",
                                           "max_in_flight")

    def think_times(self, session: str) -> Iterator[float]:
        """Seconds the user of ``session`` waits after each answer before the next turn (seeded by the session,
        so a session's pauses do not depend on what the other users did)."""
        rng, draw = random.Random(f"{self.seed}:{session}"), THINK_TIMES[self.think_time_dist]
        while True:
            yield draw(rng, self.think_time_s) if self.think_time_s > 0 else 0.0

    def arrivals(self) -> Iterator[float]:
        """Seconds after the start at which each session begins (with ``rate``), seeded."""
        assert self.rate is not None
        rng, due = random.Random(f"{self.seed}:arrivals"), 0.0
        while True:
            yield due
            due += rng.expovariate(self.rate)

    def describe(self) -> str:
        who = f"{self.users} users" if self.rate is None else f"{self.rate:g} sessions/s"
        think = f", think {self.think_time_s:g} s ({self.think_time_dist})" if self.think_time_s else ""
        return f"{self.name}({who}{think})"

    @classmethod
    def build(cls, users: int | None = None, rate: float | None = None, think_time_s: float | None = None,
              think_time_dist: str | None = None, seed: int | None = None, max_in_flight: int | None = None,
              **_: Any) -> Sessions:
        if users is not None and rate is not None:
            raise ConfigError(f"load.users={users} and load.rate={rate}: give one (users play sessions back to back; "
                              "a rate starts new sessions)")
        if users is not None and users < 1:
            raise ConfigError(f"load.users={users} is out of range: allowed >= 1")
        if rate is not None and not 0 < rate < math.inf:
            raise ConfigError(f"load.rate={rate} is out of range: load=sessions takes a finite rate > 0 (sessions per "
                              "second)")
        if max_in_flight is not None and rate is None:
            raise ConfigError(f"load.max_in_flight={max_in_flight} is not used with load.users; it caps the sessions "
                              "a load.rate starts")
        think = 0.0 if think_time_s is None else think_time_s
        if not 0 <= think < math.inf:
            raise ConfigError(f"load.think_time_s={think_time_s} is out of range: allowed a finite number >= 0")
        dist = think_time_dist or "fixed"
        if dist not in THINK_TIMES:
            raise ConfigError(f"load.think_time_dist={dist!r}: allowed {', '.join(THINK_TIMES)}")
        if rate is not None:
            return cls(None, rate, think, dist, seed or 0, 1024 if max_in_flight is None else max_in_flight)
        users = 8 if users is None else users
        return cls(users, None, think, dist, seed or 0, users)
