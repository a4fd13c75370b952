"""The newcomer's first run: README's main command, on idle cores and with one core kept busy.

    python bench/bench_first_run.py [--repeats 3] [--no-append] [--only-run]

Two parts, both measured in this run:

1. How torch should wait and how many threads it should use: SmolLM2-135M-Instruct (the default model)
   generates one batch of 8 prompts x 64 tokens in a fresh process per setting (OpenMP reads its
   environment when torch loads), on idle cores and with one core kept busy by a spinning process;
   tokens/s, median of --repeats, as a ratio against torch's own default (spin-waiting threads, one per
   physical core), measured beside it.
2. ``python run.py`` as README's main command runs it the first time after install (a fresh ``runs/``:
   the model is fetched from pip's cache and converted), quiet and with one core busy: wall seconds.
   Target: under 90 s with one core busy on a 2-core machine. ``--only-run`` measures this part alone.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

GENERATE = """
import os, sys, time
from pikeclient.backends.smollm2 import SMOLLM2, ensure_converted
from pikeclient.backends.hf_meta_llama import HFLocalClient
from pikeclient.core.types import SamplingParams
threads = int(sys.argv[2]) or None
client = HFLocalClient(model=str(ensure_converted(SMOLLM2, sys.argv[1])), threads=threads)
ids = [client.encode_messages([{"role": "user", "content": f"Tell story {i} about a cat."}]) for i in range(8)]
params = SamplingParams.from_mapping({"max_tokens": 64, "min_tokens": 64})
client.generate_batch(ids, params)  # the first batch pays for kernel selection: not measured
start = time.perf_counter()
out = client.generate_batch(ids, params)
print(sum(r.usage.completion_tokens for r in out) / (time.perf_counter() - start))
"""

# name -> (environment, threads (0: pikeclient's choice), torch imported first). The first is the baseline:
# torch as it comes (imported before pikeclient, OMP_WAIT_POLICY unset: libgomp's spin-then-sleep).
SETTINGS = {
    "torch's default (threads spin before they sleep)": ({}, 0, True),
    "OMP_WAIT_POLICY=ACTIVE (threads spin)": ({"OMP_WAIT_POLICY": "ACTIVE"}, 0, False),
    "PASSIVE, 1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1, False),
    "PASSIVE, every allowed core": ({"OMP_WAIT_POLICY": "PASSIVE"}, len(os.sched_getaffinity(0)), False),
    "PASSIVE, half the allowed cores (pikeclient's default)": ({}, 0, False),
}


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """A process spinning on one core, as a browser or a build would keep it busy."""
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def tokens_per_s(env: dict[str, str], threads: int, torch_first: bool, models: str) -> float:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ.update(env)
    script = ("import torch\n" if torch_first else "") + GENERATE
    done = subprocess.run([sys.executable, "-c", script, models, str(threads)], env=environ,
                          capture_output=True, text=True, check=True, cwd=REPO)
    return float(done.stdout.strip().splitlines()[-1])


def first_run(busy: bool) -> float:
    """``python run.py`` in a folder with no runs/ yet (the model comes from pip's cache, is converted)."""
    with tempfile.TemporaryDirectory() as folder, busy_core(busy):
        environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MLFLOW_TRACKING_URI")}
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "run.py")], cwd=folder, env=environ, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def threads_rows(repeats: int) -> list[tuple[str, str]]:
    """Part 1: tokens/s of each setting against torch's default, idle and with one core busy."""
    rows = []
    with tempfile.TemporaryDirectory() as models:
        tokens_per_s({}, 0, False, models)  # fetch and convert the model once, outside the timings
        for busy in (False, True):
            with busy_core(busy):
                samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
                for round_number in range(repeats):
                    order = list(SETTINGS.items())
                    for name, (env, threads, torch_first) in order[::-1] if round_number % 2 else order:
                        samples[name].append(tokens_per_s(env, threads, torch_first, models))
            base = statistics.median(samples[next(iter(SETTINGS))])
            for name, values in samples.items():
                median = statistics.median(values)
                rows.append((f"{'one core busy' if busy else 'idle cores'}: {name}",
                             f"{median:.1f} tokens/s ({median / base:.2f}x)"))
    return rows


def main() -> None:
    parser = command_line(__doc__, repeats=3)
    parser.add_argument("--only-run", action="store_true", help="README's main command only, not the threads")
    args = parser.parse_args()
    rows = [] if args.only_run else threads_rows(args.repeats)
    for busy in (False, True):
        walls = [first_run(busy) for _ in range(args.repeats)]
        rows.append((f"README main command, first run, {'one core busy' if busy else 'quiet'}",
                     f"{statistics.median(walls):.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)})"
                     + ("; target < 90 s" if busy else "")))
    emit("First run: torch threads and README's main command", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
