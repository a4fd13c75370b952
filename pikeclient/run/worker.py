"""One worker of a multi-worker run (``load.workers``): its own event loop, client and connection pool,
making the calls its parent hands it, when the parent says they are due, and sending their records back.

A worker is a process (``python -m pikeclient.run.worker FD``, on a socket pair) or, with
``load.backend=ray``, a Ray actor that connects back to the parent over TCP (:mod:`pikeclient.run.workers`).
Both speak the same frames (a 4-byte length, then a pickle). From the parent:

- ``("setup", WorkerSetup)``: build the client; answered ``("ready", None)`` or ``("error", text)``;
- ``("warmup", count, concurrency)``: calls whose results are discarded; answered ``("warm", count)``;
- ``("go", start_epoch)``: the measured part begins (epoch seconds: the one clock all workers share);
- ``("work", [(index, offset), ...])``: prompts to call; ``offset`` is when the request is due, in seconds
  after the start (an open loop), or None (a closed loop: as soon as one of this worker's slots is free);
  with ``load=sessions``, conversations instead of prompts (``WorkerSetup.sessions``);
- ``("stop", reason)``: send nothing more, finish the calls in flight; ``("cancel",)``: cancel them too
  (Ctrl-C); ``("end",)``: no more work.

To the parent: ``("records", [record, ...], [a conversation's first turn, ...])`` as calls (and conversations) end,
every ``Worker.FLUSH_S`` at most, and at the end ``("done", report)``: the worker's event-loop lag, CPU
and in-flight limit.

The calls are the runner's own (``_Calls.one``, its open and closed loops): timing, dispatch delay
against the parent's schedule, retries and records are the same as in a one-process run. Ctrl-C in a
terminal reaches every process of the group: a worker ignores it, its parent decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pikeclient.run.dataset import PromptItem
from pikeclient.run.runner import _Calls
from pikeclient.run.wire import frame, receive, send

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to make its share of the calls."""

    number: int  # 0-based, for messages
    llm: dict[str, Any]  # the backend's arguments (resolved), as build_client takes them
    client_arguments: dict[str, dict[str, Any]]  # sampling, retry, rate_limit
    prompts: Sequence[PromptItem]  # the run's prompts, by index (pikeclient.run.workers.portable_prompts)
    open_loop: bool
    slots: int  # closed loop: this worker's share of the concurrency; open loop: of max_in_flight
    max_duration: float | None  # no request is sent later than this after the start
    fail_fast: bool
    stop_when_behind: bool
    cache_path: str
    cache_mode: str
    log_levels: dict[str, int] = field(default_factory=dict)  # the run's: logger name ("" the root) -> level
    # The variables the backend reads its key from (``llm.*_env``), as the run has them: a Ray actor on
    # another machine has its node's environment, not the run's.
    environment: dict[str, str] = field(default_factory=dict)
    # ``load=sessions`` (its Sessions strategy): the work is conversations, played turn by turn here
    # (``work`` entries ``((key, turn indices, most new turns or None, {index: earlier answer}), offset)``).
    sessions: Any = None


