"""Streaming timings against truth: TTFT and ITL measured by pikeclient and by the raw AsyncOpenAI client,
against a loopback server whose first-token and per-chunk delays are set and whose own clock is read.

The server answers ``latency`` after a request arrives, with a role chunk and then one word every
``token_delay`` on a fixed schedule: the set truth is TTFT = latency + token_delay, ITL = token_delay.
It also keeps, per stream, when it had read the request and when it wrote the first and the last text
chunk (``--timings``, on the same CLOCK_MONOTONIC as the client's ``perf_counter``): that is each call's
truth as the server delivered it, whatever its own scheduling on this shared machine cost. Each client's
per-call error is its reading over that call's server-side truth; the figures are the median and the
90th percentile of those errors, the median against the set delays, and the ratio pikeclient / raw.
Both clients run the same number of calls at the same concurrency, in alternating order.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, loopback_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.backends.openai import OpenAIClient  # noqa: E402
from pikeclient.run.dataset import PromptItem  # noqa: E402
from pikeclient.run.runner import run_prompts  # noqa: E402

WORDS = 12  # the prompt's words; the server's answer echoes them, one chunk per word


def set_words(n: int) -> None:
    global WORDS
    WORDS = n
Reading = tuple[str, float, float]  # (prompt, TTFT, ITL) as a client read them
RAW_STAMPS: dict[str, tuple[float, float]] = {}  # the raw client's send and first-token clock readings


def prompt_text(i: int) -> str:
    words = " ".join(f"w{k}" for k in range(WORDS - 1))
    return f"{words} call{i}"  # unique, so the server's timing of each call can be found


async def raw_sdk(url: str, calls: int, concurrency: int) -> list[Reading]:
    """(prompt, TTFT, ITL) per call with the bare SDK, timed the way pikeclient defines them."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    pending = iter(range(calls))
    out: list[Reading] = []

    async def worker() -> None:
        for i in pending:
            start = time.perf_counter()
            stream = await client.chat.completions.create(model="gpt-4o", stream=True,
                                                          messages=[{"role": "user", "content": prompt_text(i)}])
            stamps = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            out.append((prompt_text(i), stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)))
            RAW_STAMPS[prompt_text(i)] = (start, stamps[0])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return out


async def pikeclient_run(url: str, calls: int, concurrency: int) -> list[Reading]:
    client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None, stream=True)
    client.prepare()
    prompts = [PromptItem(f"p{i}", ({"role": "user", "content": prompt_text(i)},)) for i in range(calls)]
    records: list[dict] = []
    await run_prompts(client, prompts, concurrency, on_record=lambda record, _: records.append(record))
    client.close()
    return [(prompt_text(r["index"]), r["ttft_s"], r["itl_s"]) for r in records]


def server_truth(url: str, legs: list[tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """(TTFT, ITL) per prompt as the server's clock saw them; the server forgets them once read.

    ``legs`` gets, for the raw client's calls, where its extra TTFT went: from its send stamp to the
    server having read the request, and from the server writing the first token to the client's stamp."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_timings", timeout=30) as response:
        streams = json.load(response)
    for s in streams:
        if legs is not None and s["prompt"] in RAW_STAMPS:
            sent, got = RAW_STAMPS.pop(s["prompt"])
            legs.append((s["received"] - sent, got - s["first"]))
    return {s["prompt"]: (s["first"] - s["received"], (s["last"] - s["first"]) / (s["text_chunks"] - 1))
            for s in streams}


def errors(readings: list[Reading], truth: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Each call's relative error against the server's timing of that same call."""
    missing = {p for p, _, _ in readings} - set(truth)
    if missing:
        raise SystemExit(f"the server has no timing for {len(missing)} calls")
    return {"ttft": [ttft / truth[p][0] - 1 for p, ttft, _ in readings],
            "itl": [itl / truth[p][1] - 1 for p, _, itl in readings]}


def p90_abs(values: list[float]) -> float:
    return sorted(abs(v) for v in values)[int(0.9 * (len(values) - 1))]


def main() -> None:
    args = command_line(__doc__, calls=200, concurrency="8,64", profiles="0.06/0.01/12,0.2/0.03/60",
                        pin=0).parse_args()
    rows = []
    server_cpus = None
    if args.pin:  # the server on the last core, the client on the others: they no longer take turns
        cores = sorted(os.sched_getaffinity(0))
        server_cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))
        rows.append(("cores", f"server {sorted(server_cpus)}, client {cores[:-1]}"))
    for profile in str(args.profiles).split(","):  # latency/token_delay/prompt words
        latency, token_delay, words = (float(v) for v in profile.split("/"))
        set_words(int(words))
        rows += measure(args.calls, str(args.concurrency), latency, token_delay, server_cpus)
    emit(f"Streaming timings vs truth ({args.calls} calls a client, x2)", rows, to_results=not args.no_append)


