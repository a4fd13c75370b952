"""Parallel sweeps: an 8-job sweep's wall time with the joblib launcher at 1 and at 4 jobs at a time.

    python bench/bench_sweep_parallel.py [--tracking-uri http://127.0.0.1:5000] [--jobs 8] [--parallel 4]
        [--prompts 20] [--latency 0.5] [--concurrency 2] [--no-append]

Each job sends ``--prompts`` calls to the loopback server (``--latency`` s each, ``--concurrency`` in
flight), so a job waits on the API as a real one does; the sweep's whole-process wall time is measured,
and the parent and children it left in the tracking store are counted. Default store: a fresh sqlite
file; pass a tracking server (e.g. one on PostgreSQL, see README "Team setup") to measure against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, loopback_server, ratio, write_prompts  # noqa: E402
from bench._report import command_line, emit  # noqa: E402


def sweep(n_jobs: int, args, url: str, uri: str, experiment: str, cwd: Path) -> float:
    temperatures = ",".join(f"{i / 10:.1f}" for i in range(args.jobs))
    command = [sys.executable, str(REPO / "run.py"), "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}",
               "llm=openai", f"llm.base_url={url}", f"sampling.temperature={temperatures}",
               f"dataset.path={cwd / 'prompts.jsonl'}", f"experiment.concurrency={args.concurrency}",
               "cache.mode=off", f"tracking.tracking_uri={uri}", f"tracking.experiment_name={experiment}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OPENAI_API_KEY": API_KEY}
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def recorded(uri: str, experiment: str) -> tuple[int, int]:
    """(parents, children) in the experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pikeclient.role") == "sweep"]
    return len(parents), len(runs) - len(parents)


def main() -> None:
    parser = command_line(__doc__, jobs=8, parallel=4, prompts=20, latency=0.5, concurrency=2)
    parser.add_argument("--tracking-uri", help="default: a fresh sqlite store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, loopback_server(args.latency) as url:
        cwd = Path(tmp)
        write_prompts(cwd / "prompts.jsonl", args.prompts)
        uri = args.tracking_uri or f"sqlite:///{cwd / 'mlflow.db'}"
        rows = []
        walls = {}
        for n_jobs in (1, args.parallel):
            experiment = f"bench-sweep-{n_jobs}-{uuid.uuid4().hex[:6]}"
            walls[n_jobs] = sweep(n_jobs, args, url, uri, experiment, cwd)
            parents, children = recorded(uri, experiment)
            rows.append((f"{args.jobs}-job sweep, n_jobs={n_jobs}: wall s (parents / children recorded)",
                         f"{walls[n_jobs]:.1f} ({parents} / {children})"))
        rows.append((f"wall n_jobs={args.parallel} / n_jobs=1", ratio(walls[args.parallel], walls[1])))
        rows.append(("store", uri.split("://")[0] + (" (tracking server)" if uri.startswith("http") else "")))
        rows.append(("per job", f"{args.prompts} calls, {args.latency} s latency, {args.concurrency} in flight"))
    emit("Parallel sweep (joblib launcher)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
