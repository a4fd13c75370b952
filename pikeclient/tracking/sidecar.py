"""The experiment's side of tracking: MLflow runs in a separate process, fed through a pipe.

The experiment process never imports mlflow. Importing it (~1.5 s of CPU) happens while the
experiment loads its prompts and client; opening the store (~0.8 s) happens in parallel, and the calls'
series and traces are written there at idle CPU priority while the calls run (see
``pikeclient.tracking.process.Background``), so tracking adds no GIL pauses to the latencies being
measured and takes no CPU a call wants. Messages go out through a thread of this process, never
holding up its event loop. When the experiment process
dies (even by SIGKILL), the sidecar sees its pipe close and marks the run KILLED.
"""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pikeclient.core.errors import ConfigError

log = logging.getLogger(__name__)

OPEN_WAIT_S = 30.0  # how long ``open_run`` waits for the run's creation before the calls start anyway
SEND_BATCH = 64  # calls per pipe message: fewer syscalls and pickles, still near-live in the UI
# What the tracking process cost, logged in the run (CPU seconds, user + system): in all, from its start
# (importing MLflow, opening the store) to the run's end; and of that, logging the calls (series, traces).
METRIC_CPU = "tracking/cpu_s"
METRIC_CALLS_CPU = "tracking/calls_cpu_s"


@dataclass(frozen=True)
class Finished:
    """A run the tracking process has completed, and what that process cost: CPU seconds (user + system)
    from its start (importing MLflow, opening the store) to the run's end, and of them the seconds spent
    logging the calls (series, traces). Its CPU is not the experiment process's: add it for the client's."""

    run_id: str
    cpu_s: float
    calls_cpu_s: float


