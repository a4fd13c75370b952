"""The client's own headroom: how late its event loop runs, how much of a core it uses, and how many
calls it can keep in flight before its own work, not the server, sets the pace.

An open loop offered more than the client can send used to keep up to ``load.max_in_flight`` (1,024)
calls on one event loop; past its capacity each call's bookkeeping delayed every other one, and against
a server answering at once it fell from 407 to 193 requests/s with 4 s "latencies" that were the
client's own queue. :class:`InFlight` lowers its own limit while the loop lags and raises it again when
the loop keeps up (additive increase, multiplicative decrease), so an overloaded run sends at about the
client's closed-loop capacity, and the shortfall shows as dispatch delay, never as server latency.
"""

from __future__ import annotations

import asyncio
import gc
import time


def settle_heap() -> None:
    """Before the measured calls: collect, then move every object alive (imports, config, prompts, the
    client) out of the collector's sight (``gc.freeze``).

    A full collection walks every tracked object; with the SDK, Hydra's config and a workload's prompts
    loaded, each took 75-95 ms in a worker and in the run's process, every few seconds at 1,000 calls a
    second: the calls due then went that late. What the calls create is still collected; what lived
    before them is not walked again."""
    gc.collect()
    gc.freeze()


class LoopLag:
    """Samples how late the event loop wakes a 10 ms timer: the client's own headroom.

    A busy loop delays every timestamp taken on it; when the lag is high, latencies partly measure
    the client, not the server. ``listener`` (an :class:`InFlight`) hears each sample.
    """

    INTERVAL = 0.01

    def __init__(self, listener: InFlight | None = None) -> None:
        self.samples: list[float] = []
        self.listener = listener

    async def watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.INTERVAL)
            lag = max(0.0, time.perf_counter() - before - self.INTERVAL)
            self.samples.append(lag)
            if self.listener is not None:
                self.listener.hear(lag)


