"""What torch must be told before it is first imported, and how many threads it should use.

torch's OpenMP threads spin-wait for each other between parallel regions by default. On cores that
other work also uses (a laptop with a browser open, a CI machine, the tracking process), a spinning
thread steals the core its partner needs: SmolLM2 generated 22 tokens/s for a batch of 8 with one of 2
cores busy, 44 with ``OMP_WAIT_POLICY=PASSIVE`` and 67 with one thread (bench/bench_first_run.py;
RESULTS.md "First run" has both idle and busy figures). OpenMP reads the variable once, when torch loads its runtime, so it has to be
in the environment before ``import torch``: the ``backends`` package imports this module before any of
its modules (the only ones that import torch) runs. A value the user set is kept.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

WAIT_POLICY = "PASSIVE"


def configure() -> None:
    """Set ``OMP_WAIT_POLICY`` (unless set) before torch loads; say so once if it is too late."""
    if "torch" in sys.modules:
        if "OMP_WAIT_POLICY" not in os.environ:
            log.warning("torch was imported before pikeclient could set OMP_WAIT_POLICY=%s: on busy cores a "
                        "local model may run several times slower (set it before importing torch)", WAIT_POLICY)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def default_threads() -> int:
    """torch's threads when ``llm.threads`` is not given: half the cores this process may use, at least one.

    The rest are left to the experiment's own processes (its event loop, the tracking process) and to
    whatever else runs: on 2 cores, one thread generated 83 tokens/s idle and 67 with a core busy, every
    core 66 and 44 (bench/bench_first_run.py, RESULTS.md "First run", 2026-12-02)."""
    return max(1, available_cores() // 2)


def available_cores() -> int:
    """Cores this process may run on (a cpuset or ``taskset`` counts, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


configure()