class TrackingSidecar:
    """Starts the tracking process: ``start`` (store and experiment), ``wait_ready``, ``begin`` the run,
    ``add`` each call, then ``finish`` or ``end`` it."""

    def __init__(self, *, ready_timeout: float = 120.0) -> None:
        # A plain subprocess on a socketpair: unlike multiprocessing's spawn it does not re-import the
        # caller's __main__ (which fails for stdin scripts and notebooks); fork after threads is unsafe.
        # It imports MLflow at once, then waits for ``start``: nothing is written before that.
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "pikeclient.tracking.process", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready_timeout = ready_timeout
        self.started = False
        self.ready = False
        self.tracking_uri = ""
        self.run_id: str | None = None
        self.begun = False
        self.failed: ConfigError | None = None  # what the tracking process answered to open_run instead of a run
        self.pending: list[tuple[dict[str, Any], Any]] = []
        self.closed = False
        # The calls go out through a thread of their own: the tracking process writes in batches, at idle
        # priority, so its socket may be full a while; the experiment's event loop must never wait for it
        # (a blocked send made every request due then late). Every other message is sent at once, after
        # the calls queued before it, so that a process killed right after still told it (``begin``).
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.send_error: BaseException | None = None
        self.sender = threading.Thread(target=self._send_all, name="tracking-sender", daemon=True)
        self.sender.start()

    def start(self, setup: Mapping[str, Any]) -> None:
        """Open the store and the experiment described by ``setup``; the run itself comes with ``begin``."""
        self._send(("setup", dict(setup)))
        self.started = True
        self.tracking_uri = str(setup["tracking_uri"])

    def wait_ready(self) -> None:
        """Wait until the store and experiment are usable; raises ConfigError with the reason if not."""
        if self.ready:
            return
        if not self.conn.poll(self.ready_timeout):
            raise ConfigError(f"tracking did not start within {self.ready_timeout:.0f} s")
        self._expect("ready")
        self.ready = True

    def open_run(self) -> None:
        """Create (or, resuming, reopen) the run now, before the measured part, and wait until it exists
        (at most ``OPEN_WAIT_S``): its params and dataset are written while no call is being timed (at the
        calls' start they delayed an open loop's sends by up to 50 ms). MLflow's start time is this moment.
        A tracking server slower than that does not hold up the calls: the run is then awaited as they go.
        Nor does one that fails now (gone past ``tracking.reconnect_timeout`` while the run was being set up):
        the calls go on, as when it fails later, and ``finish`` raises its error."""
        self.begin(time.time())
        if self.run_id is None and self.conn.poll(OPEN_WAIT_S):
            try:
                self._expect("run")
            except ConfigError as error:
                self.failed = error
                log.warning("MLflow: %s; the calls go on (records on disk), the job fails after them", error)
                return
        if self.run_id is None:
            log.warning("MLflow: the run is not created yet after %.0f s; the calls go on meanwhile", OPEN_WAIT_S)

    def begin(self, start_time: float) -> None:
        """The measured part begins: create (or, resuming, reopen) the run with this start time, unless
        ``open_run`` did already."""
        if self.begun:
            return
        self.begun = True
        self._send(("begin", int(start_time * 1000)))

    def add(self, record: Mapping[str, Any], item: Any) -> None:
        """Queue one finished call; raises ConfigError if the tracking process stopped."""
        self.pending.append((dict(record), list(item.messages)))
        if len(self.pending) >= SEND_BATCH:
            self._flush()
        if self.run_id is None and self.failed is None and self.conn.poll():
            self._expect("run")

    def assess(self, calls: list[tuple[Any, ...]]) -> None:
        """The calls' scores and expectations, to attach to their traces when the run finishes
        (``pikeclient.run.quality``: prompt id, repeat, start time, scores, expectations)."""
        self._flush()
        self._send(("assessments", calls))

    def finish(self, metrics: Mapping[str, float], tags: Mapping[str, str], end_time: float, records_path: Path,
               output_dir: Path, *, log_records: bool, status: str = "FINISHED") -> Finished:
        """Log the run's results and end it (FINISHED, or FAILED for a run with too many errors); returns
        the run's id and what the tracking process cost (also logged in the run: METRIC_CPU, METRIC_CALLS_CPU)."""
        if self.failed is not None:  # the tracking process has stopped logging (it reads on, to the end)
            self._close()
            raise self.failed
        self._flush()
        self._send(("finish", dict(metrics), dict(tags), int(end_time * 1000), str(records_path), str(output_dir),
                    log_records, status))
        if self.run_id is None:
            self._expect("run")
        done = self._expect("done")  # every call, trace and artifact is in the store and the run has ended
        self._close()  # and the process has exited: its CPU is over when the command returns
        assert self.run_id is not None
        return Finished(self.run_id, done[METRIC_CPU], done[METRIC_CALLS_CPU])

    def end(self, status: str) -> None:
        """End the run as FAILED or KILLED (what was logged so far stays); before ``start``, just stop."""
        if self.closed:
            return
        if not self.started:  # no run exists yet: stop the process (it may still be importing MLflow)
            self.process.terminate()
            self._close()
            return
        try:
            self._flush()
            self._send(("end", status))
        except ConfigError:
            pass
        self._close()
        if self.send_error is not None:  # the tracking process died: end its run from a fresh one
            self._end_from_outside(status)

    def _end_from_outside(self, status: str) -> None:
        if self.run_id is None:
            return  # never created, or the next process using the store marks it KILLED (owner gone)
        command = [sys.executable, "-m", "pikeclient.tracking.process", "end", self.tracking_uri, self.run_id, status]
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=True)
        except (subprocess.SubprocessError, OSError):
            log.warning("could not mark MLflow run %s %s", self.run_id, status)

    def _flush(self) -> None:
        if self.pending:
            self._check_sent()
            self.outbox.put(("calls", self.pending))
            self.pending = []

    def _send(self, message: tuple) -> None:
        """``message`` sent now, after the calls queued before it."""
        sent = threading.Event()
        self.outbox.put(sent)
        sent.wait()  # the sender has sent everything before it, and sends nothing until more is queued
        self._check_sent()
        try:
            self.conn.send(message)
        except (OSError, BrokenPipeError) as error:
            self.send_error = error
            self._check_sent()

    def _check_sent(self) -> None:
        if self.send_error is not None:
            raise ConfigError(f"the tracking process stopped: {self._exit_reason()}") from self.send_error

    def _send_all(self) -> None:
        while (message := self.outbox.get()) is not None:
            if isinstance(message, threading.Event):
                message.set()
            elif self.send_error is None:  # after a failure, what is left is dropped
                try:
                    self.conn.send(message)
                except (OSError, BrokenPipeError) as error:
                    self.send_error = error

    def _expect(self, expected: str) -> Any:
        kind, value = self._recv()
        if kind == "error":
            raise ConfigError(f"tracking: {value}")
        if kind != expected:
            raise ConfigError(f"tracking: unexpected answer {kind!r}")
        if kind == "run":
            self.run_id = value
            log.info("MLflow run %s", value)
        return value

    def _recv(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except EOFError as error:
            raise ConfigError(f"the tracking process stopped: {self._exit_reason()}") from error

    def _exit_reason(self) -> str:
        try:
            return f"exit code {self.process.wait(5)}"
        except subprocess.TimeoutExpired:
            return "no answer"

    def _close(self, wait: bool = True) -> None:
        self.closed = True
        self.outbox.put(None)  # what is queued is sent first
        self.sender.join(60)
        self.conn.close()
        if not wait:
            return  # subprocess reaps it once it has exited
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