class InFlight:
    """How many calls may be in flight: at most ``most``, fewer while the client's event loop lags."""

    HIGH_LAG_S = 0.01  # the loop's median lag over a window this late: it is behind; shrink the limit
    LOW_LAG_S = 0.003  # this early while every slot is taken: there is room; grow it
    WINDOW = 20  # samples (200 ms): a median over them ignores the odd late wake-up the OS causes
    LEAST = 32
    SHRINK = 0.8
    STEP_S = 0.2  # at most one change a window
    SWAMPED_S = 0.1

    START = 64  # slow start: the limit begins here and doubles while the loop keeps up

    def __init__(self, most: int) -> None:
        self.most = most
        self.limit = min(most, self.START)
        self.count = 0
        self.lowest = most  # the lowest limit the run needed (a client-limited run shows it)
        self.starting = self.limit < most
        self.held_s = 0.0  # time the sending waited while the limit was below ``most``
        self.waiting = 0  # acquires waiting for a slot (a release wakes one only if there is one)
        self._changed = 0.0
        self._recent: list[float] = []
        self._freed = asyncio.Condition()

    async def acquire(self) -> float:
        """Wait for a slot; returns how long the client's own lowered limit held the sending back."""
        if self.count < self.limit:
            self.count += 1
            return 0.0
        held, start = self.limit < self.most, time.perf_counter()
        self.waiting += 1
        try:
            async with self._freed:
                await self._freed.wait_for(lambda: self.count < self.limit)
        finally:
            self.waiting -= 1
        self.count += 1
        waited = time.perf_counter() - start
        if held:
            self.held_s += waited
        return waited if held else 0.0

    def release(self) -> None:
        self.count -= 1
        if self.waiting:  # a task per call only while the sending waits for slots
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._freed:
            self._freed.notify(1)

    def hear(self, lag: float) -> None:
        self._recent.append(lag)
        swamped = lag > self.SWAMPED_S  # one wake-up this late: act now, a window would take seconds to fill
        if len(self._recent) < self.WINDOW and not swamped:
            return
        lag = lag if swamped else sorted(self._recent)[len(self._recent) // 2]
        self._recent.clear()
        now = time.perf_counter()
        if now - self._changed < self.STEP_S:
            return
        if lag > self.HIGH_LAG_S:
            self.starting = False
            if self.limit > self.LEAST:
                self.limit = max(self.LEAST, int(self.limit * self.SHRINK))
                self.lowest = min(self.lowest, self.limit)
                self._changed = now
        elif lag < self.LOW_LAG_S and self.count >= self.limit and self.limit < self.most:
            grown = self.limit * 2 if self.starting else self.limit + max(1, self.limit // 8)
            self.limit = min(self.most, grown)
            self._changed = now
            asyncio.get_running_loop().create_task(self._wake_all())

    async def _wake_all(self) -> None:
        async with self._freed:
            self._freed.notify_all()


class Behind:
    """Whether an open loop's client has fallen hopelessly behind its schedule: a request goes more than
    ``LEAST_S`` and more than ``SHARE`` of the time since the start after it was due, not because
    ``max_in_flight`` calls were out (that is the server's doing), ``AFTER_S`` or more into the run.

    Late by half the elapsed time means sending at under two thirds of the asked rate; going on would
    take minutes to send what was asked in seconds, at the client's own pace, measuring the client.
    The run stops sending (calls in flight finish) and says so (``experiment.stop_when_behind=false``:
    it goes on to the end)."""

    AFTER_S = 5.0
    LEAST_S = 5.0
    SHARE = 0.5

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def judge(self, late: float, elapsed: float, capped: bool) -> str | None:
        """Why the sending must stop (a request ``late`` seconds late, ``elapsed`` into the run; ``capped``:
        it waited because ``max_in_flight`` calls were out), or None."""
        if not self.enabled or capped or elapsed < self.AFTER_S or late <= max(self.LEAST_S, self.SHARE * elapsed):
            return None
        return f"the client fell {late:.1f} s behind its schedule {elapsed:.0f} s into the run"


class CpuMeter:
    """Share of one core this process used over a span (a client at ~100% is the bottleneck)."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def share(self) -> float:
        wall = time.perf_counter() - self.wall
        return (time.process_time() - self.cpu) / wall if wall > 0 else 0.0


CPU_SATURATED = 0.9  # of one core: the event loop has no time left over
LOOP_LAG_S = 0.005  # event-loop lag (p90: lasting, not a blip) above which the client's timing is in doubt...
LAG_SHARE = 0.1  # ...when it is also this share of the median latency (TTFT when streaming) it would blur
FIXES = ("give it more workers (load.workers=N, up to the cores; load.backend=ray for more machines), turn traces "
         "off (tracking.traces=false), lower the rate or concurrency, or run fewer things on this machine")


def client_limits(metrics: dict[str, float], cpu_share: float | None, lowest: int | None,
                  most: int | None, workers: int = 1, behind: str | None = None) -> list[str]:
    """Why the client, not the server, limited a run (empty: it did not): its CPU (with workers: the
    busiest one's), its event loop, its own lowered in-flight limit. A run that says so reports
    latencies that include the client's time."""
    reasons = [behind] if behind else []
    if cpu_share is not None and cpu_share >= CPU_SATURATED:
        who = f"the busiest of its {workers} workers" if workers > 1 else "it"
        reasons.append(f"{who} used {cpu_share:.0%} of a core")
    lag = metrics.get("client/loop_lag_p90", 0.0)
    timing = metrics.get("TTFT/p50") or metrics.get("Latency/p50") or 0.0
    if lag > LOOP_LAG_S and lag > LAG_SHARE * timing:
        which = "TTFT" if metrics.get("TTFT/p50") else "latency"
        share = 100 * lag / timing if timing else 100
        reasons.append(f"its event loop lagged (p90 {lag * 1000:.1f} ms, {share:.0f}% of the median {which})")
    if lowest is not None and most is not None and lowest < most:
        reasons.append(f"it kept at most {lowest} calls in flight of load.max_in_flight={most} to keep up")
    return reasons
