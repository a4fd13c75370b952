"""Tracking overhead: a 5,000-call run at zero server latency, tracking off vs on (traces off and on).

    python bench/bench_tracking.py [--calls 5000] [--latency 0] [--no-append]

Each variant is a whole ``run_experiment`` (calls, records, MLflow logging) in a fresh process against
the same loopback server process; the figure is wall time against the tracking-off run.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, interleaved_medians, loopback_server, ratio, write_prompts  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

VARIANTS = {
    "tracking off": ["tracking=none"],
    "tracking on, traces off": ["tracking.traces=false"],
    "tracking on, traces on": ["tracking.traces=true"],
}

CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from bench._common import compose_config
from pikeclient.run.experiment import run_experiment
runs = Path(sys.argv[1]); overrides = json.loads(sys.argv[2])
cfg = compose_config(*overrides, runs_dir=runs)
start = time.perf_counter()
run_experiment(cfg, runs / "out")
print(json.dumps({{"wall_s": time.perf_counter() - start}}))
"""


def run_variant(url: str, dataset: Path, overrides: list[str], concurrency: int, runs: Path) -> float:
    """One whole run in a fresh process; all variants share ``runs`` (one MLflow store, as users do)."""
    args = ["llm=openai", f"llm.base_url={url}", f"dataset.path={dataset}", "retry.initial_delay=0.01", "cache.mode=off",
            f"load.concurrency={concurrency}", *overrides]
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(runs), json.dumps(args)],
                         capture_output=True, text=True, env={"OPENAI_API_KEY": API_KEY, "PATH": ""})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["wall_s"]


def main() -> None:
    args = command_line(__doc__, calls=5000, latency=0.0, concurrency=32, repeats=1).parse_args()
    with tempfile.TemporaryDirectory() as tmp, loopback_server(args.latency) as url:
        runs = Path(tmp) / "runs"
        dataset = write_prompts(Path(tmp) / "prompts.jsonl", args.calls)
        # Creates the store (MLflow's first use builds ~60 tables: once per store, not per run).
        run_variant(url, dataset, ["dataset.limit=200"], args.concurrency, runs)
        variants = {name: functools.partial(run_variant, url, dataset, overrides, args.concurrency, runs)
                    for name, overrides in VARIANTS.items()}
        walls = interleaved_medians(variants, args.repeats)
    base = walls["tracking off"]
    rows = [("calls, server latency, concurrency", f"{args.calls}, {args.latency:g} s, {args.concurrency}"),
            ("repeats (median shown)", str(args.repeats))]
    rows += [(name, f"{wall:.2f} s ({ratio(wall, base)})") for name, wall in walls.items()]
    rows.append(("target", "tracking on <= 1.10x tracking off"))
    emit(f"Tracking overhead ({args.calls} calls, latency {args.latency:g} s)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
