"""The run over time: per-interval series of what was sent, what came back and how fast.

Each interval of ``interval_s`` seconds since the measured start is one point, logged at step = its
start in seconds (``timeline/achieved_rate`` at step 7: the requests sent between 7 and 8 s), so
MLflow's charts show warm-up, drift and saturation on one time axis with the server's own series
(``server/...``, :mod:`pikeclient.tracking.server_metrics`). Calls count in the interval they were
sent (``sent``) or ended in (everything else); a resumed run's earlier calls and cached answers belong
to no interval of this run and are left out.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.statistics import percentile

PREFIX = "timeline/"


@dataclass
class Timeline:
    """Collects (start, end, latency, ttft, failed, retries) of the run's calls; ``series`` bins them."""

    interval_s: int = 1
    calls: list[tuple[float, float, float | None, float | None, bool, int]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        if record.get("cached") or record.get("resumed"):
            return
        start = record["start_time"]
        self.calls.append((start, record.get("end_time") or start, record.get("latency_s"), record.get("ttft_s"),
                           record["error"] is not None, max(0, record.get("attempts", 1) - 1)))

    def series(self, start_time: float) -> dict[str, dict[int, float]]:
        """``timeline/<name>`` -> {step (seconds since ``start_time``): value}, for every interval up to the
        last call's end (an interval with nothing sent or ended has zeros, not a gap). ``in_flight`` is the
        count at the step's own time (the interval's start)."""
        if not self.calls or start_time <= 0:
            return {}
        width = self.interval_s
        sent: dict[int, int] = defaultdict(int)
        ended: dict[int, list[tuple[float | None, float | None, bool, int]]] = defaultdict(list)
        last = 0
        starts = sorted(start for start, *_ in self.calls)
        ends = sorted(end for _, end, *_ in self.calls)
        for start, end, latency, ttft, failed, retries in self.calls:
            sent[self._bin(start, start_time)] += 1
            ended[self._bin(end, start_time)].append((latency, ttft, failed, retries))
            last = max(last, self._bin(end, start_time))
        out: dict[str, dict[int, float]] = defaultdict(dict)
        for index in range(last + 1):
            step = index * width
            done = ended.get(index, [])
            latencies = [lat for lat, _, failed, _ in done if not failed and lat is not None]
            ttfts = [ttft for _, ttft, failed, _ in done if not failed and ttft is not None]
            edge = start_time + step  # at the step's own time, as a server's gauges are stamped when scraped
            out["sent"][step] = sent.get(index, 0)
            out["completed"][step] = len(latencies)
            out["in_flight"][step] = bisect_right(starts, edge) - bisect_right(ends, edge)
            out["achieved_rate"][step] = sent.get(index, 0) / width
            out["completed_rate"][step] = len(latencies) / width
            out["errors"][step] = sum(1 for *_, failed, _ in done if failed)
            out["retries"][step] = sum(retries for *_, retries in done)
            for name, values in (("latency", latencies), ("ttft", ttfts)):
                if values:
                    out[f"{name}_p50"][step] = percentile(values, 50)
                    out[f"{name}_p99"][step] = percentile(values, 99)
        return {PREFIX + name: points for name, points in out.items()}

    def _bin(self, when: float, start_time: float) -> int:
        return max(0, int((when - start_time) // self.interval_s))
