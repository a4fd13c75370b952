"""The raw SDK as a contender: ``AsyncOpenAI``, one task per request, nothing else.

    python bench/_raw_sdk.py URL N OUT (--concurrency C | --rate R) [--stream]

Closed loop: a semaphore of C. Open loop: one task per request created at its time on an even schedule
at R requests/s (the loop sleeps until each is due; how late a task got to run is its dispatch delay).
Per call, one JSON list in OUT: [start, end, ttft_s, itl_s, dispatch_s, error] (epoch seconds for start
and end), stamped around ``create()`` as a script around the SDK would stamp them. The SDK's defaults,
but no retries: a failed call is kept as one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from openai import AsyncOpenAI, OpenAIError


async def one(client: AsyncOpenAI, i: int, stream: bool, due: float | None) -> list:
    late = None if due is None else time.perf_counter() - due  # when the task got to run
    messages = [{"role": "user", "content": f"Benchmark prompt number {i}: say something short."}]
    start, clock = time.time(), time.perf_counter()
    first = last = error = None
    chunks = 0
    try:
        if stream:
            response = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                                            stream_options={"include_usage": True})
            async for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
        else:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    except OpenAIError as failure:  # kept as a failed call (no retries: max_retries=0)
        error = f"{type(failure).__name__}: {failure}"
    end = time.time()
    ttft = None if first is None else first - clock
    itl = (last - first) / (chunks - 1) if chunks > 1 else None
    return [start, end, ttft, itl, late, error]


async def main(args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=args.url, api_key="x", max_retries=0)
    if args.concurrency:
        slots = asyncio.Semaphore(args.concurrency)

        async def bounded(i: int) -> list:
            async with slots:
                return await one(client, i, args.stream, None)
        calls = await asyncio.gather(*(bounded(i) for i in range(args.n)))
    else:
        tasks, first = [], time.perf_counter()
        for i in range(args.n):
            due = first + i / args.rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(client, i, args.stream, due)))
        calls = await asyncio.gather(*tasks)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(call) + "\n" for call in calls)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("out")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--stream", action="store_true")
    asyncio.run(main(parser.parse_args()))
