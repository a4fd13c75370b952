"""Workloads: trace replay accuracy against the raw AsyncOpenAI, and the memory of 1,000 concurrent sessions.

1. Replay: a ``--seconds`` trace at about ``--rate`` requests/s (Poisson times, seeded; short prompts) is
   played by ``load=replay`` and by the raw SDK scheduling the same trace (sleep until due, then
   ``create()``), against a zero-latency loopback server in another process. The send-time error of a
   request is when the *server* received it minus when it was due (the client's clock: its start plus
   the trace time), so both clients are judged by the same clock. Goals: p99 under 2 ms; no drift (the
   last seconds' median error no higher than the first seconds').
2. Sessions: ``--users`` simulated users at once, each playing a conversation of ``--turns`` turns
   (user messages of ~200 words; the server echoes them, so histories grow by ~400 words a turn), in a
   fresh process: its peak RSS (goal: under 1 GB), against the raw SDK holding the same histories.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, loopback_server  # noqa: E402
from bench._report import append, command_line  # noqa: E402
from pikeclient.backends.openai import OpenAIClient  # noqa: E402
from pikeclient.run.load import build_strategy  # noqa: E402
from pikeclient.run.runner import run_prompts  # noqa: E402
from pikeclient.run.stats import percentile  # noqa: E402

LOAD = os.getloadavg()
WORDS = "river mountain city table window garden music story light water paper voice market answer".split()


def write_trace(path: Path, rate: float, seconds: float, seed: int = 7) -> Path:
    rng, at, rows = random.Random(seed), 0.0, []
    while at < seconds:
        rows.append((round(at, 6), rng.randint(24, 40), 8))
        at += rng.expovariate(rate)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["time", "input_tokens", "output_tokens"])
        writer.writerows(rows)
    return path


def received(url: str) -> dict[str, float]:
    """The server's receive time of each prompt since the last call (and it forgets them)."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_received", timeout=60) as answer:
        return {entry["prompt"]: entry["time"] for entry in json.load(answer)}


async def pike_replay(url: str, trace: Path) -> tuple[dict[str, float], list[float]]:
    """Due times (epoch) by prompt, and pikeclient's own dispatch delays."""
    client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None)
    client.prepare()
    strategy = build_strategy("replay", trace=str(trace))
    items = strategy.prompts().read(client)
    records: list[dict] = []
    await run_prompts(client, items, strategy, on_record=lambda r, _: records.append(r), warmup=1)
    client.close()
    due = {r["prompt"]: r["start_time"] - r["dispatch_delay_s"] for r in records}  # start_time is taken at dispatch
    return due, [r["dispatch_delay_s"] for r in records]


async def raw_replay(url: str, trace: Path) -> tuple[dict[str, float], list[float]]:
    import openai

    client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None)
    items = build_strategy("replay", trace=str(trace)).prompts().read(client)  # the same prompts
    raw = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    await raw.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "warm up"}], max_tokens=8)
    tasks, due, delays = [], {}, []
    epoch, start = time.time(), time.perf_counter()
    for item in items:
        wait = start + item.at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        delays.append(time.perf_counter() - start - item.at)
        due[item.prompt] = epoch + item.at
        tasks.append(asyncio.create_task(raw.chat.completions.create(
            model="gpt-4o", messages=list(item.messages), max_tokens=item.max_tokens)))
    await asyncio.gather(*tasks)
    await raw.close()
    return due, delays


def errors(due: dict[str, float], got: dict[str, float]) -> list[tuple[float, float]]:
    """(due, server receive - due) of every request, in order."""
    return sorted((when, got[prompt] - when) for prompt, when in due.items() if prompt in got)


def replay_rows(name: str, runs: list[list[tuple[float, float]]], delays: list[float], goals: list[str]) -> list[tuple]:
    """Figures over every run of a client: errors on the server's clock, first and last seconds of each run."""
    error = [e for pairs in runs for _, e in pairs]
    head = [e for pairs in runs for when, e in pairs if when - pairs[0][0] < 5]
    tail = [e for pairs in runs for when, e in pairs if pairs[-1][0] - when < 5]
    drift = statistics.median(tail) - statistics.median(head)
    goals.append(f"{name}: error p99 {percentile(error, 99) * 1000:.2f} ms (goal < 2 ms: "
                 f"{'met' if percentile(error, 99) < 0.002 else 'not met'}), drift {drift * 1000:+.2f} ms over the run")
    return [
        (f"{name}: send-time error p50 / p99 / max (ms), server's clock",
         f"{percentile(error, 50) * 1000:.2f} / {percentile(error, 99) * 1000:.2f} / {max(error) * 1000:.2f}"),
        (f"{name}: median error first 5 s / last 5 s (ms)",
         f"{statistics.median(head) * 1000:.2f} / {statistics.median(tail) * 1000:.2f}"),
        (f"{name}: dispatch delay p99 (ms), client's clock", f"{percentile(delays, 99) * 1000:.2f}"),
    ]


