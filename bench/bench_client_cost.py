"""What the client costs: CPU per request of the whole process tree, and requests/s, against nginx.

    python bench/bench_client_cost.py [--requests 5000] [--repeats 3] [--peers] [--no-append]

nginx (Debian's, started and stopped here) answers every request with a fixed answer at almost no CPU,
so what is measured is the client. Each contender runs as its own process tree (run.py's tracking
process included) twice, with --requests and with a fifth of them; the marginal CPU per request is the
difference of the two CPU totals (user + system, children included) over the difference of requests,
so start-up (imports, MLflow's store) is left out. Median of --repeats, interleaved. Contenders:

- raw ``AsyncOpenAI`` + a semaphore (the baseline);
- pikeclient ``run.py`` with ``tracking=none``, and with default tracking (traces on);
- with ``--peers``: AIPerf and GuideLLM, each installed in its own virtual environment under
  ``runs/bench-peers/`` (torch pinned to the local CPU wheel by a constraints file).

Both plain JSON answers and streamed ones (12 chunks). Concurrency 64.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, write_prompts  # noqa: E402
from bench._nginx import nginx_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

CONCURRENCY = 64
RAW = """
import asyncio, sys
from openai import AsyncOpenAI
url, n, stream = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
async def main():
    client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    slots = asyncio.Semaphore(%d)
    async def one(i):
        async with slots:
            messages = [{"role": "user", "content": f"Benchmark prompt number {i}: say something short."}]
            if stream:
                response = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                                stream_options={"include_usage": True})
                async for _ in response:
                    pass
            else:
                await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    await asyncio.gather(*(one(i) for i in range(n)))
asyncio.run(main())
""" % CONCURRENCY


def cpu_of(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(CPU seconds of the process tree, wall seconds) of one command run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def contenders(url: str, stream: bool, folder: Path) -> dict[str, callable]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OPENAI_API_KEY"] = "sk-bench"
    base = f"{url}/stream/v1" if stream else f"{url}/v1"

    def raw(n: int) -> tuple[float, float]:
        return cpu_of([sys.executable, "-c", RAW, base, str(n), "1" if stream else "0"], env, folder)

    def pikeclient(tracking: str):
        def run(n: int) -> tuple[float, float]:
            prompts = write_prompts(folder / f"prompts-{n}.jsonl", n)
            command = [sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={base}",
                       f"llm.stream={str(stream).lower()}", f"dataset.path={prompts}", f"load.concurrency={CONCURRENCY}",
                       "experiment.warmup=0", f"paths.runs_dir={folder / 'runs'}", *tracking.split()]
            return cpu_of(command, env, folder)
        return run

    return {"raw AsyncOpenAI + semaphore": raw, "pikeclient tracking=none": pikeclient("tracking=none"),
            "pikeclient default tracking (traces on)": pikeclient("")}


def marginal(run, requests: int) -> tuple[float, float]:
    """(CPU ms per request, requests/s), both beyond start-up: the long run less the short one."""
    small_cpu, small_wall = run(requests // 5)
    cpu, wall = run(requests)
    extra = requests - requests // 5
    return (cpu - small_cpu) / extra * 1000, extra / (wall - small_wall)


def main() -> None:
    args = command_line(__doc__, requests=5000, repeats=3).parse_args()
    rows = []
    with nginx_server() as url, tempfile.TemporaryDirectory() as tmp:
        for stream in (False, True):
            runs = contenders(url, stream, Path(tmp))
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            for round_number in range(args.repeats):
                order = list(runs.items())
                for name, run in order[::-1] if round_number % 2 else order:
                    samples[name].append(marginal(run, args.requests))
            base = statistics.median(c for c, _ in samples[next(iter(runs))])
            for name, values in samples.items():
                cpu = statistics.median(c for c, _ in values)
                rate = statistics.median(r for _, r in values)
                rows.append((f"{'streaming' if stream else 'plain JSON'}: {name}",
                             f"{cpu:.2f} ms CPU/request ({cpu / base:.2f}x the raw SDK), {rate:.0f} requests/s"))
    emit(f"Client cost against nginx ({args.requests} requests, concurrency {CONCURRENCY})", rows,
         to_results=not args.no_append)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
