"""Streaming timings against known truth: TTFT and ITL measured by pikeclient and by the raw AsyncOpenAI
client, against a loopback server whose first-token and per-chunk delays are set.

The server sleeps ``latency`` before answering and ``token_delay`` after every chunk, and sends a role
chunk before the first word: true TTFT = latency + token_delay, true ITL = token_delay. Both clients
run the same prompts at the same concurrency, in alternating order; the figures are each one's error
against the truth, the mean TTFT of the first ten calls (what one-time set-up on the event loop costs
them) and the ratio pikeclient / raw.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, loopback_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.backends.openai import OpenAIClient  # noqa: E402
from pikeclient.dataset import PromptItem  # noqa: E402
from pikeclient.runner import run_prompts  # noqa: E402

PROMPT = "one two three four five six seven eight nine ten eleven twelve"


async def raw_sdk(url: str, calls: int, concurrency: int) -> list[tuple[float, float]]:
    """(TTFT, ITL) per call with the bare SDK, timed the way pikeclient defines them."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    pending = iter(range(calls))
    out: list[tuple[float, float]] = []

    async def worker() -> None:
        for _ in pending:
            start = time.perf_counter()
            stream = await client.chat.completions.create(model="gpt-4o", stream=True,
                                                          messages=[{"role": "user", "content": PROMPT}])
            stamps = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            out.append((stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return out


async def pikeclient_run(url: str, calls: int, concurrency: int) -> list[tuple[float, float]]:
    client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None, stream=True)
    getattr(client, "prepare", lambda: None)()  # absent before pikeclient prepared clients (for before/after runs)
    prompts = [PromptItem(f"p{i}", ({"role": "user", "content": PROMPT},)) for i in range(calls)]
    records: list[dict] = []
    await run_prompts(client, prompts, concurrency, on_record=lambda record, _: records.append(record))
    client.close()
    return [(r["ttft_s"], r.get("itl_s") or float("nan")) for r in sorted(records, key=lambda r: r["start_time"])]


def summarize(samples: list[tuple[float, float]], truth_ttft: float, truth_itl: float) -> dict[str, float]:
    ttft = [s[0] for s in samples]
    itl = [s[1] for s in samples]
    return {"ttft_p50": statistics.median(ttft), "itl_p50": statistics.median(itl),
            "first10_ttft": statistics.fmean(ttft[:10]),
            "ttft_err": statistics.median(ttft) / truth_ttft - 1, "itl_err": statistics.median(itl) / truth_itl - 1}


def main() -> None:
    args = command_line(__doc__, calls=200, latency=0.06, token_delay=0.01, concurrency="8,64").parse_args()
    truth_ttft, truth_itl = args.latency + args.token_delay, args.token_delay
    rows = [("server", f"TTFT {truth_ttft * 1000:.0f} ms, ITL {truth_itl * 1000:.0f} ms (set)")]
    with loopback_server(args.latency, "--token-delay", str(args.token_delay)) as url:
        asyncio.run(raw_sdk(url, 16, 8))  # the server process's own first requests
        for concurrency in (int(c) for c in str(args.concurrency).split(",")):
            results = {}
            for name, fn in (("raw", raw_sdk), ("pikeclient", pikeclient_run), ("pikeclient2", pikeclient_run),
                             ("raw2", raw_sdk)):
                results[name] = asyncio.run(fn(url, args.calls, concurrency))
            raw = summarize(results["raw"] + results["raw2"], truth_ttft, truth_itl)
            pike = summarize(results["pikeclient"] + results["pikeclient2"], truth_ttft, truth_itl)
            first = {"raw": summarize(results["raw"], truth_ttft, truth_itl)["first10_ttft"],
                     "pike": summarize(results["pikeclient"], truth_ttft, truth_itl)["first10_ttft"]}
            rows += [
                (f"conc {concurrency}: TTFT p50 pikeclient / raw", f"{pike['ttft_p50'] * 1000:.1f} / "
                 f"{raw['ttft_p50'] * 1000:.1f} ms (error vs truth {pike['ttft_err']:+.1%} / {raw['ttft_err']:+.1%})"),
                (f"conc {concurrency}: ITL p50 pikeclient / raw", f"{pike['itl_p50'] * 1000:.2f} / "
                 f"{raw['itl_p50'] * 1000:.2f} ms (error vs truth {pike['itl_err']:+.1%} / {raw['itl_err']:+.1%})"),
                (f"conc {concurrency}: first 10 calls' TTFT pikeclient / raw",
                 f"{first['pike'] * 1000:.1f} / {first['raw'] * 1000:.1f} ms"),
                (f"conc {concurrency}: TTFT ratio pikeclient / raw", f"{pike['ttft_p50'] / raw['ttft_p50']:.3f}x"),
            ]
    emit(f"Streaming timings vs truth ({args.calls} calls a client, x2)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