def sessions_rss(kind: str, url: str, users: int, turns: int) -> float:
    """Peak RSS (MB) of a fresh process that plays ``users`` sessions of ``turns`` turns at once."""
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--url", url, "--users", str(users),
                           "--turns", str(turns)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"]


def conversation(seed: int, turns: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{seed}.{turn}: " + " ".join(rng.choices(WORDS, k=200))})
        messages.append({"role": "assistant", "content": "recorded"})
    return messages


async def child(kind: str, url: str, users: int, turns: int) -> dict:
    if kind == "pikeclient":
        from pikeclient.run.datasets.chat import turns as split

        client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None, sampling={"max_tokens": 400})
        client.prepare()
        items = [item for s in range(users) for item in split(f"s{s}", conversation(s, turns))]
        stats = await run_prompts(client, items, build_strategy("sessions", users=users))
        client.close()
        calls = stats.calls
        assert stats.error_count == 0, stats.errors
    else:
        import openai

        raw = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)

        async def user(s: int) -> int:
            history: list[dict] = []
            for message in conversation(s, turns)[::2]:
                history.append(message)
                answer = await raw.chat.completions.create(model="gpt-4o", messages=history, max_tokens=400)
                history.append({"role": "assistant", "content": answer.choices[0].message.content})
            return len(history) // 2

        calls = sum(await asyncio.gather(*(user(s) for s in range(users))))
        await raw.close()
    return {"calls": calls, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = command_line(__doc__, rate=200.0, seconds=60.0, users=1000, turns=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a fresh process for one RSS figure
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.url, args.users, args.turns))))
        return
    rows, goals = [], []
    with tempfile.TemporaryDirectory() as folder, loopback_server(0.0, keep_log=True) as url:
        trace = write_trace(Path(folder) / "trace.csv", args.rate, args.seconds)
        count = len(trace.read_text().splitlines()) - 1
        rows.append(("replay: trace", f"{count} requests over {args.seconds:g} s (~{count / args.seconds:.0f}/s)"))
        # Each client twice, in the order A B B A: load from elsewhere on the machine, rising or falling,
        # weighs on both alike. Each figure is over both of a client's runs.
        results: dict[str, tuple[list, list, float]] = {}
        for name, play in (("raw AsyncOpenAI", raw_replay), ("pikeclient", pike_replay),
                           ("pikeclient", pike_replay), ("raw AsyncOpenAI", raw_replay)):
            received(url)  # forget the warm-up
            cpu = time.process_time()
            due, delays = asyncio.run(play(url, trace))
            cpu = time.process_time() - cpu
            pairs = errors(due, received(url))
            assert len(pairs) == count, (name, len(pairs), count)
            earlier = results.get(name, ([], [], 0.0))
            results[name] = (earlier[0] + [pairs], earlier[1] + delays, earlier[2] + cpu)
        for name, (runs, delays, cpu) in results.items():
            rows += replay_rows(name, runs, delays, goals)
            rows.append((f"{name}: client CPU per request (ms)", f"{cpu / (count * len(runs)) * 1000:.3f}"))
    with loopback_server(0.5) as url:
        for name in ("raw AsyncOpenAI", "pikeclient"):
            rss = sessions_rss("pikeclient" if name == "pikeclient" else "raw", url, args.users, args.turns)
            rows.append((f"sessions: {args.users} at once x {args.turns} turns, peak RSS (MB): {name}", f"{rss:.0f}"))
        goals.append(f"{name}: {args.users} sessions' peak RSS {rss:.0f} MB (goal < 1024 MB: "
                     f"{'met' if rss < 1024 else 'not met'})")
    title = "Workloads: trace replay and concurrent sessions (loopback server)"
    load = f"load average before: {LOAD[0]:.2f}, after: {os.getloadavg()[0]:.2f} (2 cores shared)"
    notes = "\n".join(f"- {line}" for line in [*goals, load])
    print(append(title, rows, notes) if not args.no_append else "\n".join([*(f"{k}: {v}" for k, v in rows), notes]))


if __name__ == "__main__":
    main()
