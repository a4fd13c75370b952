"""Local model: batched generation vs one prompt at a time (the original design's way).

    python bench/bench_local.py [--batch 16] [--prompts 32] [--hidden 64 --layers 2] [--no-append]

Both sides use the same tiny Llama (built here), prompt set, greedy decoding and max_tokens; the figure
is output tokens per second, and the ratio batched / one-at-a-time. On a GPU the client picks CUDA by
itself (device=auto); try --hidden 1024 --layers 12 there.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import command_line, emit  # noqa: E402
from pikeclient.backends.hf_meta_llama import HFLocalClient  # noqa: E402
from pikeclient.backends.smoke_llama import build_tiny_llama  # noqa: E402
from pikeclient.run.dataset import load_prompts  # noqa: E402
from pikeclient.run.runner import run_prompts  # noqa: E402


def one_at_a_time(client: HFLocalClient, items) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = sum(client.chat(list(item.messages)).usage.completion_tokens for item in items)
    return tokens, time.perf_counter() - start


def batched(client: HFLocalClient, items, batch: int) -> tuple[int, float]:
    stats = asyncio.run(run_prompts(client, items, batch))
    return stats.completion_tokens, stats.wall_s


def median_run(run, repeats: int) -> tuple[int, float]:
    results = sorted((run() for _ in range(repeats)), key=lambda r: r[1])
    return results[len(results) // 2]


def main() -> None:
    args = command_line(__doc__, batch=16, prompts=32, max_tokens=64, hidden=64, layers=2, repeats=3).parse_args()

    base = load_prompts("pkg://pikeclient/data/prompts.jsonl")
    items = [base[i % len(base)] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_llama(Path(tmp) / "m", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=max(4, args.hidden // 64))
        client = HFLocalClient(model=str(path), batch_size=args.batch, sampling={"max_tokens": args.max_tokens})
        # Warm both paths (the batched one runs on a worker thread, which pays torch's per-thread set-up
        # on first use), then take the median of --repeats runs of each.
        one_at_a_time(client, items[:2])
        batched(client, items[: args.batch], args.batch)
        seq_tokens, seq_s = median_run(lambda: one_at_a_time(client, items), args.repeats)
        bat_tokens, bat_s = median_run(lambda: batched(client, items, args.batch), args.repeats)
        device = client.describe()["device"]
        client.close()
    seq_tps, bat_tps = seq_tokens / seq_s, bat_tokens / bat_s
    rows = [
        ("model", f"tiny Llama hidden {args.hidden}, {args.layers} layers, on {device}"),
        ("prompts x max_tokens", f"{args.prompts} x {args.max_tokens} (greedy), median of {args.repeats} runs"),
        ("one at a time", f"{seq_tokens} tokens in {seq_s:.2f} s = {seq_tps:.0f} tokens/s"),
        (f"batched (batch {args.batch})", f"{bat_tokens} tokens in {bat_s:.2f} s = {bat_tps:.0f} tokens/s"),
        ("ratio batched / one at a time", f"**{bat_tps / seq_tps:.1f}x** (target >= 6x at batch 16 on CPU)"),
    ]
    emit("Local model: batched vs one at a time", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
