"""Open-loop accuracy and the highest sustainable request rate, pikeclient against the raw AsyncOpenAI.

1. Accuracy: ``load=constant`` at ``--rate`` requests/s for ``--seconds`` against a zero-latency
   loopback server (another process): achieved rate against the target (goal: within 1%) and the
   dispatch delay p99 (goal: < 2 ms).
2. Headroom: both clients send open-loop at doubling rates for ``--step-seconds`` each, with the same
   schedule code; a rate is sustained when the achieved rate is within 2% of it and the p99 dispatch
   delay under 5 ms. Reported: the highest sustained rate of each (goal: pikeclient's >= the raw SDK's).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, loopback_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.backends.openai import OpenAIClient  # noqa: E402
from pikeclient.run.dataset import PromptItem  # noqa: E402
from pikeclient.run.load import Constant  # noqa: E402
from pikeclient.run.runner import run_prompts  # noqa: E402
from pikeclient.run.stats import percentile  # noqa: E402

MESSAGE = {"role": "user", "content": "say ok"}


async def raw_open_loop(url: str, rate: float, count: int) -> tuple[float, float]:
    """The raw SDK under the same schedule: (achieved rate, p99 dispatch delay)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    sends: list[float] = []
    delays: list[float] = []

    async def one() -> None:
        await client.chat.completions.create(model="gpt-4o", messages=[MESSAGE], max_tokens=8)

    tasks = []
    start = time.perf_counter()
    for index in range(count):
        due = start + index / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.perf_counter()
        sends.append(now)
        delays.append(now - due)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    await client.close()
    return (len(sends) - 1) / (sends[-1] - sends[0]), percentile(delays, 99)


async def pike_open_loop(url: str, rate: float, count: int) -> tuple[float, float]:
    client = OpenAIClient(model="gpt-4o", base_url=url, api_key_env=None, sampling={"max_tokens": 8})
    client.prepare()
    items = [PromptItem(f"p{i}", (MESSAGE,)) for i in range(count)]
    stats = await run_prompts(client, items, Constant(rate=rate))
    client.close()
    m = stats.metrics()
    return m["Throughput/achieved_rate"], m["client/dispatch_delay_p99"]


def sustained(result: tuple[float, float], rate: float) -> bool:
    achieved, p99 = result
    return achieved >= rate * 0.98 and p99 < 0.005


def main() -> None:
    args = command_line(__doc__, rate=200.0, seconds=20.0, step_seconds=4.0, start_rate=100.0, max_rate=3200.0
                        ).parse_args()
    rows = []
    with loopback_server(0.0) as url:
        asyncio.run(raw_open_loop(url, 50, 50))  # the server's own first requests
        achieved, p99 = asyncio.run(pike_open_loop(url, args.rate, int(args.rate * args.seconds)))
        rows += [("accuracy", f"constant {args.rate:g}/s for {args.seconds:g} s: achieved {achieved:.2f}/s "
                  f"({achieved / args.rate - 1:+.2%}), dispatch delay p99 {p99 * 1000:.2f} ms")]
        best = {"pikeclient": 0.0, "raw AsyncOpenAI": 0.0}
        rate = args.start_rate
        while rate <= args.max_rate:
            count = int(rate * args.step_seconds)
            results = {"raw AsyncOpenAI": asyncio.run(raw_open_loop(url, rate, count)),
                       "pikeclient": asyncio.run(pike_open_loop(url, rate, count))}
            for name, result in results.items():
                if sustained(result, rate):
                    best[name] = rate
            rows.append((f"{rate:g}/s: achieved (p99 dispatch ms)", ", ".join(
                f"{name} {r[0]:.1f} ({r[1] * 1000:.2f})" for name, r in results.items())))
            if not any(sustained(r, rate) for r in results.values()):
                break
            rate *= 2
        rows.append(("highest sustained rate", ", ".join(f"{k} {v:g}/s" for k, v in best.items())))
    emit("Open-loop accuracy and headroom (zero-latency loopback server)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
