"""The runner: push prompts through a client under a load strategy, and record every call.

``run_prompts`` makes the calls (closed loop: a fixed pool of workers; open loop: requests sent when
they are due), warms up first, writes one record per prompt and feeds the statistics. It knows nothing
of Hydra or MLflow: ``pikeclient.run.experiment`` builds its inputs from the config and tracks its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any, TypeVar

import orjson
from tqdm import tqdm

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import LLMError, PikeError
from pikeclient.core.request_id import request_id
from pikeclient.core.types import ChatResult, Message
from pikeclient.run.alarm import Alarm
from pikeclient.run.cache import ResponseCache, cache_key, request_digest
from pikeclient.run.dataset import PromptItem
from pikeclient.run.headroom import Behind, CpuMeter, InFlight, LoopLag, settle_heap
from pikeclient.run.load import Concurrency, Limit, Strategy
from pikeclient.run.redact import Redactor
from pikeclient.run.resume import Earlier
from pikeclient.run.sessions import play_sessions
from pikeclient.run.stats import RunStats, Slo

if TYPE_CHECKING:
    from pikeclient.run.workers import WorkerPlan

log = logging.getLogger(__name__)
T = TypeVar("T")

NON_RETRYABLE = ("auth", "bad_request", "context_window", "model", "protocol")


class RunStopped(PikeError):
    """The experiment stopped early (authentication failed, or fail_fast met an error)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the calls: in-flight calls were cancelled and every record written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def run_prompts(
    client: BaseLLMClient,
    prompts: Sequence[PromptItem],
    load: int | Strategy,
    sink: IO[str] | None = None,
    on_record: Callable[[dict[str, Any], PromptItem], None] | None = None,
    cache: ResponseCache | None = None,
    fail_fast: bool = False,
    warmup: int = 0,
    earlier: Earlier | None = None,
    before_start: Callable[[], None] | None = None,
    on_begin: Callable[[float], None] | None = None,
    redactor: Redactor | None = None,
    limits: Sequence[Limit] = (),
    slo: Slo | None = None,
    workers: WorkerPlan | None = None,
    stop_when_behind: bool = True,
) -> RunStats:
    """Call ``client`` once per prompt under the ``load`` strategy; stream records to ``sink``.

    ``load`` is a strategy from ``pikeclient.run.load`` (an int means that many workers in a closed loop).
    ``warmup`` calls go first and are discarded. Prompts answered in ``earlier`` are not called again;
    ``limits`` end the sending early. ``before_start`` runs after the warm-up, before the clock starts;
    ``on_begin`` gets the measured start (epoch seconds). An authentication error stops the run (every
    further call would fail the same way), and so does any error retrying cannot fix when ``fail_fast``
    is set. With
    ``workers`` (more than one), the calls are made in worker processes under this one's schedule
    (``pikeclient.run.workers``); records, statistics and limits stay here.
    """
    strategy = Concurrency(load) if isinstance(load, int) else load
    stats = RunStats(slo=slo)
    pool = None
    try:
        if workers is not None:
            from pikeclient.run.workers import WorkerPool

            pool = await WorkerPool.start(workers, prompts, strategy, cache, fail_fast, limits, stop_when_behind)
            stats.warmup_calls = await pool.warm_up(warmup)
        else:
            stats.warmup_calls = await warm_up(client, prompts, warmup, strategy.max_in_flight)
        if before_start is not None:  # record keeping set up now (the MLflow run): none of its work while measuring
            before_start()
        settle_heap()
        stats.start_time = time.time()
        if on_begin is not None:
            on_begin(stats.start_time)
        done = earlier.records if earlier else {}
        total = len(prompts) - len(done)
        for limit in limits:
            total = limit.most(total)
        calls = _Calls(client, stats, sink, on_record, cache, fail_fast, redactor, limits, total)
        calls.behind_judge = Behind(stop_when_behind)
        for index, record in sorted(done.items()):  # already in the records file: counted, not written again
            calls.emit(record, prompts[index], write=False)
        if earlier is not None:
            stats.segments = list(earlier.segments)
        todo = ((i, prompts[i]) for i in range(len(prompts)) if i not in done)  # made as they are sent
        log.info("measuring: %d calls, %s%s", total, strategy.describe(),
                 f", {pool.describe()}" if pool is not None else "")
        calls.in_flight = InFlight(strategy.max_in_flight) if strategy.open_loop and pool is None else None
        lag = LoopLag(calls.in_flight)
        watcher = asyncio.create_task(lag.watch())
        cpu = CpuMeter()
        start = calls.start = time.perf_counter()
        calls.catch_signals()
        try:
            if pool is not None:
                await pool.run(calls, todo, strategy, start, stats.start_time, done)
            elif getattr(strategy, "sessions", False):  # conversations, turn by turn (pikeclient.run.sessions)
                await play_sessions(calls, prompts, done, strategy, start)
            elif strategy.open_loop:
                await calls.open_loop(scheduled(strategy.schedule(todo)), strategy.max_in_flight, start)
            else:
                await calls.closed_loop(taking(todo), min(strategy.max_in_flight, total), start)
        except asyncio.CancelledError:
            if calls.interrupted is None:
                raise
        finally:
            calls.release_signals()
            stats.wall_s = time.perf_counter() - start + (earlier.wall_s if earlier else 0.0)
            stats.end_time = time.time()
            watcher.cancel()
            stats.loop_lags = lag.samples
            stats.client_cpu_share = cpu.share()
            stats.local_model = client.computes_locally
            if calls.in_flight is not None:
                stats.in_flight_lowest, stats.client_held_s = calls.in_flight.lowest, calls.in_flight.held_s
            if pool is not None:  # the workers' event loops and CPU are the ones that timed the calls
                pool.report_into(stats)
            stats.saturated = next((limit.reason for limit in limits if getattr(limit, "reason", None)), None)
            stats.behind = calls.behind
            calls.progress.close()
    finally:
        if pool is not None:
            await pool.close()
        await client.aclose()
    if stats.saturated:
        log.warning("the run stopped sending early, %s; it is marked saturated (calls in flight were finished)",
                    stats.saturated)
    if calls.interrupted is not None:
        raise Interrupted(calls.interrupted)
    if calls.stop:
        raise RunStopped(f"stopped after {stats.calls} of {len(prompts)} prompts: {calls.stop[0]}")
    return stats


