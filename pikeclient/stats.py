"""Run statistics from per-call records: latency percentiles, token totals, throughput, errors."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pikeclient.cost import Price, cost_metrics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); ``values`` must be non-empty."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RunStats:
    """Accumulates call outcomes as they arrive; only the numbers the summary needs are kept."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    calls: int = 0
    retries: int = 0
    backoff_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    uncounted: int = 0
    cache_hits: int = 0
    wall_s: float = 0.0
    price: Price | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.calls += 1
        self.retries += max(0, record["attempts"] - 1)
        self.backoff_s += record.get("backoff_s") or 0.0
        if record["error"] is not None:
            self.errors[record["error_kind"]] += 1
            return
        if record.get("cached"):  # paid for in an earlier run; not a latency measurement
            self.cache_hits += 1
            return
        self.latencies.append(record["latency_s"])
        if record.get("ttft_s") is not None:
            self.ttfts.append(record["ttft_s"])
        usage = record["usage"]
        if usage["total_tokens"] is None:
            self.uncounted += 1
        else:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]

    @property
    def ok(self) -> int:
        return len(self.latencies) + self.cache_hits

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def metrics(self) -> dict[str, float]:
        """Flat metric names and values for MLflow."""
        out: dict[str, float] = {
            "calls": self.calls,
            "calls_ok": self.ok,
            "errors": self.error_count,
            "retries": self.retries,
            "backoff_s_total": self.backoff_s,
            "cache_hits": self.cache_hits,
            "wall_s": self.wall_s,
        }
        out.update({f"errors_{kind}": count for kind, count in self.errors.items()})
        if self.latencies:
            out.update(_distribution("latency_s", self.latencies))
        if self.ttfts:
            out.update({f"ttft_s_p{q}": percentile(self.ttfts, q) for q in (50, 90)})
        counted = len(self.latencies) - self.uncounted
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


def _distribution(name: str, values: list[float]) -> dict[str, float]:
    out = {f"{name}_mean": sum(values) / len(values), f"{name}_max": max(values)}
    out.update({f"{name}_p{q}": percentile(values, q) for q in (50, 90, 95, 99)})
    return out


def format_summary(stats: RunStats, title: str) -> str:
    """A small table for people, printed at the end of a run."""
    m = stats.metrics()

    def num(key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(m[key]) if key in m else "-"

    errors = ", ".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "0"
    rows = [
        ("calls", f"{stats.calls} ({stats.ok} ok{_cached_note(stats.cache_hits)})"),
        ("errors", errors),
        ("retries", str(stats.retries)),
        ("latency p50 / p95 (s)", f"{num('latency_s_p50')} / {num('latency_s_p95')}"),
        ("tokens in / out", f"{num('prompt_tokens_total', '{:.0f}')} / {num('completion_tokens_total', '{:.0f}')}"),
        ("output tokens/s", num("output_tokens_per_s", "{:.1f}")),
        ("cost", next((f"{v:.4f} {k.removeprefix('cost_').upper()}" for k, v in m.items() if k.startswith("cost_")), "-")),
        ("wall time (s)", f"{stats.wall_s:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _cached_note(hits: int) -> str:
    """Answers read back from the resume cache are not measurements: say so where latencies go missing."""
    return f", {hits} from the cache, not measured: cache.mode=refresh calls again" if hits else ""
