"""A command's whole process tree, measured: CPU seconds (user + system of every process in it), the
command's own wall time, and the wall time until its last descendant ended.

A process that outlives its parent (a tracking process left working after ``run.py`` returned, a load
tool's worker) is reparented to init and its CPU never reaches ``getrusage(RUSAGE_CHILDREN)`` of the
caller. So the command runs under a small wrapper that makes itself a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``): such orphans come back to the wrapper, which waits for every one of
them before it exits, and the caller's RUSAGE_CHILDREN then holds the whole tree. The wrapper's own start
(a bare Python) is the same in every run, so a long-minus-short difference cancels it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
report, linger, log = sys.argv[1], float(sys.argv[2]), open(sys.argv[3], "ab")
started_at, start = time.time(), time.perf_counter()
code = subprocess.call(sys.argv[4:], stdout=log, stderr=subprocess.STDOUT)
command_s = time.perf_counter() - start
killed = []
deadline = time.monotonic() + linger
while True:  # orphans of the command are ours now: wait for each to end
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        continue
    if time.monotonic() > deadline:  # still running: name them and stop them (we started them)
        me = os.getpid()
        for child in open(f"/proc/{me}/task/{me}/children").read().split():
            killed.append(open(f"/proc/{child}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:200])
            os.kill(int(child), signal.SIGKILL)
        deadline = float("inf")
    time.sleep(0.01)
tree_s = time.perf_counter() - start
json.dump({"code": code, "started_at": started_at, "command_s": command_s, "tree_s": tree_s, "killed": killed},
          open(report, "w"))
"""


@dataclass(frozen=True)
class TreeRun:
    cpu_s: float  # user + system of the whole tree
    started_at: float  # epoch seconds, when the command was started
    command_s: float  # until the command itself returned
    tree_s: float  # until its last descendant ended
    killed: tuple[str, ...]  # descendants still running ``linger`` seconds after the command returned


class CommandFailed(RuntimeError):
    pass


def run_tree(command: list[str], env: dict[str, str], cwd: Path, *, linger: float = 120.0,
             timeout: float | None = None) -> TreeRun:
    """Run ``command`` to its end and every process it started to theirs; raise CommandFailed (with the
    end of its output) when it exits non-zero or runs past ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="proctree-") as tmp:
        report, log = Path(tmp) / "report.json", Path(tmp) / "output.log"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(report), str(linger), str(log), *command],
                                   env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group, to stop on a timeout
        try:
            wrapper.wait(timeout)
        except subprocess.TimeoutExpired as error:
            os.killpg(wrapper.pid, signal.SIGKILL)  # the group of the wrapper we started, and all it started
            wrapper.wait()
            raise CommandFailed(f"ran past {timeout:g} s: {tail(log)}") from error
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if not report.exists():
            raise CommandFailed(f"the wrapper ended without a report: {tail(log)}")
        result = json.loads(report.read_text())
        if result["code"]:
            raise CommandFailed(f"exit code {result['code']}: {tail(log)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return TreeRun(cpu, result["started_at"], result["command_s"], result["tree_s"], tuple(result["killed"]))


def tail(log: Path, chars: int = 1500) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return " ".join(text[-chars:].split())