class _Calls:
    """Makes and records the calls of one run, under a closed or an open loop."""

    def __init__(self, client: BaseLLMClient, stats: RunStats, sink: IO[str] | None,
                 on_record: Callable[[dict[str, Any], PromptItem], None] | None, cache: ResponseCache | None,
                 fail_fast: bool, redactor: Redactor | None, limits: Sequence[Limit], total: int,
                 progress: bool = True) -> None:
        self.client, self.stats, self.sink, self.on_record, self.cache = client, stats, sink, on_record, cache
        self.fail_fast, self.redactor, self.limits = fail_fast, redactor, limits
        self.identity = client.describe() if client is not None else {}
        self.stop: list[str] = []
        self.sent = 0
        self.ended = 0  # calls of this run that have ended (the rest of ``sent`` are in flight)
        self.start = 0.0  # perf_counter when the measured calls began
        self.tasks: set[asyncio.Task] = set()  # the calls' tasks, cancelled on Ctrl-C or SIGTERM
        self.interrupted: int | None = None
        self.in_flight: InFlight | None = None  # an open loop's slots (see pikeclient.run.headroom)
        self.on_interrupt: Callable[[], None] | None = None  # workers (pikeclient.run.workers) are told apart
        self.behind: str | None = None  # why an open loop stopped: its client fell hopelessly behind
        self.behind_judge = Behind(False)
        self.on_behind: Callable[[str], None] | None = None  # a worker tells its parent
        self.progress = tqdm(total=total, desc="calls", unit="call", file=sys.stderr,
                             disable=None if progress else True, mininterval=0.5)

    def catch_signals(self) -> None:
        """Ctrl-C and SIGTERM stop the sending and cancel the calls in flight.

        Not left to asyncio.run's cancellation of the main task alone: a layer below (the HTTP
        transport's cancel scopes) can absorb one cancellation, and the run then went on to the end
        and exited 0 after a Ctrl-C.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(signum, self._interrupt, signum)

    def release_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)

    def _interrupt(self, signum: int) -> None:
        if self.interrupted is None:
            self.interrupted = signum
            self.stop.append(signal.Signals(signum).name)
        for task in list(self.tasks):
            task.cancel()
        if self.on_interrupt is not None:
            self.on_interrupt()

    def track(self, coroutine: Any) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def allowed(self, start: float) -> bool:
        """No stop asked for, and every limit still allows another request."""
        elapsed = time.perf_counter() - start
        return not self.stop and self.behind is None and all(limit.allows(self.sent, elapsed) for limit in self.limits)

    def fall_behind(self, reason: str) -> None:
        """The schedule is hopeless: send nothing more (the calls in flight finish)."""
        if self.behind is None:
            self.behind = reason
            if self.on_behind is not None:
                self.on_behind(reason)

    def emit(self, record: dict[str, Any], item: PromptItem, write: bool = True) -> None:
        if self.redactor and record["error"] is not None:  # a server may echo the key in its error body
            record["error"] = self.redactor.text(record["error"])
        self.stats.add(record)
        if write and self.sink is not None:
            self.sink.write(orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
        if self.on_record is not None:
            self.on_record(record, item)

    async def one(self, index: int, item: PromptItem, due: float | None = None, slot_wait: float = 0.0,
                  history: Sequence[Message] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One call, and its record. ``due`` (perf_counter) is when an open loop scheduled it: how late it went
        is kept (``dispatch_delay_s``; of it ``slot_wait_s``, while the sending waited for a ``max_in_flight``
        slot, for this request or an earlier one), and so is the
        latency a user arriving on schedule would have seen (``latency_from_schedule_s``: from ``due`` to
        the answer, the coordinated-omission-free latency). ``history`` goes before the item's messages (a
        conversation's earlier turns); ``extra`` fields join the record (a session's id and turn)."""
        self.sent += 1
        late = None if due is None else time.perf_counter() - due
        record = await call_one(self.client, index, item, self.cache, self.identity, history)
        record.update(extra or {})
        if late is not None:
            record["scheduled_s"] = round(due - self.start, 6)  # seconds after the start it was due
            record["dispatch_delay_s"] = late
            record["slot_wait_s"] = slot_wait
            if record["error"] is None and not record.get("cached"):
                record["latency_from_schedule_s"] = time.perf_counter() - due
        self.ended_call(record, replace(item, messages=(*history, *item.messages)) if history else item)
        return record

    def ended_call(self, record: dict[str, Any], item: PromptItem) -> None:
        """A call's record, made here or by a worker process (``pikeclient.run.workers``): judged against
        the SLOs, written, counted, watched by the limits; an error no retry can fix may stop the run."""
        record["session"] = self.stats.start_time
        self.stats.slo_verdict(record)
        self.emit(record, item)
        self.ended += 1
        elapsed = time.perf_counter() - self.start
        for limit in self.limits:  # the over-saturation stop watches the calls end
            limit.observe(record, elapsed, self.sent - self.ended)
        self.progress.update(1)
        self.check_stop(record, item)

    def check_stop(self, record: dict[str, Any], item: PromptItem) -> None:
        kind = record["error_kind"]
        if kind == "auth" or (self.fail_fast and kind in NON_RETRYABLE):
            self.stop.append(f"{kind} error on prompt {item.id!r}: {record['error']}")

    async def closed_loop(self, take: Callable[[], Awaitable[tuple[int, PromptItem] | None]], workers: int,
                          start: float) -> None:
        """A fixed pool of workers takes prompts from one source (``take``: the next, or None at the end):
        no task per prompt, and a call's latency starts when the call starts, not while it waits for a
        free worker."""

        async def worker() -> None:
            while (entry := await take()) is not None:
                if not self.allowed(start):
                    return
                await self.one(*entry)

        await asyncio.gather(*(self.track(worker()) for _ in range(workers)))

    async def open_loop(self, schedule: AsyncIterator[tuple[tuple[int, PromptItem], float]], most: int,
                        start: float) -> None:
        """Requests go when they are due (``schedule``: each with its seconds after the start), whether or
        not earlier ones returned; ``most`` caps them in flight, and a request held back by the cap (or by
        a busy loop) records how late it went."""
        slots = self.in_flight or InFlight(most)

        async def send(index: int, item: PromptItem, due: float, slot_wait: float) -> None:
            try:
                await self.one(index, item, due, slot_wait)
            finally:
                slots.release()

        held: deque[tuple[float, float]] = deque()  # when the cap held the sending back (perf_counter spans)
        with Alarm() as alarm:
            async for (index, item), offset in schedule:
                due = start + offset
                await alarm.until(due)
                if not self.allowed(start):
                    break
                waiting = time.perf_counter()
                capped = slots.count >= slots.most  # every slot max_in_flight allows is taken: the server's
                await slots.acquire()  # a slot under max_in_flight, and under the client's limit while it lags
                now = time.perf_counter()
                behind = self.behind_judge.judge(now - due, now - start, capped)
                if behind is not None:
                    slots.release()
                    self.fall_behind(behind)
                    break
                held.append((waiting, now))
                while held and held[0][1] <= due:
                    held.popleft()
                # The part of this request's lateness during which the sending waited for a free slot, for it
                # or for an earlier request: the server holding the schedule back, not the client's loop.
                self.track(send(index, item, due, sum(max(0.0, end - max(begin, due)) for begin, end in held)))
        if self.tasks:
            await asyncio.gather(*self.tasks)


