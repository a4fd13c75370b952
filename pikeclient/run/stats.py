"""Run statistics from per-call records: latency percentiles, streaming timings, tokens, errors.

What counts as a measurement: a call answered in this run, or in the earlier part of a resumed run
(``resumed``: it keeps the timings it really had). Answers read from the response cache (``cached``)
are counted apart and never enter latency, TTFT, ITL, TPOT, tokens, throughput, retries, backoff or
cost. Failed calls count in errors, retries and backoff (those attempts happened).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.statistics import bootstrap_ci, percentile  # noqa: F401 - also imported from here
from pikeclient.run.cost import Price, cost_metrics

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
BEHIND_SCHEDULE_S = 0.005  # an open loop whose p99 dispatch delay exceeds this fell behind its schedule
LOOP_LAG_S = 0.005  # event-loop lag (p99) above which the client's own timing is in doubt
STREAM_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Service-level objectives (seconds; None: none). A call meets them when it answered within all."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.latency_s))

    def met(self, record: dict[str, Any]) -> bool:
        if record["error"] is not None or record.get("cached"):
            return False
        for limit, value in ((self.ttft_s, record.get("ttft_s")), (self.tpot_s, record.get("tpot_s")),
                             (self.latency_s, record.get("latency_s"))):
            if limit is not None and (value is None or value > limit):
                return False  # a timing the SLO needs but the call lacks (TTFT without streaming) is not met
        return True


@dataclass
class RunStats:
    """Accumulates call outcomes as they arrive; only the numbers the summary needs are kept."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)
    call_rates: list[float] = field(default_factory=list)  # output tokens/s of each call
    errors: Counter = field(default_factory=Counter)
    token_sources: Counter = field(default_factory=Counter)
    calls: int = 0
    retries: int = 0
    backoff_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    uncounted: int = 0
    empty_answers: int = 0
    cache_hits: int = 0
    resumed: int = 0
    warmup_calls: int = 0
    dispatch_delays: list[float] = field(default_factory=list)  # open loop: how late each request went
    send_times: list[float] = field(default_factory=list)  # epoch seconds each measured call started
    send_delays: list[float] = field(default_factory=list)  # client time before each request went out
    loop_lags: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) epoch seconds, measured calls
    slo: Slo | None = None
    slo_met: int = 0
    requested_rate: float | None = None
    wall_s: float = 0.0
    start_time: float = 0.0  # epoch seconds: the measured span (after loading and warm-up)
    end_time: float = 0.0
    price: Price | None = None

    def slo_verdict(self, record: dict[str, Any]) -> None:
        """Mark whether a call met the SLOs (records carry ``slo_met`` when SLOs are set)."""
        if self.slo is not None and self.slo.active:
            record["slo_met"] = self.slo.met(record)

    def add(self, record: dict[str, Any]) -> None:
        self.calls += 1
        if record.get("cached"):  # read back from the response cache: not a measurement of this run
            self.cache_hits += 1
            return
        if record.get("dispatch_delay_s") is not None:
            self.dispatch_delays.append(record["dispatch_delay_s"])
        self.slo_met += bool(record.get("slo_met"))
        self.retries += max(0, record["attempts"] - 1)
        self.backoff_s += record.get("backoff_s") or 0.0
        if record["error"] is not None:
            self.errors[record["error_kind"]] += 1
            return
        self.resumed += bool(record.get("resumed"))
        self.empty_answers += record["response"] == ""
        self.latencies.append(record["latency_s"])
        self.send_times.append(record["start_time"])
        self.spans.append((record["start_time"], record.get("end_time") or 0.0))
        for name, values in (("ttft_s", self.ttfts), ("itl_s", self.itls), ("tpot_s", self.tpots),
                             ("output_tokens_per_s", self.call_rates), ("send_delay_s", self.send_delays)):
            if record.get(name) is not None:
                values.append(record[name])
        usage = record["usage"]
        self.token_sources[usage["source"]] += 1
        if usage["total_tokens"] is None:
            self.uncounted += 1
        else:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]

    @property
    def measured(self) -> int:
        """Answered calls with measurements (this run's and a resumed run's earlier ones)."""
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return self.measured + self.cache_hits

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        called = self.calls - self.cache_hits
        return self.error_count / called if called else 0.0

    @property
    def streamed(self) -> bool:
        return bool(self.ttfts)

    @property
    def token_basis(self) -> str:
        """Where the token totals come from: one source, ``mixed(a+b)``, or ``none``."""
        sources = sorted(s for s in self.token_sources if s != "none")
        if not sources:
            return "none"
        return sources[0] if len(sources) == 1 else "mixed(" + "+".join(sources) + ")"

    def metrics(self) -> dict[str, float]:
        """Flat metric names and values for MLflow."""
        out: dict[str, float] = {
            "calls": self.calls,
            "calls_ok": self.ok,
            "calls_measured": self.measured,
            "errors": self.error_count,
            "error_rate": self.error_rate,
            "retries": self.retries,
            "backoff_s_total": self.backoff_s,
            "cache_hits": self.cache_hits,
            "resumed_calls": self.resumed,
            "warmup_calls": self.warmup_calls,
            "empty_answers": self.empty_answers,
            "wall_s": self.wall_s,
        }
        out.update({f"errors_{kind}": count for kind, count in self.errors.items()})
        out.update({f"tokens_source_{source}": count for source, count in self.token_sources.items()})
        if self.latencies:
            out.update(_distribution("latency_s", self.latencies, PERCENTILES))
            if self.wall_s > 0:
                out["requests_per_s"] = self.measured / self.wall_s
            out.update(self._intervals())
        if self.dispatch_delays:
            out.update(_distribution("dispatch_delay_s", self.dispatch_delays, STREAM_PERCENTILES))
        if len(self.send_times) > 1 and max(self.send_times) > min(self.send_times):
            out["achieved_rate"] = (len(self.send_times) - 1) / (max(self.send_times) - min(self.send_times))
        if self.requested_rate is not None:
            out["requested_rate"] = self.requested_rate
        if self.loop_lags:
            out.update(_distribution("loop_lag_s", self.loop_lags, STREAM_PERCENTILES))
        if self.send_delays:
            out.update(_distribution("send_delay_s", self.send_delays, STREAM_PERCENTILES))
        if self.slo is not None and self.slo.active and self.calls - self.cache_hits:
            out["slo_attainment"] = self.slo_met / (self.calls - self.cache_hits)
            if self.wall_s > 0:
                out["goodput"] = self.slo_met / self.wall_s
        for name, values in (("ttft_s", self.ttfts), ("itl_s", self.itls), ("tpot_s", self.tpots),
                             ("call_output_tokens_per_s", self.call_rates)):
            if values:
                out.update(_distribution(name, values, STREAM_PERCENTILES))
        counted = self.measured - self.uncounted
        if counted:
            out.update(
                prompt_tokens_total=self.prompt_tokens,
                completion_tokens_total=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
                prompt_tokens_mean=self.prompt_tokens / counted,
                completion_tokens_mean=self.completion_tokens / counted,
            )
            if self.wall_s > 0:
                out["output_tokens_per_s"] = self.completion_tokens / self.wall_s
            out.update(cost_metrics(self.price, self.prompt_tokens, self.completion_tokens, self.uncounted))
        return out

    def _intervals(self) -> dict[str, float]:
        """95% bootstrap intervals for latency p50/p95 and TTFT p50, and for requests/s (time blocks)."""
        out: dict[str, float] = {}
        if len(self.latencies) < 10:
            return out  # too few calls for an interval worth reading
        for name, values, q in (("latency_s_p50", self.latencies, 50), ("latency_s_p95", self.latencies, 95),
                                ("ttft_s_p50", self.ttfts, 50)):
            if len(values) >= 10:
                low, high = bootstrap_ci(values, lambda sample, q=q: percentile(sample, q))
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        rates = self._block_rates()
        if rates:
            low, high = bootstrap_ci(rates, lambda sample: sum(sample) / len(sample))
            out["requests_per_s_ci_low"], out["requests_per_s_ci_high"] = low, high
        return out

    def _block_rates(self, blocks: int = 10) -> list[float]:
        """Completions per second in ``blocks`` equal slices of the measured span (a block bootstrap of
        these gives throughput's interval whatever the load strategy; their mean is the run's rate)."""
        ends = sorted(end for _, end in self.spans if end)
        if len(ends) < 2 * blocks:
            return []
        first = min(start for start, _ in self.spans)
        width = (ends[-1] - first) / blocks
        if width <= 0:
            return []
        counts = [0] * blocks
        for end in ends:
            counts[min(blocks - 1, int((end - first) / width))] += 1
        return [count / width for count in counts]

    def warn_about_the_client(self) -> None:
        """Say when the client's own limits, not the server, may show in the figures."""
        m = self.metrics()
        if m.get("dispatch_delay_s_p99", 0.0) > BEHIND_SCHEDULE_S:
            log.warning("the client fell behind its schedule: dispatch delay p99 %.1f ms; achieved %.2f of %g "
                        "requests/s (latencies are measured from the real send)", m["dispatch_delay_s_p99"] * 1000,
                        m.get("achieved_rate", 0.0), self.requested_rate or 0)
        if m.get("loop_lag_s_p99", 0.0) > LOOP_LAG_S:
            log.warning("the client's event loop lagged (p99 %.1f ms): timings include the client's own delays; "
                        "lower the load or move work off this process", m["loop_lag_s_p99"] * 1000)

    def tags(self) -> dict[str, str]:
        """Provenance of the run's figures, as MLflow tags."""
        tags = {"pikeclient.token_basis": self.token_basis}
        if any(k.startswith("cost_") for k in self.metrics()):
            tags["pikeclient.cost_basis"] = "estimate" if self.token_sources["estimate"] else "exact"
        return tags


