"""What the client costs: CPU per request of the whole process tree, and requests/s, against nginx.

    python bench/bench_client_cost.py [--requests 5000] [--repeats 3] [--peers] [--no-append]

nginx (Debian's, started and stopped here) answers every request with a fixed answer at almost no CPU,
so what is measured is the client. Each contender runs as its own process tree (run.py's tracking
process, a load tool's worker processes included) twice, with --requests and with a fifth of them; the
marginal CPU per request is the difference of the two CPU totals (user + system, children included)
over the difference of requests, so start-up (imports, MLflow's store, a tool's services) is left out;
requests/s likewise, the difference of requests over the difference of the commands' wall times (which
counts the work a tool does per request after its calls), and also --requests over the long run's calls
(from its first send to its last answer, as the contender stamped them; less noisy where a tool's
start-up varies by seconds). The tree is measured by bench/_proctree.py: a process that outlives the
command is waited for and counted. pikeclient runs get a fresh MLflow store each.
Median of --repeats, interleaved (every other round in reverse order). Contenders, closed loop at
concurrency 64:

- raw ``AsyncOpenAI`` + a semaphore (the baseline);
- pikeclient ``run.py`` with ``tracking=none``, and with default tracking (traces on); each in one
  process (``load.workers=1``) and with ``load.workers=2`` (a row that cannot run says why);
- with ``--peers``: AIPerf 0.13 (``--concurrency 64 --request-count N``) and GuideLLM 0.8.1
  (``--profile kind=concurrent,streams=64 --constraint kind=max_requests,count=N``), each in its own
  virtual environment, on the same prompts (bench/_peers.py: their command lines, what is turned off).

Both plain JSON answers (``/v1``) and streamed ones (``/stream/v1``, 12 chunks).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, write_prompts  # noqa: E402
from bench._nginx import nginx_server  # noqa: E402
from bench._peers import (Call, aiperf_command, aiperf_prompts, guidellm_command, read_aiperf,  # noqa: E402
                          read_guidellm, read_records, span, tiny_tokenizer)
from bench._proctree import CommandFailed, run_tree  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

CONCURRENCY = 64
RAW = """
import asyncio, json, sys, time
from openai import AsyncOpenAI
url, n, stream, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
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
    first = time.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    json.dump([first, time.time()], open(out, "w"))
