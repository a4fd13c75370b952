"""Compare runs: ``python -m pikeclient.tracking.report [--sweep latest|RUN_ID] [--plot report.png]``.

Reads the runs of an experiment (or of one sweep) from the tracking store, prints one row per run
(the parameters that differ between runs, backend, model, calls, errors, latency p50 with its 95%
interval and p95, TTFT/ITL/TPOT when streamed, requested and achieved rate, SLO attainment and goodput,
tokens and who counted them, tokens/s, cost; ranked by goodput when SLOs were set) and draws a PNG:
median latency against output tokens per second per run, and the per-call latency distributions.
``--curve`` draws a saturation sweep (``load.rate=1,2,4,...``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pikeclient.config.schema import default_tracking_uri, is_server_uri
from pikeclient.core.errors import ConfigError
from pikeclient.tracking.remote import check_reachable


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
    token_basis: str = "-"
    ttft: float | None = None  # streaming runs only: TTFT p50 (s), ITL and TPOT p50 (ms)
    itl_ms: float | None = None
    tpot_ms: float | None = None
    p99: float | None = None
    requested_rate: float | None = None  # open-loop runs: asked and achieved requests per second
    achieved_rate: float | None = None
    goodput: float | None = None  # runs with SLOs: calls meeting them per second
    slo_attainment: float | None = None
    p50_ci: tuple[float, float] | None = None  # 95% bootstrap interval of the p50 latency
    params: dict[str, str] = field(default_factory=dict, compare=False)
    label: str = ""  # what tells this run from the others (see label_rows)


WIDTH = 100  # the table fits a terminal of this many columns
# Parameters that differ from run to run without describing the setup.
# (client.* and llm._target_: the backend and model columns say them.)
_NOT_SETUP = ("tracking.run_name", "paths.", "cache.path", "client.", "experiment.resume", "llm._target_")


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
        tokens_per_s=m.get("output_tokens_per_s"), cost=cost, params=dict(p),
        token_basis=t.get("pikeclient.token_basis", "-"),
        ttft=m.get("ttft_s_p50"), itl_ms=_ms(m.get("itl_s_p50")), tpot_ms=_ms(m.get("tpot_s_p50")),
        p99=m.get("latency_s_p99"), requested_rate=m.get("requested_rate"), achieved_rate=m.get("achieved_rate"),
        goodput=m.get("goodput"), slo_attainment=m.get("slo_attainment"),
        p50_ci=(m["latency_s_p50_ci_low"], m["latency_s_p50_ci_high"]) if "latency_s_p50_ci_low" in m else None,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def label_rows(rows: Sequence[Row]) -> list[Row]:
    """Label each run by the parameters whose values differ between the runs (all runs alike: the name)."""
    keys = sorted({k for r in rows for k in r.params} - {k for k in _common_keys(rows)})
    keys = [k for k in keys if not k.startswith(_NOT_SETUP)]
    labelled = []
    for row in rows:
        label = " ".join(f"{_short_key(k, keys)}={row.params.get(k, '-')}" for k in keys)
        labelled.append(replace(row, label=label or row.name))
    return labelled


def _common_keys(rows: Sequence[Row]) -> set[str]:
    """Parameters every run has with the same value."""
    if not rows:
        return set()
    first = rows[0].params
    return {k for k, v in first.items() if all(r.params.get(k) == v for r in rows[1:])}


def _short_key(key: str, keys: Sequence[str]) -> str:
    """``sampling.temperature`` -> ``temperature`` when no other differing key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def format_table(rows: Sequence[Row], width: int = WIDTH) -> str:
    """One line per run, at most ``width`` columns (the run label, then the model, give way first).

    A second table, keyed by ``#``, holds what only some runs have: the p50's 95% interval, TTFT, ITL
    and TPOT (streaming), requested and achieved rate (open loop), SLO attainment and goodput, and who
    counted the tokens when it was not the server.
    """

    def fmt(value: float | int | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = label_rows(rows)
    headers = ["#", "run", "backend", "model", "calls", "err", "p50 s", "p95 s", "tokens", "tok/s", "cost"]
    body = [[str(i), r.label, r.backend, r.model.rsplit("/", 1)[-1], str(r.calls), str(r.errors), fmt(r.p50, ".3f"),
             fmt(r.p95, ".3f"), fmt(r.tokens, "d"), fmt(r.tokens_per_s, ".1f"), r.cost]
            for i, r in enumerate(rows, start=1)]
    currencies = {c.split()[-1] for c in (line[-1] for line in body) if c != "-"}
    if len(currencies) == 1:  # one currency: said once, in the header
        (currency,) = currencies
        headers[-1] = f"cost {currency}"
        for line in body:
            line[-1] = line[-1].removesuffix(f" {currency}")
    tables = [_grid(headers, body, width, squeeze=((1, 16), (3, 12)))]
    extra = [  # (header, cell) for the columns some run has
        ("p50 95% CI", lambda r: f"[{r.p50_ci[0]:.3f}, {r.p50_ci[1]:.3f}]" if r.p50_ci else "-", "p50_ci"),
        ("ttft s", lambda r: fmt(r.ttft, ".3f"), "ttft"), ("itl ms", lambda r: fmt(r.itl_ms, ".1f"), "itl_ms"),
        ("tpot ms", lambda r: fmt(r.tpot_ms, ".1f"), "tpot_ms"),
        ("rate/s", lambda r: fmt(r.requested_rate, "g"), "requested_rate"),
        ("got/s", lambda r: fmt(r.achieved_rate, ".2f"), "achieved_rate"),
        ("slo met", lambda r: fmt(r.slo_attainment, ".0%"), "slo_attainment"),
        ("goodput", lambda r: fmt(r.goodput, ".2f"), "goodput"),
    ]
    present = [(h, cell) for h, cell, attr in extra if any(getattr(r, attr) is not None for r in rows)]
    if any(r.token_basis not in ("server", "-") for r in rows):
        present.append(("tokens counted by", lambda r: r.token_basis))
    if present:
        tables.append(_grid(["#", *(h for h, _ in present)],
                            [[str(i), *(cell(r) for _, cell in present)] for i, r in enumerate(rows, start=1)],
                            width, squeeze=()))
    return "\n\n".join(tables)


def _grid(headers: Sequence[str], body: Sequence[Sequence[str]], width: int,
          squeeze: Sequence[tuple[int, int]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    for column, least in squeeze:
        excess = sum(widths) + len(widths) - 1 - width
        if excess > 0:
            widths[column] = max(least, widths[column] - excess)
    lines = [" ".join(h.ljust(w) for h, w in zip(headers, widths)), " ".join("-" * w for w in widths)]
    lines += [" ".join(_cut(c, w).ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(line.rstrip() for line in lines)


def rank_by_goodput(rows: Sequence[Row]) -> list[Row]:
    """With SLOs set, the best backend first: most calls meeting the SLOs per second."""
    if not any(r.goodput is not None for r in rows):
        return list(rows)
    return sorted(rows, key=lambda r: -(r.goodput or 0.0))


def saturation_curve(rows: Sequence[Row], path: Path) -> Path:
    """A saturation sweep's curve: achieved throughput against latency p50/p99 and TTFT, one line per
    backend, with a mark where p50 latency first exceeds twice its value at the lowest rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[Row]] = {}
    for row in rows:
        if row.achieved_rate is not None and row.p50 is not None:
            lines.setdefault(f"{row.backend} {_short(row.model, 24)}", []).append(row)
    fig, (lat, first) = plt.subplots(1, 2, figsize=(12, 5))
    for label, points in lines.items():
        points.sort(key=lambda r: r.requested_rate or r.achieved_rate or 0.0)
        x = [r.achieved_rate for r in points]
        (line,) = lat.plot(x, [r.p50 for r in points], marker="o", label=f"{label} p50")
        lat.plot(x, [r.p99 if r.p99 is not None else float("nan") for r in points], marker="x", linestyle="--",
                 color=line.get_color(), label=f"{label} p99")
        knee = next((r for r in points[1:] if r.p50 > 2 * points[0].p50), None)
        if knee is not None:
            lat.axvline(knee.achieved_rate, color=line.get_color(), linestyle=":", alpha=0.7)
            lat.annotate("2x low-load p50", (knee.achieved_rate, knee.p50), fontsize=8, xytext=(5, -12),
                         textcoords="offset points")
        if any(r.ttft is not None for r in points):
            first.plot(x, [r.ttft if r.ttft is not None else float("nan") for r in points], marker="o", label=label)
    lat.set(xlabel="achieved requests / s", ylabel="latency (s)", title="Saturation: latency vs throughput")
    lat.set_ylim(bottom=0)
    first.set(xlabel="achieved requests / s", ylabel="TTFT p50 (s)", title="Time to first token vs throughput")
    first.set_ylim(bottom=0)
    for axis in (lat, first):
        if axis.lines:
            axis.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _cut(text: str, width: int) -> str:
    """Cut at the end, marked with ``~``: a label's first parameters already tell the runs apart."""
    return text if len(text) <= width else text[: width - 1] + "~"


def plot(client: MlflowClient, rows: Sequence[Row], path: Path) -> Path:
    """Left: median latency vs output tokens/s per run. Right: per-call latency per run (box plot)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for index, row in enumerate(label_rows(rows), start=1):  # "#" labels match the table's first column
        if row.p50 is not None and row.tokens_per_s is not None:
            left.scatter(row.tokens_per_s, row.p50, s=60, label=f"#{index} {_cut(row.label, 60)}")
            left.annotate(f"#{index}", (row.tokens_per_s, row.p50), fontsize=9, xytext=(5, 5),
                          textcoords="offset points")
    if rows:
        left.legend(fontsize=7, loc="best")
    left.set(xlabel="output tokens / s (run)", ylabel="latency p50 (s)", title="Throughput vs latency per run")
    left.set_ylim(bottom=0)  # latencies compared from zero, not from the fastest run
    left.set_xlim(left=0)
    series = [[m.value for m in client.get_metric_history(r.run_id, "call_latency_s")] for r in rows]
    right.boxplot(series, showfliers=True)
    right.set_xticks(range(1, len(rows) + 1), [f"#{i}" for i in range(1, len(rows) + 1)])
    right.set(ylabel="latency per call (s)", title="Latency distribution per run")
    right.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pikeclient.tracking.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--experiment", default="pikeclient")
    parser.add_argument("--sweep", help="a sweep's parent run id, or 'latest'; default: every run")
    parser.add_argument("--plot", type=Path, help="write the PNG here (e.g. runs/report.png)")
    parser.add_argument("--curve", type=Path, help="a saturation sweep's curve (load.rate=...): write it here")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri("runs")
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise ConfigError(f"no tracking store at {uri}: run an experiment first, or pass --tracking-uri")
        if is_server_uri(uri):
            check_reachable(uri)  # seconds, not MLflow's minutes of HTTP retries
        client = MlflowClient(tracking_uri=uri)
        rows = rank_by_goodput([to_row(run) for run in find_runs(client, args.experiment, args.sweep)])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.plot:
        print(f"plot: {plot(client, rows, args.plot)}")
    if args.curve:
        print(f"saturation curve: {saturation_curve(rows, args.curve)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