def taking(todo: Iterator[T]) -> Callable[[], Awaitable[T | None]]:
    """``todo``'s items one by one as a closed loop takes them (None at the end)."""
    async def take() -> T | None:
        return next(todo, None)
    return take


async def scheduled(pairs: Iterable[T]) -> AsyncIterator[T]:
    """A strategy's schedule (made as it is read) as an open loop reads it."""
    for pair in pairs:
        yield pair


async def warm_up(client: BaseLLMClient, prompts: Sequence[PromptItem], count: int, concurrency: int,
                  progress_bar: bool = True) -> int:
    """``count`` calls on the first prompts, as the run will make them, whose results are discarded.

    They pay for what only the first calls pay (connection set-up, a local model's first batch),
    so that no statistic describes it.
    """
    if count <= 0:
        return 0
    started = time.perf_counter()
    slots = asyncio.Semaphore(concurrency)
    log.info("warm-up: %d calls, not measured", count)
    progress = tqdm(total=count, desc="warm-up", unit="call", file=sys.stderr,
                    disable=None if progress_bar else True, mininterval=0.5)

    async def one(item: PromptItem) -> None:
        async with slots:
            with contextlib.suppress(LLMError):
                await client.achat(item.messages, **client.warmup_sampling)
            progress.update(1)

    try:
        await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(count)))
    finally:
        progress.close()
    log.info("warm-up: %d calls in %.2f s", count, time.perf_counter() - started)
    return count


