"""Compare runs: ``python -m pikeclient.report [--sweep latest|RUN_ID] [--plot report.png]``.

Reads the runs of an experiment (or of one sweep) from the tracking store, prints one row per run
(backend, model, sampling, calls, errors, latency p50/p95, tokens, tokens/s, cost) and draws a PNG:
median latency against output tokens per second per run, and the per-call latency distributions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pikeclient.errors import ConfigError
from pikeclient.config import default_tracking_uri
from pikeclient.remote import check_reachable, is_server_uri


@dataclass(frozen=True)
class Row:
    run_id: str
    name: str
    backend: str
    model: str
    sampling: str
    calls: int
    errors: int
    p50: float | None
    p95: float | None
    tokens: int | None
    tokens_per_s: float | None
    cost: str


def find_runs(client: MlflowClient, experiment: str, sweep: str | None) -> list[Run]:
    """The job runs of ``experiment``; with ``sweep``, only the children of that parent ("latest" works)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no experiment {experiment!r} in {client.tracking_uri}")
    if sweep is None:
        return [r for r in client.search_runs([exp.experiment_id], "", order_by=["attributes.start_time ASC"])
                if r.data.tags.get("pikeclient.role") != "sweep"]
    if sweep == "latest":
        parents = client.search_runs([exp.experiment_id], "tags.`pikeclient.role` = 'sweep'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ConfigError(f"no sweep in experiment {experiment!r}")
        sweep = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{sweep}'",
                                  order_by=["attributes.start_time ASC"])
    if not children:
        raise ConfigError(f"sweep run {sweep} has no child runs")
    return children


def to_row(run: Run) -> Row:
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    cost = next((f"{v:.4f} {k.removeprefix('cost_').upper()}" for k, v in m.items() if k.startswith("cost_")), "-")
    sampling = f"T={p.get('sampling.temperature', '?')} top_p={p.get('sampling.top_p', '?')}"
    return Row(
        run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
        backend=t.get("pikeclient.provider", "?"), model=t.get("pikeclient.model", "?"), sampling=sampling,
        calls=int(m.get("calls", 0)), errors=int(m.get("errors", 0)),
        p50=m.get("latency_s_p50"), p95=m.get("latency_s_p95"),
        tokens=int(m["total_tokens"]) if "total_tokens" in m else None,
        tokens_per_s=m.get("output_tokens_per_s"), cost=cost,
    )


def format_table(rows: Sequence[Row]) -> str:
    headers = ["#", "run", "backend", "model", "sampling", "calls", "errors", "p50 s", "p95 s", "tokens", "tok/s", "cost"]

    def fmt(value: float | int | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    body = [[str(i), r.name, r.backend, _short(r.model), r.sampling, str(r.calls), str(r.errors), fmt(r.p50, ".3f"),
             fmt(r.p95, ".3f"), fmt(r.tokens, "d"), fmt(r.tokens_per_s, ".1f"), r.cost]
            for i, r in enumerate(rows, start=1)]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def plot(client: MlflowClient, rows: Sequence[Row], path: Path) -> Path:
    """Left: median latency vs output tokens/s per run. Right: per-call latency per run (box plot)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for index, row in enumerate(rows, start=1):  # "#" labels match the table's first column
        if row.p50 is not None and row.tokens_per_s is not None:
            left.scatter(row.tokens_per_s, row.p50, s=60, label=f"#{index} {_short(row.name, 48)}")
            left.annotate(f"#{index}", (row.tokens_per_s, row.p50), fontsize=9, xytext=(5, 5),
                          textcoords="offset points")
    if rows:
        left.legend(fontsize=7, loc="best")
    left.set(xlabel="output tokens / s (run)", ylabel="latency p50 (s)", title="Throughput vs latency per run")
    series = [[m.value for m in client.get_metric_history(r.run_id, "call_latency_s")] for r in rows]
    right.boxplot(series, showfliers=True)
    right.set_xticks(range(1, len(rows) + 1), [f"#{i}" for i in range(1, len(rows) + 1)])
    right.set(ylabel="latency per call (s)", title="Latency distribution per run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pikeclient.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--experiment", default="pikeclient")
    parser.add_argument("--sweep", help="a sweep's parent run id, or 'latest'; default: every run")
    parser.add_argument("--plot", type=Path, help="write the PNG here (e.g. runs/report.png)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri("runs")
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise ConfigError(f"no tracking store at {uri}: run an experiment first, or pass --tracking-uri")
        if is_server_uri(uri):
            check_reachable(uri)  # seconds, not MLflow's minutes of HTTP retries
        client = MlflowClient(tracking_uri=uri)
        rows = [to_row(run) for run in find_runs(client, args.experiment, args.sweep)]
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.plot:
        print(f"plot: {plot(client, rows, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