class Worker:
    """Serves one parent over one connection, from ``setup`` to ``done``."""

    LINGER_S = 30.0  # after ``done``, how long to wait for the parent to close the connection
    FLUSH_S = 0.01  # records go to the parent at most this often

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.outbox: list[dict[str, Any]] = []
        self.finished: list[int] = []  # conversations over since the last flush (load=sessions), by first turn
        self.flushing = False
        self.queue: asyncio.Queue[tuple[Any, float | None] | None] = asyncio.Queue()
        self.calls: Any = None  # the runner's _Calls, once set up
        self.listening: asyncio.Task | None = None

    async def serve(self) -> None:
        message = await receive(self.reader)
        if message is None or message[0] != "setup":
            return
        setup: WorkerSetup = message[1]
        os.environ.update(setup.environment)
        for name, level in setup.log_levels.items():  # as the run's own (Hydra's job_logging)
            logging.getLogger(name or None).setLevel(level)
        from pikeclient.config.factory import build_client
        from pikeclient.core.errors import PikeError
        from pikeclient.run.cache import ResponseCache
        from pikeclient.run.headroom import Behind, CpuMeter, InFlight, LoopLag, settle_heap
        from pikeclient.run.load import MaxDuration
        from pikeclient.run.runner import warm_up
        from pikeclient.run.stats import RunStats

        try:
            client = build_client(setup.llm, **setup.client_arguments)
            client.prepare()
            cache = ResponseCache(setup.cache_path, setup.cache_mode)
        except (PikeError, ValueError, OSError) as error:
            await send(self.writer, ("error", f"worker {setup.number}: {error}"))
            return
        try:
            settle_heap()  # here, not at "go": the calls start on the parent's clock
            await send(self.writer, ("ready", None))
            message = await receive(self.reader)
            while message is not None and message[0] == "warmup":
                count = await warm_up(client, setup.prompts, message[1], message[2], progress_bar=False)
                settle_heap()
                await send(self.writer, ("warm", count))
                message = await receive(self.reader)
            if message is None or message[0] != "go":
                return
            # The parent's start on this process's clock: both read the same epoch clock.
            start = time.perf_counter() - (time.time() - message[1])
            limits = [MaxDuration(setup.max_duration)] if setup.max_duration is not None else []
            calls = self.calls = _WorkerCalls(client, RunStats(), None, None, cache, setup.fail_fast, None, limits,
                                              0, progress=False)
            calls.outbox = self
            calls.start = start
            calls.behind_judge = Behind(setup.stop_when_behind)
            calls.on_behind = lambda reason: self.writer.write(frame(("behind", reason)))
            calls.in_flight = InFlight(setup.slots) if setup.open_loop else None
            lag = LoopLag(calls.in_flight)
            watcher = asyncio.create_task(lag.watch())
            cpu = CpuMeter()
            self.listening = asyncio.create_task(self.listen())
            try:
                if setup.sessions is not None:
                    await self.play(setup, calls, start)
                elif setup.open_loop:
                    await calls.open_loop(self.schedule(setup.prompts), setup.slots, start)
                else:
                    await calls.closed_loop(self.take(setup.prompts), setup.slots, start)
            except asyncio.CancelledError:
                if calls.interrupted is None:
                    raise
            watcher.cancel()
            self.flush()
            report = {"lags": lag.samples, "cpu_share": cpu.share(), "sent": calls.sent}
            if calls.in_flight is not None:
                report.update(lowest=calls.in_flight.lowest, held_s=calls.in_flight.held_s)
            await send(self.writer, ("done", report))
            # The parent closes the connection once it has read that: closing it here first could cut off
            # what it is still writing (a stop, more work) and, with it, its reading of this report.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.listening), self.LINGER_S)
        finally:
            if self.listening is not None:
                self.listening.cancel()
            with contextlib.suppress(Exception):
                await client.aclose()
            client.close()
            cache.close()

    def add(self, record: dict[str, Any]) -> None:
        """A call ended here: its record goes to the parent with the others that end within ``FLUSH_S``
        (at 1,000 calls a second a frame per call cost both processes a wake-up and a syscall each)."""
        self.outbox.append(record)
        self._flush_soon()

    def conversation_ended(self, conversation: Any) -> None:
        """A conversation is over (played to its end, ended by an error, or stopped): the parent's to know,
        after its records."""
        self.finished.append(conversation.turns[0][0])
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.outbox or self.finished:
            self.writer.write(frame(("records", self.outbox, self.finished)))
            self.outbox, self.finished = [], []

    async def play(self, setup: WorkerSetup, calls: _WorkerCalls, start: float) -> None:
        """``load=sessions``: the conversations the parent hands out, as one process plays them
        (``pikeclient.run.sessions``): users taking one after another, or each begun at its time."""
        from pikeclient.run.sessions import Conversation, Player, play_arrivals, play_users

        done: dict[int, dict[str, Any]] = {}  # a resumed conversation's earlier answers: its history
        player = Player(calls, done, setup.sessions, start, on_end=self.conversation_ended)

        def unpack(entry: tuple) -> tuple[Conversation, float]:
            (key, indices, most, answered), offset = entry
            done.update({index: {"response": response} for index, response in answered.items()})
            return Conversation(key, [(index, setup.prompts[index]) for index in indices], most), offset

        if setup.sessions.rate is not None:
            async def arrivals() -> AsyncIterator[tuple[Conversation, float]]:
                while (entry := await self.queue.get()) is not None:
                    yield unpack(entry)

            await play_arrivals(calls, player, arrivals(), setup.slots, start)
        else:
            async def take() -> Conversation | None:
                entry = await self.queue.get()
                if entry is None:
                    self.queue.put_nowait(None)  # the other users see the end too
                    return None
                return unpack(entry)[0]

            await play_users(calls, player, take, setup.slots, start)

    async def listen(self) -> None:
        """The parent's messages while the calls run: more work, a stop, a cancel, the end."""
        while True:
            message = await receive(self.reader)
            kind = message[0] if message is not None else "cancel"  # the parent is gone: stop everything
            if kind == "work":
                for entry in message[1]:
                    self.queue.put_nowait(entry)
            elif kind == "stop":
                self.calls.stop.append(message[1])
                self.queue.put_nowait(None)
            elif kind == "cancel":
                self.calls.stop.append("cancelled")
                self.calls.interrupted = signal.SIGINT
                for task in list(self.calls.tasks):
                    task.cancel()
                self.queue.put_nowait(None)
            elif kind == "end":
                self.queue.put_nowait(None)
            if message is None:
                return

    async def schedule(self, prompts: Sequence[PromptItem]) -> AsyncIterator[tuple[tuple[int, PromptItem], float]]:
        while (entry := await self.queue.get()) is not None:
            yield (entry[0], prompts[entry[0]]), entry[1]

    def take(self, prompts: Sequence[PromptItem]):
        async def next_prompt() -> tuple[int, PromptItem] | None:
            entry = await self.queue.get()
            if entry is None:
                self.queue.put_nowait(None)  # the other slots see the end too
                return None
            return entry[0], prompts[entry[0]]
        return next_prompt


class _WorkerCalls(_Calls):
    """The runner's calls, whose records go to the parent (which keeps the statistics and the records file)."""

    outbox: Worker

    def ended_call(self, record: dict[str, Any], item: PromptItem) -> None:
        self.outbox.add(record)
        self.check_stop(record, item)  # stop at once; the parent tells the other workers


async def serve_socket(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await Worker(reader, writer).serve()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def main(argv: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it says how the calls end
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(sock.fileno(), False)
    asyncio.run(serve_socket(sock))


if __name__ == "__main__":
    main(sys.argv[1:])
