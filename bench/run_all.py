"""Run every benchmark and append its figures to bench/RESULTS.md: ``python bench/run_all.py``.

Each figure is a ratio against a baseline measured in the same run; none of this is a test.
Pass --quick for smaller sizes (a smoke check of the benchmarks themselves).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["bench_throughput.py"],                              # 1. async throughput vs raw AsyncOpenAI
    ["bench_sync.py"],                                    # 2. per-call overhead, sync
    ["bench_tracking.py", "--repeats", "5"],              # 3. tracking on vs off, 5,000 calls
    ["bench_tracking.py", "--calls", "1000", "--latency", "0.3", "--repeats", "3"],  #    same, at an API-like latency
    ["bench_startup.py"],                                 # 4. start-up vs a minimal script
    ["bench_memory.py"],                                  # 5. peak RSS, 10,000 prompts
    ["bench_local.py"],                                   # 6. local model, batched vs one at a time
    ["bench_faults.py"],                                  #    reliability figures
    ["bench_streaming.py"],                               # 7. TTFT and ITL against known truth, conc. 8 and 64
    ["bench_load.py"],                                    # 8. open-loop accuracy and highest sustained rate
    ["bench_workloads.py"],                               # 9. trace replay vs raw SDK; 1,000 sessions' memory
    ["bench_first_run.py"],                               # 10. torch threads; README's main command, quiet and busy
    ["bench_client_cost.py", "--peers"],                  # 11. CPU per request against nginx vs the raw SDK, AIPerf, GuideLLM
    ["bench_open_loop_peers.py"],                         # 12. open loop under overload, the same contenders
    ["bench_ttft_peers.py"],                              # 13. TTFT and ITL on GuideLLM's mock server, vs the peers
]
QUICK = [
    ["bench_throughput.py", "--calls", "200", "--repeats", "1", "--no-append"],
    ["bench_sync.py", "--calls", "100", "--repeats", "1", "--no-append"],
    ["bench_tracking.py", "--calls", "500", "--no-append"],
    ["bench_startup.py", "--repeats", "1", "--no-append"],
    ["bench_memory.py", "--prompts", "500", "--no-append"],
    ["bench_local.py", "--prompts", "16", "--repeats", "1", "--no-append"],
    ["bench_faults.py", "--prompts", "100", "--no-append"],
    ["bench_streaming.py", "--calls", "50", "--no-append"],
    ["bench_load.py", "--seconds", "2", "--step-seconds", "1", "--max-rate", "200", "--no-append"],
    ["bench_workloads.py", "--seconds", "5", "--rate", "50", "--users", "50", "--turns", "3", "--no-append"],
    ["bench_first_run.py", "--repeats", "1", "--no-append"],
    ["bench_client_cost.py", "--requests", "500", "--repeats", "1", "--no-append"],
]


def main() -> int:
    plan = QUICK if "--quick" in sys.argv else FULL
    failed = []
    for args in plan:
        print(f"== {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]]).returncode != 0:
            failed.append(args[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