asyncio.run(main())
""" % CONCURRENCY



@dataclass(frozen=True)
class Sample:
    cpu_s: float  # the whole process tree's
    wall_s: float  # the command's
    calls_s: float  # from the first send to the last answer, as the contender stamped them


Run = Callable[[int], Sample]  # n requests -> what running them took


def contenders(url: str, stream: bool, folder: Path, peers: bool) -> dict[str, Run]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OPENAI_API_KEY"] = "sk-bench"
    prefix = "/stream" if stream else ""
    base = f"{url}{prefix}/v1"

    def fresh(name: str) -> Path:
        out = folder / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    def measured(command: list[str], calls: Callable[[], list[Call]], n: int) -> Sample:
        tree = run_tree(command, env, folder)
        answered = calls()
        if len(answered) != n:
            raise CommandFailed(f"{len(answered)} of {n} requests answered")
        return Sample(tree.cpu_s, tree.command_s, span(answered))

    def raw(n: int) -> Sample:
        out = fresh("raw") / "span.json"  # [first send, last answer]: a failed call fails the command

        def calls() -> list[Call]:
            first, last = json.loads(out.read_text())
            return [Call(first, last)] * n
        return measured([sys.executable, "-c", RAW, base, str(n), "1" if stream else "0", str(out)], calls, n)

    def pikeclient(*overrides: str) -> Run:
        def run(n: int) -> Sample:
            runs = fresh("runs")  # its own MLflow store: the same at every run, so start-up cancels out
            return measured([sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={base}",
                             f"llm.stream={str(stream).lower()}",
                             f"dataset.path={write_prompts(folder / 'prompts.jsonl', n)}",
                             f"load.concurrency={CONCURRENCY}", "experiment.warmup=0", f"paths.runs_dir={runs}",
                             *overrides], lambda: read_records(runs), n)
        return run

    def peer(name: str, command: Callable[..., list[str]], read: Callable[[Path], list[Call]]) -> Run:
        def run(n: int) -> Sample:
            out = fresh(name)
            prompts = (aiperf_prompts(folder / "aiperf-prompts.jsonl", n) if name == "aiperf"
                       else write_prompts(folder / "prompts.jsonl", n))
            return measured(command(url, prefix, stream=stream, prompts=prompts, out=out, requests=n,
                                    tokenizer=tiny_tokenizer(folder / "tokenizer"), concurrency=CONCURRENCY),
                            lambda: read(out), n)
        return run

    runs = {"raw AsyncOpenAI + semaphore": raw,
            "pikeclient tracking=none, 1 worker": pikeclient("tracking=none", "load.workers=1"),
            "pikeclient default tracking (traces on), 1 worker": pikeclient("load.workers=1"),
            "pikeclient tracking=none, 2 workers": pikeclient("tracking=none", "load.workers=2"),
            "pikeclient default tracking, 2 workers": pikeclient("load.workers=2")}
    if peers:
        runs["AIPerf 0.13"] = peer("aiperf", aiperf_command, read_aiperf)
        runs["GuideLLM 0.8.1"] = peer("guidellm", guidellm_command, read_guidellm)
    return runs


def marginal(run: Run, requests: int) -> tuple[float, float, float]:
    """(CPU ms per request and requests/s beyond start-up: the long run less the short one; requests/s
    during the long run's calls)."""
    small, long = run(requests // 5), run(requests)
    extra = requests - requests // 5
    longer = long.wall_s - small.wall_s  # <= 0 where start-up varied by more than the extra calls took
    return ((long.cpu_s - small.cpu_s) / extra * 1000, extra / longer if longer > 0 else float("nan"),
            requests / long.calls_s)


def main() -> None:
    parser = command_line(__doc__, requests=5000, repeats=3)
    parser.add_argument("--peers", action="store_true", help="also AIPerf and GuideLLM")
    args = parser.parse_args()
    rows = []
    with nginx_server() as url, tempfile.TemporaryDirectory() as tmp:
        for stream in (False, True):
            kind = "streaming" if stream else "plain JSON"
            runs = contenders(url, stream, Path(tmp), args.peers)
            samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
            failed: dict[str, str] = {}
            for round_number in range(args.repeats):
                order = [item for item in runs.items() if item[0] not in failed]
                for name, run in order[::-1] if round_number % 2 else order:
                    print(f"{kind}, round {round_number + 1}: {name}", flush=True)
                    try:
                        samples[name].append(marginal(run, args.requests))
                    except CommandFailed as error:  # its row says why
                        failed[name] = str(error)
            base = statistics.median(c for c, _, _ in samples[next(iter(runs))])
            for name, values in samples.items():
                if name in failed:
                    rows.append((f"{kind}: {name}", f"could not be run: {failed[name][-300:]}"))
                    continue
                cpu, calls_rate = (statistics.median(v[i] for v in values) for i in (0, 2))
                walls = [v[1] for v in values if v[1] == v[1]]  # NaN: not measured
                wall_rate = f"{statistics.median(walls):.0f}" if walls else "-"
                rows.append((f"{kind}: {name}", f"{cpu:.2f} ms CPU/request ({cpu / base:.2f}x the raw SDK); "
                                                f"{calls_rate:.0f} requests/s during the calls, {wall_rate} "
                                                "from the commands' wall times"))
    emit(f"Client cost against nginx ({args.requests} requests, concurrency {CONCURRENCY})", rows,
         to_results=not args.no_append)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