async def call_one(client: BaseLLMClient, index: int, item: PromptItem, cache: ResponseCache | None = None,
                   identity: Mapping[str, Any] | None = None, history: Sequence[Message] = ()) -> dict[str, Any]:
    """One prompt's record: the answer with its measurements, or the error with its class. ``history`` (a
    conversation's earlier turns with their answers) is sent before the item's own messages."""
    # The id the call's HTTP requests carry (X-Request-Id): the call in the server's logs.
    record: dict[str, Any] = {"index": index, "id": item.id, "prompt": item.prompt, "start_time": time.time(),
                              "request_id": uuid.uuid4().hex}
    if item.repeat:
        record["repeat"] = item.repeat
    # A synthetic prompt asks for an exact output length: max_tokens, and min_tokens where enforced.
    overrides = item.sampling_overrides()
    if overrides:
        record["requested_output_tokens"] = item.max_tokens
    use_cache = cache is not None and cache.mode != "off"
    params = client.sampling.merged(overrides)
    # What a resume checks the answer against: the item's own request (a turn's history is the run's answers).
    record["request_digest"] = request_digest(item.messages, params)
    messages = (*history, *item.messages) if history else item.messages
    key = cache_key(identity or client.describe(), messages, params) if use_cache else None
    try:
        result = cache.get(key) if use_cache else None
        if result is None:
            with request_id(record["request_id"]):
                result = await client.achat(messages, **overrides)
            if use_cache:
                cache.put(key, result)
    except LLMError as error:
        return record_error(record, error)
    return record_answer(record, result)


def record_error(record: dict[str, Any], error: LLMError) -> dict[str, Any]:
    """Complete a call's ``record`` (index, id, prompt, start_time) with the error that ended it."""
    record.update(
        end_time=time.time(), response=None, finish_reason=None,
        usage={"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "source": "none"},
        latency_s=None, attempts=error.attempts, backoff_s=error.backoff_s, ttft_s=None,
        error=str(error), error_kind=error.kind,
    )
    return record


def record_answer(record: dict[str, Any], result: ChatResult) -> dict[str, Any]:
    """Complete a call's ``record`` with its answer and measurements (none for a cached answer)."""
    data = result.to_dict()
    record["end_time"] = time.time()
    record.update(response=data.pop("text"), **data, error=None, error_kind=None)
    if result.cached:  # an earlier answer: none of its timings or attempts belong to this run
        record.update(latency_s=None, ttft_s=None, itl_s=None, tpot_s=None, send_delay_s=None, connect_s=None,
                      attempts=0, backoff_s=0.0, throttle_s=0.0, output_tokens_per_s=None)
    else:
        tokens = result.usage.completion_tokens
        record["output_tokens_per_s"] = tokens / result.latency_s if tokens and result.latency_s > 0 else None
    return record
