"""Fault figures: a 1,000-prompt run against a flaky, rate-limited loopback endpoint.

    python bench/bench_faults.py [--prompts 1000] [--no-append]

Faults per request: 20% 429 with Retry-After 1 s, 5% 500, 3% dropped connections, 2% hangs (longer
than the 5 s attempt timeout). Reports prompts answered and failed by class, total attempts, duplicates
(requests beyond a prompt's recorded attempts, and prompts with more than one record: both must be 0)
and wall time. Measured server-side, from the server's own request log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, write_prompts  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.testing.server import FakeLLMServer, FaultPlan  # noqa: E402


def main() -> None:
    args = command_line(__doc__, prompts=1000, concurrency=32).parse_args()
    faults = FaultPlan(rates={"429": 0.20, "500": 0.05, "drop": 0.03, "hang": 0.02}, retry_after=1.0, hang_s=30)
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer(api_key=API_KEY, faults=faults) as server:
        dataset = write_prompts(Path(tmp) / "prompts.jsonl", args.prompts)
        command = [sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={server.url}/v1",
                   f"dataset.path={dataset}", "llm.timeout=5", f"load.concurrency={args.concurrency}",
                   "retry.max_attempts=6", "tracking=none", "cache.mode=off"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True,
                              env={**os.environ, "OPENAI_API_KEY": API_KEY})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        [path] = Path(tmp, "runs").rglob("records.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines()]
        log = list(server.log)
    sent = Counter(r.prompt for r in log)
    extra_requests = sum(max(0, sent[r["prompt"]] - r["attempts"]) for r in records)
    duplicate_records = len(records) - len({r["id"] for r in records})
    failed = Counter(r["error_kind"] for r in records if r["error"])
    faults_seen = Counter(r.fault or "ok" for r in log)
    rows = [
        ("prompts", str(args.prompts)),
        ("faults per request", "20% 429 (Retry-After 1 s), 5% 500, 3% drop, 2% hang; timeout 5 s, 6 attempts"),
        ("answered", str(sum(1 for r in records if r["error"] is None))),
        ("failed by class", ", ".join(f"{k}={v}" for k, v in sorted(failed.items())) or "none"),
        ("records", f"{len(records)} (one per prompt: {len(records) == args.prompts and not duplicate_records})"),
        ("total attempts (records) / requests (server)", f"{sum(r['attempts'] for r in records)} / {len(log)}"),
        ("faults the server injected", ", ".join(f"{k}={v}" for k, v in sorted(faults_seen.items()))),
        ("duplicates", f"{extra_requests} extra requests, {duplicate_records} extra records"),
        ("wall time", f"{wall:.1f} s (process start to exit, concurrency {args.concurrency})"),
    ]
    emit(f"Fault run ({args.prompts} prompts)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
