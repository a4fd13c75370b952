"""The pictures of docs/capacity.md, made offline on this machine against the loopback server.

    python bench/capacity_example.py [--root DIR] [--out docs]

A capacity search (``hydra/sweeper=capacity``) on a server that works on 4 requests at once, 0.1 s each
(40 requests/s), whose curve is ``docs/capacity_example.png``; then one overloaded run (60 requests/s)
with the over-saturation stop and the server's Prometheus endpoint scraped, whose ``timeline/*`` and
``server/*`` series, read back from MLflow, are drawn on one time axis in ``docs/timeline_example.png``,
and shown by MLflow's own metric page in ``docs/timeline_mlflow.png`` (headless Chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import loopback_server  # noqa: E402
from pikeclient.testing.server import free_port  # noqa: E402
from pikeclient.tracking.ui_check import find_chromium, mlflow_ui, screenshot  # noqa: E402

ENV = {**os.environ, "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(REPO)}


def run_py(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=root, env=ENV, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="capacity-example-"))
    root.mkdir(parents=True, exist_ok=True)
    with loopback_server(0.1, "--capacity", "4") as url:
        out = run_py(root, "-m", "hydra/sweeper=capacity", "llm=openai", f"llm.base_url={url}", "tracking.traces=false",
                     "hydra.sweeper.probe_s=4")
        print(next(line for line in out.splitlines() if line.startswith("capacity of")))
        [picture] = (root / "runs" / "multirun").rglob("capacity.png")
        shutil.copy(picture, args.out / "capacity_example.png")
        run_py(root, "llm=openai", f"llm.base_url={url}", f"server_metrics.url={url.removesuffix('/v1')}/metrics",
               "load=constant", "load.rate=60", "experiment.repeats=100000", "experiment.max_duration=20",
               "experiment.stop_when_saturated=true", "tracking.traces=false", "tracking.run_name=overloaded")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pikeclient").experiment_id
    [run] = client.search_runs([experiment], "attributes.run_name = 'overloaded'")
    timeline_picture(client, run.info.run_id, args.out / "timeline_example.png")
    timeline_screenshot(f"sqlite:///{root / 'runs' / 'mlflow.db'}", experiment, run.info.run_id,
                        args.out / "timeline_mlflow.png")
    print(f"pictures in {args.out}; runs in {root}")


def timeline_screenshot(uri: str, experiment: str, run_id: str, path: Path) -> None:
    """MLflow's own chart of the run's timeline and server series against the step (its metric page)."""
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium: no screenshot of MLflow")
        return
    keys = ["timeline/achieved_rate", "timeline/completed_rate", "timeline/in_flight", "server/requests_waiting",
            "server/requests_running"]

    def encoded(value: Any) -> str:
        return urllib.parse.quote(json.dumps(value, separators=(",", ":")), safe="")

    with mlflow_ui(uri, free_port()) as base:
        screenshot(f"{base}/#/metric/?runs={json.dumps([run_id])}&metric={encoded(keys[0])}"
                   f"&experiments={json.dumps([experiment])}&plot_metric_keys={encoded(keys)}&plot_layout={{}}"
                   "&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
                   "&last_linear_y_axis_range=[]", path, chromium)


def timeline_picture(client: Any, run_id: str, path: Path) -> None:
    """The run's timeline/* and server/* series as MLflow holds them (step = seconds since the start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        return [s for s, _ in points], [v for _, v in points]

    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    panels = ((axes[0], ("timeline/achieved_rate", "timeline/completed_rate"), "per second"),
              (axes[1], ("timeline/latency_p50", "timeline/latency_p99"), "latency (s)"),
              (axes[2], ("timeline/in_flight", "server/requests_running", "server/requests_waiting"), "requests"))
    for ax, keys, label in panels:
        for key in keys:
            ax.plot(*series(key), marker=".", label=key)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title("60 requests/s asked of a 40/s server: stopped as over-saturated", fontsize=9)
    axes[2].set_xlabel("seconds since the start (the metrics' step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
