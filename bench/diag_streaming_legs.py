"""Where pikeclient's TTFT at high concurrency goes, against the loopback server's own clock.

A diagnostic, not a benchmark with a target: it wraps ``pikeclient.backends._http.send_delay`` to
collect every call's wire-send stamp (CLOCK_MONOTONIC, as the server's), runs streamed calls through
``run_prompts`` against a server keeping its timings (``--timings``), and matches sends with the
server's request reads by order (both sorted), so the legs are distributions, not per-call pairs:
send -> server read (the server's own queue, outside its TTFT clock), the server's TTFT, and what is
left on the way back. ``--pin 1`` puts the server on the last core and the client on the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.bench_streaming as streaming  # noqa: E402
import pikeclient.backends._http as http  # noqa: E402
import pikeclient.backends.openai as openai_backend  # noqa: E402
from bench._common import loopback_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

SENT: list[float] = []


def spy(start: float, sent: list[float]) -> float | None:
    if sent:
        SENT.append(sent[0])
    return http.send_delay(start, sent)


def main() -> None:
    args = command_line(__doc__, calls=200, concurrency=64, latency=0.2, token_delay=0.03, words=60,
                        pin=0).parse_args()
    openai_backend.send_delay = spy
    streaming.set_words(args.words)
    cpus = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))
    with loopback_server(args.latency, "--token-delay", str(args.token_delay), "--timings", cpus=cpus) as url:
        asyncio.run(streaming.raw_sdk(url, 16, 8))
        streaming.server_truth(url)
        SENT.clear()
        readings = asyncio.run(streaming.pikeclient_run(url, args.calls, args.concurrency))
        with urllib.request.urlopen(url.removesuffix("/v1") + "/_timings", timeout=30) as response:
            streams = json.load(response)
    queue = [r - s for r, s in zip(sorted(t["received"] for t in streams), sorted(SENT))]
    server = statistics.median(t["first"] - t["received"] for t in streams)
    client = statistics.median(ttft for _, ttft, _ in readings)
    p50 = statistics.median(queue)
    rows = [
        ("setting", f"conc {args.concurrency}, TTFT {(args.latency + args.token_delay) * 1000:.0f} ms set, "
                    f"{args.calls} calls, {'pinned' if args.pin else 'shared'} cores"),
        ("send -> server read p50 / p90 (ms)",
         f"{p50 * 1000:.1f} / {sorted(queue)[int(0.9 * (len(queue) - 1))] * 1000:.1f}"),
        ("TTFT p50: pikeclient / server's own (ms)", f"{client * 1000:.1f} / {server * 1000:.1f}"),
        ("left for the way back, p50 (ms)", f"{(client - server - p50) * 1000:.1f}"),
        ("pikeclient vs server's TTFT + its read queue", f"{client / (server + p50) - 1:+.1%}"),
    ]
    emit("Streaming TTFT legs at high concurrency (diagnostic)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
