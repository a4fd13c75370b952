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

from pikeclient.core.statistics import bootstrap_ci, percentile, quantile_ci  # noqa: F401 - also imported here
from pikeclient.eval.summary import quality_rows
from pikeclient.run.cost import Price, cost_metrics
from pikeclient.run.headroom import FIXES, client_limits
from pikeclient.run.timeline import Timeline
from pikeclient.run.turnstats import TurnStats

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
BEHIND_SCHEDULE_S = 0.005  # an open loop whose p99 dispatch delay exceeds this fell behind its schedule
MIN_BEYOND = 5  # a percentile's interval needs this many calls beyond it (p95: 100 calls)
MIN_COMPLETIONS = 50  # a throughput interval needs this many calls
STREAM_PERCENTILES = (50, 90, 99)
WIDTH = 100  # the summary fits a terminal this wide


@dataclass(frozen=True)
class Slo:
    """Service-level objectives (seconds; None: none). A call meets them when it answered within all, and
    with ``require_correct`` when its answer was also right (settled once it is scored:
    ``pikeclient.run.quality``)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    require_correct: bool = False

    @property
    def active(self) -> bool:
        return self.require_correct or any(v is not None for v in (self.ttft_s, self.tpot_s, self.latency_s))

    def met(self, record: dict[str, Any]) -> bool:
        """The timing part of the verdict (the answer's correctness is added when it is scored)."""
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
    usage_errors: int = 0  # answers whose server usage was refused (negative, absurd, not a count)
    empty_answers: int = 0
    cache_hits: int = 0
    resumed: int = 0
    warmup_calls: int = 0
    dispatch_delays: list[float] = field(default_factory=list)  # open loop: how late each request went
    slot_waits: list[float] = field(default_factory=list)  # open loop: of that, waiting for max_in_flight
    scheduled_latencies: list[float] = field(default_factory=list)  # open loop: from when due to the answer
    send_times: list[float] = field(default_factory=list)  # epoch seconds each measured call started
    send_delays: list[float] = field(default_factory=list)  # client time before each request went out
    connects: list[float] = field(default_factory=list)  # each new connection's set-up (requests that made one)
    loop_lags: list[float] = field(default_factory=list)
    spans: list[tuple[float, float, float]] = field(default_factory=list)  # (start, end, session), measured calls
    segments: list[tuple[float, float]] = field(default_factory=list)  # earlier processes' measured spans (resume)
    max_in_flight: int | None = None
    client_cpu_share: float | None = None  # of one core, this process (the busiest worker), over the measured span
    workers: int = 1  # processes or Ray actors that made the calls (load.workers)
    local_model: bool = False  # the calls computed in this process: its CPU is the model's, no verdict
    in_flight_lowest: int | None = None  # an open loop's lowest own in-flight limit
    client_held_s: float = 0.0  # time the sending waited under that lowered limit
    slo: Slo | None = None
    slo_met: int = 0
    requested_rate: float | None = None
    wall_s: float = 0.0
    start_time: float = 0.0  # epoch seconds: the measured span (after loading and warm-up)
    end_time: float = 0.0
    price: Price | None = None
    turns: TurnStats = field(default_factory=TurnStats)  # multi-turn sessions: by turn and by session
    quality: dict[str, float] = field(default_factory=dict)  # scores' and judge's metrics (pikeclient.eval)
    timeline: Timeline = field(default_factory=Timeline)  # the run over time (timeline/* series)
    saturated: str | None = None  # why the over-saturation stop ended the run early (pikeclient.run.saturation)
    behind: str | None = None  # why an open loop stopped early: its client fell hopelessly behind (headroom.Behind)
    server_series: dict[str, dict[int, float]] = field(default_factory=dict)  # server/* (tracking.server_metrics)
    server_totals: dict[str, float] = field(default_factory=dict)  # the server's token counters over the run

    def slo_verdict(self, record: dict[str, Any]) -> None:
        """Mark whether a call met the SLOs (records carry ``slo_met`` when SLOs are set)."""
        if self.slo is not None and self.slo.active:
            record["slo_met"] = self.slo.met(record)

    def add(self, record: dict[str, Any]) -> None:
        self.calls += 1
        self.timeline.add(record)
        if record.get("turn") is not None:
            self.turns.add(record)
        if record.get("cached"):  # read back from the response cache: not a measurement of this run
            self.cache_hits += 1
            return
        if record.get("dispatch_delay_s") is not None:
            self.dispatch_delays.append(record["dispatch_delay_s"])
            self.slot_waits.append(record.get("slot_wait_s") or 0.0)
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
        self.spans.append((record["start_time"], record.get("end_time") or record["start_time"],
                           record.get("session", 0)))
        for name, values in (("ttft_s", self.ttfts), ("itl_s", self.itls), ("tpot_s", self.tpots),
                             ("output_tokens_per_s", self.call_rates), ("send_delay_s", self.send_delays),
                             ("connect_s", self.connects),
                             ("latency_from_schedule_s", self.scheduled_latencies)):
            if record.get(name) is not None:
                values.append(record[name])
        usage = record["usage"]
        self.usage_errors += bool(usage.get("server_error"))
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
        """Metric names and values for MLflow, grouped by the prefix before "/" (MLflow's chart sections):
        the headline groups (Latency, TTFT, ITL, TPOT, Throughput, SLO, Errors, Cost) are capitalized, so
        that MLflow, which orders sections by name, shows them before the details (calls, tokens,
        client, run). docs/metrics.md has every name, and the names before version 0.2."""
        out: dict[str, float] = {
            "calls/total": self.calls,
            "calls/ok": self.ok,
            "calls/measured": self.measured,
            "calls/cache_hits": self.cache_hits,
            "calls/resumed": self.resumed,
            "calls/warmup": self.warmup_calls,
            "calls/empty_answers": self.empty_answers,
            "Errors/count": self.error_count,
            "Errors/rate": self.error_rate,
            "Errors/retries": self.retries,
            "Errors/backoff_s_total": self.backoff_s,
            "run/wall_s": self.wall_s,
            "tokens/server_usage_errors": self.usage_errors,
            "run/saturated": float(self.saturated is not None),
            "run/stopped_behind": float(self.behind is not None),
        }
        out.update({f"Errors/{kind}": count for kind, count in self.errors.items()})
        out.update({f"tokens/source_{source}": count for source, count in self.token_sources.items()})
        if self.latencies:
            out.update(_distribution("Latency/", self.latencies, PERCENTILES))
            if self.wall_s > 0:
                out["Throughput/requests_per_s"] = self.measured / self.wall_s
            out.update(self._intervals())
        if self.dispatch_delays:
            out.update(_distribution("client/dispatch_delay_", self.dispatch_delays, STREAM_PERCENTILES))
            out.update(_distribution("client/slot_wait_", self.slot_waits, STREAM_PERCENTILES))
        if self.scheduled_latencies:
            out.update(_distribution("Latency/from_schedule_", self.scheduled_latencies, PERCENTILES))
        if len(self.send_times) > 1 and max(self.send_times) > min(self.send_times):
            out["Throughput/achieved_rate"] = (len(self.send_times) - 1) / (max(self.send_times) - min(self.send_times))
        if self.requested_rate is not None:
            out["Throughput/requested_rate"] = self.requested_rate
        if self.loop_lags:
            out.update(_distribution("client/loop_lag_", self.loop_lags, STREAM_PERCENTILES))
        if self.client_cpu_share is not None:
            out["client/cpu_share"] = self.client_cpu_share
        if self.in_flight_lowest is not None:
            out["client/in_flight_lowest"] = self.in_flight_lowest
            out["client/held_s"] = self.client_held_s
        if self.send_delays:
            out.update(_distribution("client/send_delay_", self.send_delays, STREAM_PERCENTILES))
        if self.connects:  # left out of latency and TTFT, as the send delay is
            out.update(_distribution("client/connect_", self.connects, STREAM_PERCENTILES))
            out["client/connections_opened"] = len(self.connects)
        if self.slo is not None and self.slo.active and self.calls - self.cache_hits:
            out["SLO/attainment"] = self.slo_met / (self.calls - self.cache_hits)
            if self.wall_s > 0:
                out["SLO/goodput"] = self.slo_met / self.wall_s
        for prefix, values in (("TTFT/", self.ttfts), ("ITL/", self.itls), ("TPOT/", self.tpots),
                               ("Throughput/call_output_tokens_per_s_", self.call_rates)):
            if values:
                out.update(_distribution(prefix, values, STREAM_PERCENTILES))
        counted = self.measured - self.uncounted
        if counted:
            out.update({
                "tokens/prompt_total": self.prompt_tokens,
                "tokens/completion_total": self.completion_tokens,
                "tokens/total": self.prompt_tokens + self.completion_tokens,
                "tokens/prompt_mean": self.prompt_tokens / counted,
                "tokens/completion_mean": self.completion_tokens / counted,
            })
            if self.wall_s > 0:
                out["Throughput/output_tokens_per_s"] = self.completion_tokens / self.wall_s
            out.update(cost_metrics(self.price, self.prompt_tokens, self.completion_tokens, self.uncounted))
        out.update(self.turns.metrics())
        out.update(self.server_totals)
        out.update(self.quality)
        return out

    def series(self) -> dict[str, dict[int, float]]:
        """Metrics logged as series (name -> {step: value}): by turn index for multi-turn sessions; by
        seconds since the start for the run over time (``timeline/*``, and the server's ``server/*``)."""
        return {**self.turns.series(), **self.timeline.series(self.start_time), **self.server_series}

    def _intervals(self) -> dict[str, float]:
        """95% intervals for latency p50/p95 and TTFT p50 (order statistics), and for requests/s (a
        bootstrap of time blocks);
        none where the sample cannot support one (too few calls beyond the percentile, too short a run)."""
        out: dict[str, float] = {}
        for name, values, q in (("Latency/p50", self.latencies, 50), ("Latency/p95", self.latencies, 95),
                                ("TTFT/p50", self.ttfts, 50)):
            if len(values) * (100 - q) / 100 >= MIN_BEYOND:
                low, high = quantile_ci(values, q)
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        blocks = self._blocks()
        if blocks:
            low, high = bootstrap_ci(blocks, lambda sample: sum(c for c, _ in sample) / sum(w for _, w in sample))
            out["Throughput/requests_per_s_ci_low"], out["Throughput/requests_per_s_ci_high"] = low, high
        return out

    def _blocks(self, blocks: int = 10) -> list[tuple[int, float]]:
        """(completions, seconds) in ``blocks`` slices of the measured time, each process's span sliced on
        its own (a resumed run's parts are apart in time: the gap between them is no measured time).

        Resampling blocks gives the rate's interval whatever the load strategy. None when a run is too
        short for one: fewer than MIN_COMPLETIONS calls, or slices narrower than the median latency (calls
        then end in bursts and the blocks measure the bursts, not the rate)."""
        by_session: dict[float, list[tuple[float, float]]] = {}
        for start, end, session in self.spans:
            by_session.setdefault(session, []).append((start, end))
        parts = [(min(s for s, _ in spans), max(e for _, e in spans), [e for _, e in spans])
                 for spans in by_session.values()]
        total = sum(last - first for first, last, _ in parts)
        if len(self.spans) < MIN_COMPLETIONS or total <= 0:
            return []
        width = total / blocks
        if width < percentile(self.latencies, 50):
            return []
        out: list[tuple[int, float]] = []
        for first, last, ends in parts:
            count = max(1, round((last - first) / width))
            step = (last - first) / count
            if step <= 0:
                continue
            counts = [0] * count
            for end in ends:
                counts[min(count - 1, int((end - first) / step))] += 1
            out += [(c, step) for c in counts]
        return out

    @property
    def client_limits(self) -> list[str]:
        """Why the client limited this run (empty: it did not, or the model ran in this process, where the
        client's CPU and event loop are the model's work); see ``pikeclient.run.headroom``."""
        if self.local_model:
            return []
        return client_limits(self.metrics(), self.client_cpu_share, self.in_flight_lowest, self.max_in_flight,
                             self.workers, self.behind)

    def warn_about_the_client(self) -> None:
        """Say once, when it matters, whether the client or the server held the calls back, and what to do."""
        m = self.metrics()
        reasons = self.client_limits
        if self.behind:
            log.warning("the run stopped sending early: %s (achieved %.0f of %g requests/s asked; %s); the calls in "
                        "flight were finished. Give it more workers (load.workers=N, up to the cores; load.backend=ray "
                        "for more machines) or ask for less (experiment.stop_when_behind=false sends everything, "
                        "however late)", self.behind, m.get("Throughput/achieved_rate", 0.0), self.requested_rate or 0,
                        "; ".join(reasons[1:]) or "the client's own limits")
            return
        if reasons:
            log.warning("the client limited this run: %s; its latencies include the client's own delays: %s",
                        "; ".join(reasons), FIXES)
            return
        if m.get("client/dispatch_delay_p99", 0.0) > BEHIND_SCHEDULE_S:
            log.warning("the server held the schedule back: calls waited for one of the load.max_in_flight=%s "
                        "slots (p99 %.3f s) because earlier calls had not returned; achieved %.2f of %g requests/s; "
                        "latency from the scheduled time (what users arriving on schedule waited) p50 %.3f s / p99 "
                        "%.3f s", self.max_in_flight, m.get("client/slot_wait_p99", 0.0),
                        m.get("Throughput/achieved_rate", 0.0), self.requested_rate or 0,
                        m.get("Latency/from_schedule_p50", 0.0), m.get("Latency/from_schedule_p99", 0.0))

    def tags(self) -> dict[str, str]:
        """Provenance of the run's figures, as MLflow tags."""
        tags = {"pikeclient.token_basis": self.token_basis,
                "pikeclient.client_limited": "true" if self.client_limits else "false",
                "pikeclient.saturated": "true" if self.saturated else "false",
                "pikeclient.workers": str(self.workers)}
        if any(k.startswith("Cost/") for k in self.metrics()):
            tags["pikeclient.cost_basis"] = "estimate" if self.token_sources["estimate"] else "exact"
        return tags


def _who(stats: RunStats) -> str:
    return f"the busiest of its {stats.workers} workers" if stats.workers > 1 else "it"


def _distribution(prefix: str, values: list[float], quantiles: tuple[int, ...]) -> dict[str, float]:
    """``prefix`` + mean, max and each percentile (``Latency/p50``, ``client/loop_lag_p99``)."""
    out = {f"{prefix}mean": sum(values) / len(values), f"{prefix}max": max(values)}
    out.update({f"{prefix}p{q}": percentile(values, q) for q in quantiles})
    return out


def format_summary(stats: RunStats, title: str) -> str:
    """A small table for people, printed at the end of a run (fits 100 columns)."""
    m = stats.metrics()

    def num(key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(m[key]) if key in m else "-"

    def ms(key: str) -> str:
        return f"{m.get(key, 0.0) * 1000:.2f}"

    def ci(key: str, digits: int = 3) -> str:
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        return "" if low is None else f" [{low:.{digits}f}, {high:.{digits}f}]"

    errors = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "0"
    if stats.error_count:
        errors += f" ({stats.error_rate:.0%} of calls)"
    rows = [
        ("calls", f"{stats.calls} ({stats.ok} ok{_provenance_note(stats)})"),
        ("errors", errors),
        ("retries", str(stats.retries)),
        ("latency p50 / p95 (s)", f"{num('Latency/p50')}{ci('Latency/p50')} / {num('Latency/p95')}{ci('Latency/p95')}"),
    ]
    if "Throughput/requested_rate" in m:
        rows += [("rate achieved / asked (/s)", f"{num('Throughput/achieved_rate', '{:.2f}')} / "
                                                f"{m['Throughput/requested_rate']:g}"),
                 ("dispatch delay p50 / p99 (ms)", f"{ms('client/dispatch_delay_p50')} / "
                                                   f"{ms('client/dispatch_delay_p99')}")]
    if "Latency/from_schedule_p50" in m:  # what a user arriving on schedule waited (coordinated omission)
        rows.append(("latency from schedule p50 / p99 (s)", f"{num('Latency/from_schedule_p50')} / "
                                                            f"{num('Latency/from_schedule_p99')}"))
    if stats.client_cpu_share is not None and not stats.local_model:  # the client, not the server, set the pace?
        reasons = stats.client_limits
        rows.append(("client limited", f"yes: {'; '.join(reasons)}" if reasons else
                     f"no ({_who(stats)} used {stats.client_cpu_share:.0%} of a core)"))
    if stats.saturated:  # the over-saturation stop ended the sending early
        rows.append(("saturated", f"yes, stopped early: {stats.saturated}"))
    if stats.behind:  # the client could not keep to the schedule: the run stopped rather than measure itself
        rows.append(("stopped early", f"{stats.behind}: give it more workers (load.workers)"))
    if "client/send_delay_p50" in m:  # the client's own time, left out of latency and TTFT
        rows.append(("client send delay p50 / p99 (ms)", f"{ms('client/send_delay_p50')} / "
                                                         f"{ms('client/send_delay_p99')}"))
    if "client/connections_opened" in m:
        rows.append(("new connections: set-up p50 (ms)", f"{ms('client/connect_p50')} "
                     f"({m['client/connections_opened']:.0f} opened, max {ms('client/connect_max')})"))
    if "SLO/attainment" in m:
        rows.append(("SLO met / goodput (/s)", f"{m['SLO/attainment']:.1%} / {num('SLO/goodput', '{:.2f}')}"))
    for name, values in (("TTFT", stats.ttfts), ("ITL", stats.itls), ("TPOT", stats.tpots)):
        if values:  # a local model has TTFT and TPOT, no chunks to time ITL by
            # Milliseconds to the hundredth: an ITL of 10.04 ms is not "0.010 s" (chunk gaps are sub-millisecond apart).
            rows.append((f"{name} p50 / p90 / p99 (ms)", " / ".join(ms(f"{name}/p{q}") for q in STREAM_PERCENTILES)))
    rows += [
        ("tokens in / out", f"{num('tokens/prompt_total', '{:.0f}')} / {num('tokens/completion_total', '{:.0f}')}"
                            f" ({_sources_note(stats)})"),
        ("output tokens/s", num("Throughput/output_tokens_per_s", "{:.1f}")),
        ("requests/s", num("Throughput/requests_per_s", "{:.2f}") + ci("Throughput/requests_per_s", 2)),
        ("cost", _cost_note(stats, m)),
        *quality_rows(m),
        ("wall time (s)", f"{stats.wall_s:.2f}"),
    ]
    if stats.empty_answers:
        rows.insert(2, ("empty answers", str(stats.empty_answers)))
    rows += stats.turns.summary_rows()
    width = max(len(k) for k, _ in rows)
    lines = [_fit(title), "-" * min(WIDTH, max(len(title), width + 30))]
    lines += [_fit(f"{k:<{width}}  {v}") for k, v in rows]
    return "\n".join(lines)


def _fit(line: str) -> str:
    """At most WIDTH columns; a cut is marked, never silent."""
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + "…"


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
    note = next(iter(sources)) if len(sources) == 1 else ", ".join(f"{k} {v}" for k, v in sorted(sources.items()))
    if stats.usage_errors:  # the server's own counts were not sane numbers: counted here instead
        note += f"; {stats.usage_errors} server counts refused"
    return note or "none"


def _cost_note(stats: RunStats, m: dict[str, float]) -> str:
    cost = next(((k, v) for k, v in m.items() if k.startswith("Cost/")), None)
    if cost is None:
        return "-"
    note = " (from estimated token counts)" if stats.token_sources["estimate"] else ""
    return f"{cost[1]:.4f} {cost[0].removeprefix('Cost/').upper()}{note}"