def measure(calls: int, concurrencies: str, latency: float, token_delay: float,
            server_cpus: set[int] | None = None) -> list[tuple[str, str]]:
    set_ttft, set_itl = latency + token_delay, token_delay
    rows = [(f"server (set): TTFT {set_ttft * 1000:.0f} ms, ITL {set_itl * 1000:.0f} ms, "
             f"{WORDS + 2}-chunk answers", "")]
    with loopback_server(latency, "--token-delay", str(token_delay), "--timings", cpus=server_cpus) as url:
        asyncio.run(raw_sdk(url, 16, 8))  # the server process's own first requests
        server_truth(url)
        for concurrency in (int(c) for c in concurrencies.split(",")):
            read: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "itl": []} for n in ("raw", "pikeclient")}
            err: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "itl": []} for n in ("raw", "pikeclient")}
            served: dict[str, list[float]] = {"ttft": [], "itl": []}
            legs: list[tuple[float, float]] = []
            for name, fn in (("raw", raw_sdk), ("pikeclient", pikeclient_run), ("pikeclient", pikeclient_run),
                             ("raw", raw_sdk)):
                got = asyncio.run(fn(url, calls, concurrency))
                truth = server_truth(url, legs)
                for key, values in errors(got, truth).items():
                    err[name][key] += values
                read[name]["ttft"] += [t for _, t, _ in got]
                read[name]["itl"] += [i for _, _, i in got]
                served["ttft"] += [truth[p][0] for p, _, _ in got]
                served["itl"] += [truth[p][1] for p, _, _ in got]
            srv = {key: statistics.median(values) for key, values in served.items()}
            rows.append((f"- conc {concurrency}: server's own TTFT / ITL p50",
                         f"{srv['ttft'] * 1000:.1f} ms ({srv['ttft'] / set_ttft - 1:+.1%} vs set) / "
                         f"{srv['itl'] * 1000:.2f} ms ({srv['itl'] / set_itl - 1:+.1%} vs set)"))
            rows.append((f"- conc {concurrency}: raw client's extra TTFT p50: send to server, server to client",
                         f"{statistics.median(a for a, _ in legs) * 1000:.2f} ms, "
                         f"{statistics.median(b for _, b in legs) * 1000:.2f} ms"))
            for key, label, set_truth in (("ttft", "TTFT", set_ttft), ("itl", "ITL", set_itl)):
                e = {name: (statistics.median(v[key]), p90_abs(v[key])) for name, v in err.items()}
                c = {name: statistics.median(v[key]) for name, v in read.items()}
                rows.append((f"- conc {concurrency}: {label} error vs server, p50 (p90 abs) pikeclient / raw",
                             f"{e['pikeclient'][0]:+.1%} ({e['pikeclient'][1]:.1%}) / "
                             f"{e['raw'][0]:+.1%} ({e['raw'][1]:.1%})"))
                rows.append((f"- conc {concurrency}: {label} p50 pikeclient / raw (vs set)",
                             f"{c['pikeclient'] * 1000:.2f} / {c['raw'] * 1000:.2f} ms "
                             f"({c['pikeclient'] / set_truth - 1:+.1%} / {c['raw'] / set_truth - 1:+.1%})"))
    return rows


if __name__ == "__main__":
    main()