def _distribution(name: str, values: list[float], quantiles: tuple[int, ...]) -> dict[str, float]:
    out = {f"{name}_mean": sum(values) / len(values), f"{name}_max": max(values)}
    out.update({f"{name}_p{q}": percentile(values, q) for q in quantiles})
    return out


def format_summary(stats: RunStats, title: str) -> str:
    """A small table for people, printed at the end of a run (fits 100 columns)."""
    m = stats.metrics()

    def num(key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(m[key]) if key in m else "-"

    def triple(name: str) -> str:
        return " / ".join(num(f"{name}_p{q}") for q in STREAM_PERCENTILES)

    errors = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "0"
    if stats.error_count:
        errors += f" ({stats.error_rate:.0%} of calls)"
    def ci(key: str, digits: int = 3) -> str:
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        return "" if low is None else f" [{low:.{digits}f}, {high:.{digits}f}]"

    rows = [
        ("calls", f"{stats.calls} ({stats.ok} ok{_provenance_note(stats)})"),
        ("errors", errors),
        ("retries", str(stats.retries)),
        ("latency p50 / p95 (s)", f"{num('latency_s_p50')}{ci('latency_s_p50')} / "
                                  f"{num('latency_s_p95')}{ci('latency_s_p95')}"),
    ]
    if "requested_rate" in m:
        rows += [("rate achieved / asked (/s)", f"{num('achieved_rate', '{:.2f}')} / {m['requested_rate']:g}"),
                 ("dispatch delay p50 / p99 (ms)", f"{m.get('dispatch_delay_s_p50', 0) * 1000:.2f} / "
                                                   f"{m.get('dispatch_delay_s_p99', 0) * 1000:.2f}")]
    if "send_delay_s_p50" in m:  # the client's own time, left out of latency and TTFT
        rows.append(("client send delay p50 / p99 (ms)", f"{m['send_delay_s_p50'] * 1000:.2f} / "
                                                         f"{m['send_delay_s_p99'] * 1000:.2f}"))
    if "slo_attainment" in m:
        rows.append(("SLO met / goodput (/s)", f"{m['slo_attainment']:.1%} / {num('goodput', '{:.2f}')}"))
    for name, key, values in (("TTFT", "ttft_s", stats.ttfts), ("ITL", "itl_s", stats.itls),
                              ("TPOT", "tpot_s", stats.tpots)):
        if values:  # a local model has TTFT and TPOT, no chunks to time ITL by
            rows.append((f"{name} p50 / p90 / p99 (s)", triple(key)))
    rows += [
        ("tokens in / out", f"{num('prompt_tokens_total', '{:.0f}')} / {num('completion_tokens_total', '{:.0f}')}"
                            f" ({_sources_note(stats)})"),
        ("output tokens/s", num("output_tokens_per_s", "{:.1f}")),
        ("requests/s", num("requests_per_s", "{:.2f}") + ci("requests_per_s", 2)),
        ("cost", _cost_note(stats, m)),
        ("wall time (s)", f"{stats.wall_s:.2f}"),
    ]
    if stats.empty_answers:
        rows.insert(2, ("empty answers", str(stats.empty_answers)))
    width = max(len(k) for k, _ in rows)
    lines = [title[:100], "-" * min(100, max(len(title), width + 30))]
    lines += [f"{k:<{width}}  {v}"[:100] for k, v in rows]
    return "\n".join(lines)


def _provenance_note(stats: RunStats) -> str:
    notes = []
    if stats.resumed:
        notes.append(f"{stats.resumed} resumed")
    if stats.cache_hits:
        notes.append(f"{stats.cache_hits} from the response cache, not measured")
    return "".join(f", {note}" for note in notes)


def _sources_note(stats: RunStats) -> str:
    """Where the token counts came from, e.g. ``server`` or ``server 12, estimate 8``."""
    sources = {k: v for k, v in stats.token_sources.items() if v}
    if len(sources) == 1:
        return next(iter(sources))
    return ", ".join(f"{k} {v}" for k, v in sorted(sources.items())) or "none"


def _cost_note(stats: RunStats, m: dict[str, float]) -> str:
    cost = next(((k, v) for k, v in m.items() if k.startswith("cost_")), None)
    if cost is None:
        return "-"
    note = " (from estimated token counts)" if stats.token_sources["estimate"] else ""
    return f"{cost[1]:.4f} {cost[0].removeprefix('cost_').upper()}{note}"
