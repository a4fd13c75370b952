"""The capacity search: which request rate a deployment sustains, found by probing it.

The search itself only decides: which probe comes next, whether a finished probe kept up, and what the
answer is. Launching the probes (each one an ordinary run of ``run.py``, a child run in MLflow) is the
Hydra sweeper's job (``hydra_plugins.pikeclient_capacity``), and logging the answer the tracking's
(:mod:`pikeclient.tracking.capacity`).

The probes, in order:

1. **synchronous**: one request at a time, for the unloaded latency;
2. **throughput**: a closed loop of ``concurrency`` requests, for the most requests per second the
   server answers (the search's first guess at the capacity);
3. **rates**: open-loop probes at chosen rates, each stopped early by the over-saturation stop once a
   queue builds. The first goes at the closed loop's throughput; while no rate has kept up, each next
   one goes lower by a growing step (10%, 20%, 40% below the lowest failed rate); once one rate kept up
   and a higher one did not, the bracket is halved (geometric mean) until its ends are within
   ``tolerance`` of each other, or the budget (``max_probes``, ``max_time``) is spent.

A rate **keeps up** when its probe was not stopped as saturated, at most 5% of its calls failed, the
answers came back at 90% of the rate asked for or more, and then: with SLOs, when at least
``attainment`` of the calls met them (the goodput is the rate's); without, below the knee: the latency
p90 (from the scheduled time) at most ``knee_factor`` times the unloaded median.

The answer is the highest rate that kept up; its interval is the bracket the search ended with (the
highest rate that kept up, the lowest that did not): the capacity lies between two rates that were
measured on either side of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.errors import ConfigError

MAX_ERROR_RATE = 0.05  # a probe with more failed calls did not keep up
SHORTFALL = 0.1  # ... nor one whose answers came back below 90% of the rate asked for
ARRIVALS = ("constant", "poisson")


@dataclass(frozen=True)
class CapacitySettings:
    """``hydra.sweeper.*`` of ``hydra/sweeper=capacity``; :meth:`check` names a bad key in one line."""

    max_probes: int = 8
    max_time: float | None = None  # seconds for the whole search
    probe_s: float = 10.0  # seconds each probe sends for
    concurrency: int = 64  # the closed-loop probe's requests in flight
    arrivals: str = "constant"  # the rate probes' open loop: constant (evenly spaced) or poisson
    attainment: float = 0.95  # with SLOs: the share of calls that must meet them
    knee_factor: float = 2.0  # without: the latency p90 a rate may reach, in unloaded medians
    tolerance: float = 0.05  # stop when the bracket's ends are this close (relative)
    warmup: int = 4  # calls each probe makes and discards first (a new client: its connections)

    def check(self) -> CapacitySettings:
        def bad(key: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"hydra.sweeper.{key}={value} is out of range: allowed {allowed}")

        if self.max_probes < 3:
            raise bad("max_probes", self.max_probes, ">= 3 (a synchronous, a closed-loop and a rate probe)")
        if self.max_time is not None and not self.max_time > 0:
            raise bad("max_time", self.max_time, "> 0 (seconds) or null")
        if not 0 < self.probe_s < math.inf:
            raise bad("probe_s", self.probe_s, "> 0 (seconds)")
        if self.concurrency < 1:
            raise bad("concurrency", self.concurrency, ">= 1")
        if self.arrivals not in ARRIVALS:
            raise ConfigError(f"hydra.sweeper.arrivals={self.arrivals!r}: allowed {', '.join(ARRIVALS)}")
        if not 0 < self.attainment <= 1:
            raise bad("attainment", self.attainment, "(0, 1]")
        if not self.knee_factor > 1:
            raise bad("knee_factor", self.knee_factor, "> 1")
        if not 0 < self.tolerance < 1:
            raise bad("tolerance", self.tolerance, "(0, 1)")
        if self.warmup < 0:
            raise bad("warmup", self.warmup, ">= 0")
        return self


@dataclass
class Probe:
    """One finished probe: its kind (synchronous, throughput, rate), the rate asked for, its run's
    headline metrics (``RunStats.metrics``), why it was stopped as saturated, and the search's verdict."""

    kind: str
    rate: float | None
    metrics: dict[str, float]
    saturated: str | None = None
    seconds: float = 0.0
    label: str = ""
    job: int | None = None
    kept_up: bool | None = None
    why: str = ""

    @property
    def throughput(self) -> float:
        return self.metrics.get("Throughput/requests_per_s", 0.0)

    def row(self) -> dict[str, Any]:
        """The probe as a row of the probes table (``capacity_probes.json``)."""
        m = self.metrics
        return {"label": self.label, "job": self.job, "kind": self.kind, "rate": self.rate,
                "requests_per_s": self.throughput, "latency_p50": m.get("Latency/p50"),
                "latency_p90": m.get("Latency/from_schedule_p90", m.get("Latency/p90")),
                "ttft_p50": m.get("TTFT/p50"), "slo_attainment": m.get("SLO/attainment"),
                "goodput": m.get("SLO/goodput"), "errors": m.get("Errors/rate"), "saturated": bool(self.saturated),
                "kept_up": self.kept_up, "why": self.why, "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class Capacity:
    """The search's answer: the highest rate that kept up (None: none did, not even one request at a
    time), the bracket around it, the goodput measured at it."""

    rate: float | None
    ci_low: float | None
    ci_high: float | None
    goodput: float | None
    unloaded_latency: float | None
    max_throughput: float | None
    probes: int
    seconds: float
    criterion: str

    def metrics(self, prefix: str = "capacity/") -> dict[str, float]:
        values = {"rate": self.rate, "rate_ci_low": self.ci_low, "rate_ci_high": self.ci_high,
                  "goodput": self.goodput, "unloaded_latency": self.unloaded_latency,
                  "max_throughput": self.max_throughput, "probes": self.probes, "seconds": self.seconds}
        return {prefix + k: float(v) for k, v in values.items() if v is not None}

    def describe(self) -> str:
        if self.rate is None:
            return f"no rate keeps up ({self.criterion}), not even one request at a time"
        high = f"{self.ci_high:.2f}" if self.ci_high is not None else "not found"
        good = f", goodput {self.goodput:.2f}/s" if self.goodput is not None else ""
        return (f"{self.rate:.2f} requests/s [{self.ci_low:.2f}, {high}]{good} ({self.criterion}; {self.probes} "
                f"probes, {self.seconds:.0f} s)")


@dataclass
class CapacitySearch:
    """Decides the probes of one search (one backend) and judges them; ``slo_active``: the run has SLOs."""

    settings: CapacitySettings
    slo_active: bool
    probes: list[Probe] = field(default_factory=list)

    @property
    def criterion(self) -> str:
        if self.slo_active:
            return f"SLOs met by {self.settings.attainment:.0%} of calls"
        return f"latency p90 under {self.settings.knee_factor:g}x the unloaded median"

    def next_probe(self, elapsed: float = 0.0) -> tuple[str, float | None] | None:
        """(kind, rate) of the next probe, or None when the search is over."""
        s = self.settings
        if len(self.probes) >= s.max_probes:
            return None
        if s.max_time is not None and self.probes and elapsed + self._mean_seconds() > s.max_time:
            return None  # the next probe would not end in time
        if not self.probes:
            return "synchronous", None
        if len(self.probes) == 1:
            return ("throughput", None) if self.probes[0].kept_up else None  # too slow even one at a time
        low, high = self._bracket()
        if high is None:  # nothing failed yet: the closed loop's throughput first, then higher
            rates = [p.rate for p in self._rated()]
            return "rate", (max(rates) * 1.5 if rates else max(self.probes[1].throughput, low or 0.0))
        if low is None:  # nothing kept up below the lowest failed rate: step down, further each time
            fails = sum(1 for p in self._rated() if not p.kept_up)
            return "rate", max(high * (1 - min(0.8, 0.1 * 2 ** (fails - 1))), self.probes[0].throughput)
        if high / low - 1 <= s.tolerance:
            return None
        return "rate", math.sqrt(low * high)

    def add(self, probe: Probe) -> Probe:
        """Judge a finished probe and keep it."""
        probe.kept_up, probe.why = self.judge(probe)
        self.probes.append(probe)
        return probe

    def judge(self, probe: Probe) -> tuple[bool, str]:
        """Whether the probe kept up, and why not."""
        m = probe.metrics
        if probe.kind == "throughput":
            return True, "the most the server answers"
        if probe.saturated:
            return False, "stopped as over-saturated"
        if m.get("Errors/rate", 0.0) > MAX_ERROR_RATE:
            return False, f"{m['Errors/rate']:.0%} of calls failed"
        if probe.rate is not None and probe.throughput < (1 - SHORTFALL) * probe.rate:
            return False, f"answers at {probe.throughput:.2f}/s for {probe.rate:.2f}/s asked"
        if self.slo_active:
            attained = m.get("SLO/attainment", 0.0)
            if attained < self.settings.attainment:
                return False, f"SLOs met by {attained:.0%} of calls"
            return True, f"SLOs met by {attained:.0%} of calls"
        if probe.kind == "synchronous":
            return True, "unloaded"
        limit = self.settings.knee_factor * self.unloaded_latency()
        p90 = m.get("Latency/from_schedule_p90", m.get("Latency/p90", math.inf))
        if p90 > limit:
            return False, f"latency p90 {p90:.3f} s > {limit:.3f} s"
        return True, f"latency p90 {p90:.3f} s <= {limit:.3f} s"

    def unloaded_latency(self) -> float:
        return self.probes[0].metrics.get("Latency/p50", math.inf) if self.probes else math.inf

    def result(self, seconds: float) -> Capacity:
        low, high = self._bracket()
        best = next((p for p in self._rated() if p.kept_up and p.rate == low), None)
        if best is None and self.probes and self.probes[0].kept_up:
            best = self.probes[0]  # only one request at a time kept up
        rate = None if best is None else (best.rate if best.rate is not None else best.throughput)
        goodput = None if best is None else best.metrics.get("SLO/goodput", best.throughput)
        sync = self.probes[0] if self.probes else None
        return Capacity(rate, rate, high, goodput, None if sync is None else sync.metrics.get("Latency/p50"),
                        self.probes[1].throughput if len(self.probes) > 1 else None, len(self.probes), seconds,
                        self.criterion)

    def _rated(self) -> list[Probe]:
        return [p for p in self.probes if p.kind == "rate"]

    def _bracket(self) -> tuple[float | None, float | None]:
        """The highest rate that kept up (below the lowest that did not), and the lowest that did not."""
        failed = [p.rate for p in self._rated() if not p.kept_up]
        high = min(failed) if failed else None
        kept = [p.rate for p in self._rated() if p.kept_up and (high is None or p.rate < high)]
        return (max(kept) if kept else None), high

    def _mean_seconds(self) -> float:
        return sum(p.seconds for p in self.probes) / len(self.probes)
