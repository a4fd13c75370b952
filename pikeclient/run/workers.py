"""More than one core: the calls of one run made by N workers under one schedule (``load.workers``).

One process's event loop caps what a client can send (about 800 plain calls a second here; past that
it measures itself). With ``load.workers=N`` the run's process keeps the schedule, the records file, the
statistics, the limits and the MLflow run; N workers (:mod:`pikeclient.run.worker`), each with its own
event loop, client and connection pool, make the calls:

- open loop (``constant``, ``poisson``, ``replay``): this process walks the schedule and hands each
  request, with the time it is due, to each worker in turn (``_next_link``), a little ahead of time
  (``LOOKAHEAD_S``); the worker sends it when it is due and measures its dispatch delay against that
  same schedule; ``max_in_flight`` is split between the workers;
- closed loop (``concurrency``): the concurrency is split between the workers, each kept supplied with
  prompts so that none waits for this process between calls;
- conversations (``sessions``): each conversation goes to one worker, which plays its turns in order
  (each with the answers before it); the users, or the sessions a rate starts, are split between the
  workers as calls are above. The records' history (a trace's messages) is rebuilt here from the
  answers that come back.

Every prompt goes to one worker once; records come back as calls end and are written, judged against
the SLOs and counted here, as in a one-process run, so resume, limits, the over-saturation stop,
``fail_fast`` and Ctrl-C (the workers are told to cancel; what ended is written) mean what they mean
there. ``load.backend=ray`` runs the same workers as Ray actors (:mod:`pikeclient.run.ray_workers`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pikeclient.core.errors import ConfigError, PikeError
from pikeclient.run.dataset import PromptItem, Repeated
from pikeclient.run.wire import frame, receive

if TYPE_CHECKING:
    from pikeclient.run.cache import ResponseCache
    from pikeclient.run.load import Limit, Strategy
    from pikeclient.run.runner import _Calls
    from pikeclient.run.shapes.sessions import Sessions
    from pikeclient.run.stats import RunStats

log = logging.getLogger(__name__)

WORKER_SETTINGS = ("workers", "backend", "ray_address")
BACKENDS = ("processes", "ray")
# What one worker's event loop sends comfortably (well under the ~800/s it saturates at): the automatic
# choice adds a worker per this much of an open loop's rate, or per this many calls in flight.
RATE_PER_WORKER = 400.0
CONCURRENCY_PER_WORKER = 64


class WorkerFailed(PikeError):
    """A worker could not start (its client failed to build) or stopped answering."""


def check_workers(load: Any) -> None:
    """``load.workers``, ``load.backend`` and ``load.ray_address``, before anything starts."""
    if load.workers is not None and load.workers < 1:
        raise ConfigError(f"load.workers={load.workers} is out of range: allowed >= 1 (null: as the load needs)")
    if load.backend not in BACKENDS:
        raise ConfigError(f"load.backend={load.backend!r}: allowed {', '.join(BACKENDS)}")
    if load.ray_address is not None and load.backend != "ray":
        raise ConfigError(f"load.ray_address={load.ray_address} applies to load.backend=ray, not {load.backend}")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_workers(setting: int | None, backend: str, strategy: Strategy, computes_locally: bool) -> int:
    """How many workers a run uses: ``load.workers`` when set; else what the machine and the load need.

    Automatic: one (the run's own process) for a local model (its work is the model's, not the client's),
    for conversations, or on one core; otherwise one more per ``RATE_PER_WORKER`` requests/s an open loop
    asks for, or per ``CONCURRENCY_PER_WORKER`` calls a closed loop keeps in flight, up to the cores
    this process may use (Ray: the same count, placed by the cluster)."""
    if setting is not None:
        return setting
    if computes_locally or getattr(strategy, "sessions", False):
        return 1
    cores = usable_cores()
    rate = getattr(strategy, "rate", None)
    if strategy.open_loop:
        wanted = math.ceil(rate / RATE_PER_WORKER) if rate else 1
    else:
        wanted = math.ceil(strategy.max_in_flight / CONCURRENCY_PER_WORKER)
    return max(1, min(wanted, cores))


@dataclass(frozen=True)
class WorkerPlan:
    """What the workers of a run are built from: their count and where they run, and the client's config."""

    count: int
    llm: dict[str, Any]
    client_arguments: dict[str, dict[str, Any]]
    cache_path: str = ""
    cache_mode: str = "off"
    backend: str = "processes"
    ray_address: str | None = None


def shares(total: int, count: int) -> list[int]:
    """``total`` split as evenly as it goes into ``count`` parts (none empty: fewer parts if need be)."""
    count = max(1, min(count, total))
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


@dataclass
class _Link:
    """The parent's end of one worker: its connection, its share, what it has been handed."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    slots: int
    handle: Any = None  # the process (subprocess.Popen) or Ray actor
    outstanding: int = 0  # handed to it and not yet come back as records
    pending: list[tuple[int, float | None]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    ended: bool = False

    def give(self, index: int, offset: float | None) -> None:
        self.pending.append((index, offset))
        self.outstanding += 1

    def flush(self) -> None:
        if self.pending:
            self.post(("work", self.pending))
            self.pending = []

    def post(self, message: tuple) -> None:
        """A message, written now (the connection buffers it; a worker gone is noticed by its reader)."""
        if not self.writer.is_closing():
            self.writer.write(frame(message))

    def exit_reason(self) -> str:
        if isinstance(self.handle, subprocess.Popen):
            code = self.handle.poll()
            return "still running" if code is None else f"exit code {code}"
        return "its connection closed"


class WorkerPool:
    """The workers of one run: started, warmed up, handed the calls, reported, stopped."""

    LOOKAHEAD_S = 0.05  # an open loop's requests reach their worker this long before they are due
    TICK_S = 0.01  # the schedule is handed out at most this often
    BEHIND = 256  # an open loop skips a worker with this many more calls out than the least busy one
    KILL_AFTER_S = 15.0  # after Ctrl-C, a worker that has not reported by then is killed

    def __init__(self, links: list[_Link], plan: WorkerPlan, prompts: Sequence[PromptItem], open_loop: bool,
                 limits: Sequence[Limit], sessions: Sessions | None = None) -> None:
        self.links, self.plan, self.prompts, self.open_loop, self.limits = links, plan, prompts, open_loop, limits
        self.sessions = sessions  # load=sessions: the work handed out is conversations
        self.scheduled = open_loop or (sessions is not None and sessions.rate is not None)  # handed out on time
        self.done: Mapping[int, dict[str, Any]] = {}  # a resumed run's earlier answers
        self.playing: dict[int, _Playing] = {}  # conversations handed out and not over, by their first turn
        self.conversation_of: dict[int, int] = {}  # a turn handed out -> its conversation's first turn
        self.calls: _Calls | None = None
        self.start = 0.0
        self.todo: Iterator[tuple[int, PromptItem]] = iter(())
        self.exhausted = False
        self.stopped = False
        self.turn = -1  # the worker an open loop handed its last request to
        self.closer: Any = None  # Ray: what ends the actors

    @classmethod
    async def start(cls, plan: WorkerPlan, prompts: Sequence[PromptItem], strategy: Strategy,
                    cache: ResponseCache | None, fail_fast: bool, limits: Sequence[Limit],
                    stop_when_behind: bool = True) -> WorkerPool:
        """``plan.count`` workers, each set up with the run's prompts and its share of the slots, ready."""
        from pikeclient.run.load import MaxDuration
        from pikeclient.run.worker import WorkerSetup

        slots = shares(strategy.max_in_flight, plan.count)
        max_duration = next((limit.seconds for limit in limits if isinstance(limit, MaxDuration)), None)
        if plan.backend == "ray":
            from pikeclient.run.ray_workers import connect_ray_workers

            connections, closer = await connect_ray_workers(plan, len(slots))
        else:
            connections, closer = await spawn_processes(len(slots)), None
        links = [_Link(number, reader, writer, share, handle)
                 for number, ((reader, writer, handle), share) in enumerate(zip(connections, slots))]
        sessions = strategy if getattr(strategy, "sessions", False) else None
        pool = cls(links, plan, prompts, strategy.open_loop, limits, sessions)
        pool.closer = closer
        portable = portable_prompts(prompts)
        try:
            for link in links:
                link.post(("setup", WorkerSetup(
                    number=link.number, llm=plan.llm, client_arguments=plan.client_arguments, prompts=portable,
                    open_loop=strategy.open_loop, slots=link.slots, max_duration=max_duration, fail_fast=fail_fast,
                    stop_when_behind=stop_when_behind,
                    cache_path=plan.cache_path, cache_mode=plan.cache_mode,
                    log_levels=log_levels(), environment=key_variables(plan.llm), sessions=sessions)))
            for link in links:
                answer = await receive(link.reader)
                if answer is None:
                    raise WorkerFailed(f"worker {link.number} stopped while starting ({link.exit_reason()})")
                if answer[0] == "error":
                    raise WorkerFailed(answer[1])
        except BaseException:
            await pool.close()
            raise
        log.info("workers: %s", pool.describe())
        return pool

    def describe(self) -> str:
        where = "Ray actors" if self.plan.backend == "ray" else "processes"
        return f"{len(self.links)} worker {where} ({' + '.join(str(link.slots) for link in self.links)} slots)"

    async def warm_up(self, count: int) -> int:
        """``count`` warm-up calls split between the workers: each opens its own connections."""
        if count <= 0:
            return 0
        parts = shares(count, len(self.links))
        for link, part in zip(self.links, parts):
            link.post(("warmup", part, link.slots))
        done = 0
        for link, _part in zip(self.links, parts):
            answer = await receive(link.reader)
            if answer is None or answer[0] != "warm":
                raise WorkerFailed(f"worker {link.number} stopped during the warm-up ({link.exit_reason()})")
            done += answer[1]
        return done

    async def run(self, calls: _Calls, todo: Iterator[tuple[int, PromptItem]], strategy: Strategy, start: float,
                  start_epoch: float, done: Mapping[int, dict[str, Any]] | None = None) -> None:
        """Hand out ``todo`` under ``strategy`` until it is done, stopped or interrupted (with ``load=sessions``,
        the conversations not answered in ``done``); every record that comes back goes through ``calls``
        (written, counted, watched by the limits)."""
        self.calls, self.start, self.done = calls, start, done or {}
        work: Iterator[Any] = todo
        if self.sessions is not None:
            from pikeclient.run.sessions import conversations

            work = (c for c in conversations(self.prompts) if not all(i in self.done for i, _ in c.turns))
        self.todo = work
        calls.on_interrupt = self.cancel
        for link in self.links:
            link.post(("go", start_epoch))
        readers = [asyncio.create_task(self._read(link)) for link in self.links]
        if self.scheduled:
            schedule = zip(work, self.sessions.arrivals()) if self.sessions is not None else strategy.schedule(work)
            handing = calls.track(self._hand_out(schedule))
            await asyncio.wait([handing])  # cancelled by Ctrl-C: the records still come in below
            if not handing.cancelled() and handing.exception() is not None:
                self.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                raise handing.exception()
        else:
            for link in self.links:
                self._top_up(link)
        await asyncio.gather(*readers)

    async def _hand_out(self, pairs: Iterable[tuple[Any, float]]) -> None:
        """An open loop's schedule (or a rate's sessions), each to the next worker ``LOOKAHEAD_S`` before it
        is due."""
        calls = self.calls
        for entry, offset in pairs:
            if self._stopping() or not all(limit.allows(calls.sent, offset) for limit in calls.limits):
                break
            ahead = self.start + offset - self.LOOKAHEAD_S - time.perf_counter()
            if ahead > 0:
                self._flush_all()
                await asyncio.sleep(max(ahead, self.TICK_S))
                if self._stopping():
                    break
            if not self._give(self._next_link(), entry, offset):
                break
        self._flush_all()
        self._end_all()

    def _give(self, link: _Link, entry: Any, offset: float | None) -> bool:
        """A prompt ``(index, item)``, or a conversation, to ``link``; False if the limits leave it no call."""
        calls = self.calls
        if self.sessions is None:
            link.give(entry[0], offset)
            calls.sent += 1
            return True
        # A conversation's unanswered turns are counted as sent when handed out, as many as the limits let
        # go (a worker sends no more of them); those never sent are taken back when it is over.
        unanswered = sum(1 for index, _ in entry.turns if index not in self.done)
        elapsed, most = time.perf_counter() - self.start, 0
        while most < unanswered and all(limit.allows(calls.sent + most, elapsed) for limit in calls.limits):
            most += 1
        if most == 0:
            return False
        answered = {index: self.done[index]["response"] for index, _ in entry.turns if index in self.done}
        indices = [index for index, _ in entry.turns]
        self.playing[indices[0]] = _Playing(entry.turns, most, dict(answered))
        self.conversation_of.update((index, indices[0]) for index in indices)
        link.give((entry.key, indices, most if most < unanswered else None, answered), offset)
        calls.sent += most
        return True

    def _next_link(self) -> _Link:
        """An open loop's next worker: each in turn, so that each sends an even share of the schedule (the
        one with the fewest calls out took every request while the other's records were on their way,
        then sent at twice its share); one far behind the others (``BEHIND`` calls more out) is skipped."""
        self.turn = (self.turn + 1) % len(self.links)
        link = self.links[self.turn]
        fewest = min(self.links, key=_outstanding)
        return fewest if link.outstanding - fewest.outstanding > self.BEHIND else link

    def _top_up(self, link: _Link) -> None:
        """A closed loop: keep ``link`` supplied (its slots busy and as many prompts queued behind them;
        with ``load=sessions``, a conversation for each of its users)."""
        calls = self.calls
        # A conversation lasts many calls: one each per user, or the first worker would queue them all.
        want = link.slots if self.sessions is not None else 2 * link.slots
        while not self.exhausted and link.outstanding < want:
            entry = next(self.todo, None) if calls.allowed(self.start) else None
            if entry is None or not self._give(link, entry, None):
                self.exhausted = True
                break
        link.flush()
        if self.exhausted:
            self._end_all()

    async def _read(self, link: _Link) -> None:
        calls = self.calls
        while True:
            message = await receive(link.reader)
            if message is None:
                if link.report is None and not calls.interrupted:
                    reason = f"worker {link.number} stopped ({link.exit_reason()})"
                    log.error("%s: its calls in flight are lost (a resume makes them)", reason)
                    calls.stop.append(reason)
                    self._stop_all(reason)
                return
            if message[0] == "records":
                for record in message[1]:
                    item = self.prompts[record["index"]]
                    if self.sessions is None:
                        link.outstanding -= 1
                    else:
                        item = self._in_conversation(record, item)
                    calls.ended_call(record, item)
                for first in message[2]:  # conversations over (load=sessions), by their first turn
                    link.outstanding -= 1
                    self._conversation_over(first)
                if self._stopping():
                    self._stop_all(self._stopping())
                elif not self.scheduled:
                    self._top_up(link)
            elif message[0] == "behind":  # a worker could not keep to the schedule: none of them can
                if calls.behind is None:
                    calls.behind = message[1]
                self._stop_all(message[1])
            elif message[0] == "done":
                link.report = message[1]
                link.writer.close()  # the worker waits for this to exit
                return

    def _in_conversation(self, record: dict[str, Any], item: PromptItem) -> PromptItem:
        """A turn's item as its worker sent it: after the conversation's earlier turns and their answers."""
        playing = self.playing[self.conversation_of[record["index"]]]
        history: list[Any] = []
        for position, (index, turn) in enumerate(playing.turns):
            if index == record["index"]:
                if record["error"] is not None:
                    playing.failed_at = position
                break
            history += [*turn.messages, {"role": "assistant", "content": playing.answers.get(index)}]
        playing.answers[record["index"]] = record["response"]
        playing.received += 1
        return replace(item, messages=(*history, *item.messages)) if history else item

    def _conversation_over(self, first: int) -> None:
        """Its turns handed out and never sent are taken back (as a one-process run never counted them);
        after a failed turn, those after it are counted as not sent."""
        playing = self.playing.pop(first)
        for index, _ in playing.turns:
            self.conversation_of.pop(index, None)
        self.calls.sent -= playing.handed - playing.received
        if playing.failed_at is not None:
            self.calls.stats.turns.not_sent += len(playing.turns) - playing.failed_at - 1

    def _stopping(self) -> str | None:
        """Why the sending must stop (an error no retry fixes, Ctrl-C, the over-saturation stop), or None."""
        if self.calls.stop:
            return self.calls.stop[0]
        if self.calls.behind:
            return self.calls.behind
        return next((limit.reason for limit in self.limits if getattr(limit, "reason", None)), None)

    def _stop_all(self, reason: str) -> None:
        if not self.stopped:
            self.stopped = self.exhausted = True
            for link in self.links:
                link.post(("stop", reason))

    def _flush_all(self) -> None:
        for link in self.links:
            link.flush()

    def _end_all(self) -> None:
        for link in self.links:
            if not link.ended:
                link.ended = True
                link.flush()
                link.post(("end",))

    def cancel(self) -> None:
        """Ctrl-C or SIGTERM: the workers cancel their calls in flight and report what ended."""
        self.exhausted = self.stopped = True
        for link in self.links:
            link.post(("cancel",))
        asyncio.get_running_loop().call_later(self.KILL_AFTER_S, self._kill)

    def _kill(self) -> None:
        for link in self.links:
            if link.report is None:
                log.warning("worker %d did not stop after Ctrl-C: killed", link.number)
                if isinstance(link.handle, subprocess.Popen):
                    link.handle.kill()
                link.writer.close()

    def report_into(self, stats: RunStats) -> None:
        """The workers' event-loop lag, CPU and in-flight limits: theirs timed the calls."""
        reports = [link.report for link in self.links if link.report is not None]
        stats.workers = len(self.links)
        if not reports:
            return
        stats.loop_lags = [lag for report in reports for lag in report["lags"]]
        stats.client_cpu_share = max([stats.client_cpu_share or 0.0] + [r["cpu_share"] for r in reports])
        if self.open_loop:
            stats.in_flight_lowest = sum(r.get("lowest", 0) for r in reports)
            stats.client_held_s = max(r.get("held_s", 0.0) for r in reports)

    async def close(self) -> None:
        """Every worker stopped: processes waited for (killed if they do not exit), Ray actors ended."""
        for link in self.links:
            link.writer.close()
        loop = asyncio.get_running_loop()
        for link in self.links:
            if isinstance(link.handle, subprocess.Popen):
                try:
                    await loop.run_in_executor(None, link.handle.wait, 10)
                except subprocess.TimeoutExpired:
                    link.handle.kill()
                    link.handle.wait()
        if self.closer is not None:
            await loop.run_in_executor(None, self.closer)


@dataclass
class _Playing:
    """A conversation handed to a worker: its turns, how many new ones it may send, the answers so far."""

    turns: list[tuple[int, PromptItem]]
    handed: int
    answers: dict[int, str | None]
    received: int = 0
    failed_at: int | None = None  # the position of the turn that failed and ended it


def portable_prompts(prompts: Sequence[PromptItem]) -> Sequence[PromptItem]:
    """The prompts as a worker needs them: without their expectations (answers are scored here), and
    repeats still made on demand (a million repeats of ten prompts are ten prompts to send)."""
    if isinstance(prompts, Repeated):
        return Repeated([replace(item, expectations=None) for item in prompts.items], prompts.repeats)
    return [replace(item, expectations=None) for item in prompts]


def key_variables(llm: dict[str, Any]) -> dict[str, str]:
    """The environment variables the backend reads its credentials from (``llm.api_key_env`` and the
    like), with this process's values."""
    names = [value for key, value in llm.items() if key.endswith("_env") and isinstance(value, str)]
    return {name: os.environ[name] for name in names if name in os.environ}


def log_levels() -> dict[str, int]:
    """This process's logging levels, by logger, for its workers to log as it does."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _outstanding(link: _Link) -> int:
    return link.outstanding


async def spawn_processes(count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]]:
    """``count`` worker processes, each on a socket pair (no re-import of the caller's ``__main__``, as
    multiprocessing's spawn does, and no fork of a process with threads)."""
    connections = []
    for _ in range(count):
        ours, theirs = socket.socketpair()
        process = subprocess.Popen([sys.executable, "-m", "pikeclient.run.worker", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        connections.append((reader, writer, process))
    return connections

