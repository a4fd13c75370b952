"""Per-call overhead, sync: 500 sequential calls at zero server latency, pikeclient vs the raw SDK.

    python bench/bench_sync.py [--calls 500] [--no-append]

pikeclient's ``generate`` (retry, token usage, timing) against ``openai.OpenAI().chat.completions.create``
with the same request body, one after another on the same loopback server process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from bench._common import API_KEY, interleaved_medians, loopback_server, ratio  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.backends.openai import OpenAIClient  # noqa: E402


def raw(url: str, calls: int) -> float:
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    start = time.perf_counter()
    for i in range(calls):
        r = client.chat.completions.create(model="gpt-4o-mini", max_tokens=64, temperature=0.0, top_p=1.0,
                                           messages=[{"role": "user", "content": f"prompt {i}"}])
        assert r.choices[0].message.content
    wall = time.perf_counter() - start
    client.close()
    return wall


def pike(url: str, calls: int) -> float:
    import os

    os.environ.setdefault("OPENAI_API_KEY", API_KEY)
    client = OpenAIClient(model="gpt-4o-mini", base_url=url, sampling={"max_tokens": 64})
    start = time.perf_counter()
    for i in range(calls):
        assert client.generate(f"prompt {i}")
    wall = time.perf_counter() - start
    client.close()
    return wall


def main() -> None:
    args = command_line(__doc__, calls=500, repeats=9).parse_args()
    with loopback_server(0.0) as url:
        raw(url, 50), pike(url, 50)  # warm: connections, encoders, imports
        med = interleaved_medians({"raw openai.OpenAI": lambda: raw(url, args.calls),
                                   "pikeclient generate": lambda: pike(url, args.calls)}, args.repeats)
    base = med["raw openai.OpenAI"]
    rows = [("calls (sequential, zero latency)", str(args.calls))]
    rows += [(k, f"{v:.2f} s = {v / args.calls * 1000:.2f} ms/call ({ratio(v, base)})") for k, v in med.items()]
    rows.append(("target", "pikeclient <= 1.10x raw SDK"))
    emit(f"Per-call overhead, sync ({args.calls} calls); median of {args.repeats}", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
