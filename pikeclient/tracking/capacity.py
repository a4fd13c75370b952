"""A capacity search's answer in MLflow: metrics, the probes table and the curve, on the sweep's parent run.

Written by the capacity sweeper (``hydra_plugins.pikeclient_capacity``) once its probes are done; each
probe is a child run of the same parent, logged by the probe's own run as any sweep job is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

PROBES_TABLE = "capacity_probes.json"
PICTURE = "capacity.png"


def write_probes_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The probes as MLflow's table format (columns and data), which its UI shows as a table."""
    columns = list(rows[0]) if rows else []
    path.write_text(json.dumps({"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]},
                               default=str))
    return path


def capacity_picture(searches: Mapping[str, tuple[Sequence[Mapping[str, Any]], Mapping[str, float]]],
                     path: Path) -> Path:
    """Per search (label -> (probe rows, answer metrics)): the rate asked for against the answers per second
    (top) and the latency p50 and p90 (bottom), kept-up probes filled, the others hollow; the answer a
    vertical line, its bracket a shaded band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for index, (label, (rows, answer)) in enumerate(searches.items()):
        color = f"C{index}"
        rated = sorted((r for r in rows if r.get("rate")), key=lambda r: r["rate"])
        for axes, key, style in ((top, "requests_per_s", "-"), (bottom, "latency_p50", "-"), (bottom, "latency_p90", ":")):
            points = [(r["rate"], r[key]) for r in rated if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points), style, color=color, linewidth=1,
                          label=f"{label} {key.replace('_', ' ')}" if axes is bottom or key == "requests_per_s" else None)
            for r in rated:
                if r.get(key) is not None:
                    axes.plot(r["rate"], r[key], "o", color=color, markerfacecolor=color if r["kept_up"] else "white")
        rate = answer.get("capacity/rate")
        if rate is not None:
            for axes in (top, bottom):
                axes.axvline(rate, color=color, linewidth=1.5)
                if answer.get("capacity/rate_ci_high") is not None:
                    axes.axvspan(rate, answer["capacity/rate_ci_high"], color=color, alpha=0.15)
        if rated:
            top.plot([0, rated[-1]["rate"]], [0, rated[-1]["rate"]], "--", color="grey", linewidth=0.8)
    top.set_ylabel("answers per second")
    top.set_title("capacity search: filled = kept up, line = capacity, band = its bracket", fontsize=9)
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("requests per second asked for")
    for axes in (top, bottom):
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_capacity(parent: Mapping[str, str], metrics: Mapping[str, float], tags: Mapping[str, str],
                 files: Sequence[Path]) -> None:
    """The answer on the sweep's parent run: metrics, tags, the probes table (listed as a table) and the
    picture."""
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    now = int(time.time() * 1000)
    client.log_batch(parent["run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in {
                         **tags, MLFLOW_LOGGED_ARTIFACTS: json.dumps([{"path": PROBES_TABLE, "type": "table"}])}.items()])
    for path in files:
        client.log_artifact(parent["run_id"], str(path))
