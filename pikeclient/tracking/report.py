"""Compare runs: ``python -m pikeclient.tracking.report [--sweep latest|RUN_ID] [--plot report.png] [--format csv]``.

Reads the runs of an experiment (or of one sweep) from the tracking store and prints one row per run:
what tells the run apart (the sweep's own overrides first, then other settings that differ), backend,
model, calls, errors, latency p50 (with its 95% interval) and p95, TTFT/ITL/TPOT when streamed, requested
and completed rate, SLO attainment and goodput, tokens and who counted them, tokens/s, cost, and the
answers' quality (answers right, each scorer's mean); ranked by goodput when SLOs were set.
``--format csv|json`` prints the same rows for other tools; ``--plot``, ``--curve`` and ``--quality`` draw
them (``pikeclient.tracking.plots``); ``--compare A B`` compares two runs call by call
(``pikeclient.tracking.compare_runs``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pikeclient.config.schema import default_tracking_uri, is_server_uri
from pikeclient.core.errors import ConfigError
from pikeclient.eval.summary import scorer_names
from pikeclient.tracking.remote import check_reachable


@dataclass(frozen=True)
class Row:
    run_id: str
    name: str
    backend: str
    model: str
    calls: int
    errors: int
    p50: float | None
    p95: float | None
    tokens: int | None
    tokens_per_s: float | None
    cost: float | None = None
    currency: str = ""
    token_basis: str = "-"
    ttft: float | None = None  # streaming runs only: TTFT p50 (s), ITL and TPOT p50 (ms)
    itl_ms: float | None = None
    tpot_ms: float | None = None
    p99: float | None = None
    requested_rate: float | None = None  # open-loop runs: the rate asked for (requests/s)
    sent_rate: float | None = None  # how fast requests went out
    completed_rate: float | None = None  # how fast answers came back: the run's throughput
    goodput: float | None = None  # runs with SLOs: calls meeting them per second
    slo_attainment: float | None = None
    p50_ci: tuple[float, float] | None = None  # 95% bootstrap interval of the p50 latency
    swept: tuple[str, ...] = ()  # the keys the run's sweep varied
    params: dict[str, str] = field(default_factory=dict, compare=False)
    choices: dict[str, str] = field(default_factory=dict, compare=False)  # Hydra group choices (llm=openai)
    label: str = ""  # what tells this run from the others (see label_rows)
    measured: int = 0  # answered, measured calls (what the cost paid for)
    quality: dict[str, float] = field(default_factory=dict, compare=False)  # scorer -> mean
    pass_rate: float | None = None  # answers right among those graded pass/fail
    pass_rate_ci: tuple[float, float] | None = None
    passed: int | None = None
    graded: int | None = None


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
    cost = next(((k.removeprefix("Cost/").upper(), v) for k, v in m.items() if k.startswith("Cost/")), None)
    return Row(
        run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
        backend=t.get("pikeclient.provider", "?"), model=t.get("pikeclient.model", "?"),
        calls=int(m.get("calls/total", 0)), errors=int(m.get("Errors/count", 0)),
        p50=m.get("Latency/p50"), p95=m.get("Latency/p95"),
        tokens=int(m["tokens/total"]) if "tokens/total" in m else None,
        tokens_per_s=m.get("Throughput/output_tokens_per_s"),
        cost=cost[1] if cost else None, currency=cost[0] if cost else "",
        token_basis=t.get("pikeclient.token_basis", "-"),
        ttft=m.get("TTFT/p50"), itl_ms=_ms(m.get("ITL/p50")), tpot_ms=_ms(m.get("TPOT/p50")),
        p99=m.get("Latency/p99"), requested_rate=m.get("Throughput/requested_rate"),
        sent_rate=m.get("Throughput/achieved_rate"), completed_rate=m.get("Throughput/requests_per_s"),
        goodput=m.get("SLO/goodput"), slo_attainment=m.get("SLO/attainment"),
        p50_ci=(m["Latency/p50_ci_low"], m["Latency/p50_ci_high"]) if "Latency/p50_ci_low" in m else None,
        swept=tuple(k for k in t.get("pikeclient.swept", "").split(",") if k),
        params=dict(p), choices={k.removeprefix("pikeclient.choice."): v for k, v in t.items()
                                 if k.startswith("pikeclient.choice.")},
        measured=int(m.get("calls/measured", 0)),
        quality={name: m[f"{name}/mean"] for name in scorer_names(m) if f"{name}/mean" in m},
        pass_rate=m.get("quality/pass_rate"),
        pass_rate_ci=((m["quality/pass_rate_ci_low"], m["quality/pass_rate_ci_high"])
                      if "quality/pass_rate_ci_low" in m else None),
        passed=int(m["quality/passed"]) if "quality/passed" in m else None,
        graded=int(m["quality/passed"] + m["quality/failed"]) if "quality/passed" in m else None,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def label_rows(rows: Sequence[Row]) -> list[Row]:
    """Label each run by what tells it apart: the keys its sweep varied first (``llm=openai
    temperature=0.7``), then other settings whose values differ between the runs. Settings of a swept
    group (``llm.api_key_env`` when ``llm=azure_openai,openai`` was swept) follow from the choice and say
    nothing more, unless swept themselves. All runs alike: their names."""
    swept = [k for k in dict.fromkeys(k for r in rows for k in r.swept) if len({_value(r, k) for r in rows}) > 1]
    groups = tuple(f"{k}." for k in swept if any(k in r.choices for r in rows))
    keys = sorted({k for r in rows for k in r.params} - _common_keys(rows) - set(swept))
    keys = [k for k in keys if not k.startswith(_NOT_SETUP) and not (groups and k.startswith(groups))]
    ordered = swept + keys
    labelled = []
    for row in rows:
        label = " ".join(f"{_short_key(k, ordered)}={_value(row, k)}" for k in ordered)
        labelled.append(replace(row, label=label or row.name))
    return labelled


def _value(row: Row, key: str) -> str:
    return row.params.get(key) or row.choices.get(key) or "-"


def _common_keys(rows: Sequence[Row]) -> set[str]:
    """Parameters every run has with the same value."""
    if not rows:
        return set()
    first = rows[0].params
    return {k for k, v in first.items() if all(r.params.get(k) == v for r in rows[1:])}


def _short_key(key: str, keys: Sequence[str]) -> str:
    """``sampling.temperature`` -> ``temperature`` when no other key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def format_table(rows: Sequence[Row], width: int = WIDTH) -> str:
    """One line per run, at most ``width`` columns. A label that does not fit its column is never cut:
    the table then shows ``#`` only and lists the labels in full below it.

    A second table, keyed by ``#``, holds what only some runs have: the p50's 95% interval, TTFT, ITL
    and TPOT (streaming), requested, sent and completed rate (open loop), SLO attainment and goodput,
    and who counted the tokens when it was not the server.
    """

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = label_rows(rows)
    currencies = {r.currency for r in rows if r.cost is not None}
    cost_header = f"cost {currencies.pop()}" if len(currencies) == 1 else "cost"
    headers = ["#", "run", "backend", "model", "calls", "err", "p50 s", "p95 s", "tokens", "tok/s", cost_header]
    body = [[str(i), r.label, r.backend, r.model.rsplit("/", 1)[-1], str(r.calls), str(r.errors), fmt(r.p50, ".3f"),
             fmt(r.p95, ".3f"), fmt(r.tokens, "d"), fmt(r.tokens_per_s, ".1f"),
             "-" if r.cost is None else f"{r.cost:.4f}" + (f" {r.currency}" if cost_header == "cost" else "")]
            for i, r in enumerate(rows, start=1)]
    others = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers) if i != 1]
    room = width - sum(others) - len(headers) + 1
    labels = ""
    if max(len(r.label) for r in rows) > max(room, len("run")):
        del headers[1]
        for line in body:
            del line[1]
        labels = "\n".join(textwrap.fill(f"#{i}  {r.label}", width, subsequent_indent="     ")
                           for i, r in enumerate(rows, start=1))
    tables = [_grid(headers, body, width)]
    extra = [  # (header, cell) for the columns some run has
        ("p50 95% CI", lambda r: f"[{r.p50_ci[0]:.3f}, {r.p50_ci[1]:.3f}]" if r.p50_ci else "-", "p50_ci"),
        ("ttft s", lambda r: fmt(r.ttft, ".3f"), "ttft"), ("itl ms", lambda r: fmt(r.itl_ms, ".2f"), "itl_ms"),
        ("tpot ms", lambda r: fmt(r.tpot_ms, ".2f"), "tpot_ms"),
        ("asked/s", lambda r: fmt(r.requested_rate, "g"), "requested_rate"),
        ("sent/s", lambda r: fmt(r.sent_rate, ".2f"), "requested_rate"),
        ("done/s", lambda r: fmt(r.completed_rate, ".2f"), "requested_rate"),
        ("slo met", lambda r: fmt(r.slo_attainment, ".0%"), "slo_attainment"),
        ("goodput", lambda r: fmt(r.goodput, ".2f"), "goodput"),
    ]
    present = [(h, cell) for h, cell, attr in extra if any(getattr(r, attr) is not None for r in rows)]
    if any(r.token_basis not in ("server", "-") for r in rows):
        present.append(("tokens counted by", lambda r: r.token_basis))
    if labels:
        tables.append(labels)
    if present:
        tables.append(_grid(["#", *(h for h, _ in present)],
                            [[str(i), *(cell(r) for _, cell in present)] for i, r in enumerate(rows, start=1)], width))
    tables += quality_tables(rows, width)
    return "\n\n".join(tables)


def quality_tables(rows: Sequence[Row], width: int = WIDTH) -> list[str]:
    """The answers' quality, keyed by ``#``: answers right (of those graded pass/fail) with the pass rate's
    95% interval, then each scorer's mean; as many tables as the scorers need to stay within ``width``."""
    scorers = sorted({name for r in rows for name in r.quality})
    if not scorers and all(r.pass_rate is None for r in rows):
        return []

    def right(r: Row) -> str:
        return "-" if r.graded is None else f"{r.passed}/{r.graded}"

    def rate(r: Row) -> str:
        if r.pass_rate is None:
            return "-"
        interval = f" [{r.pass_rate_ci[0]:.0%}, {r.pass_rate_ci[1]:.0%}]" if r.pass_rate_ci else ""
        return f"{r.pass_rate:.0%}{interval}"

    lead = [("right", right), ("pass rate 95% CI", rate)]
    columns = [(name, lambda r, name=name: "-" if name not in r.quality else f"{r.quality[name]:.3f}")
               for name in scorers]
    budget = width - len(str(len(rows))) - 1  # what the "#" column leaves
    parts: list[list] = [[]]
    used = 0
    for header, cell in [*lead, *columns]:  # a new table when the next column would not fit
        size = max(len(header), *(len(cell(r)) for r in rows)) + 1
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append((header, cell))
        used += size
    return [_grid(["#", *(h for h, _ in part)], [[str(i), *(c(r) for _, c in part)] for i, r in enumerate(rows, 1)],
                  width) for part in parts]


def _grid(headers: Sequence[str], body: Sequence[Sequence[str]], width: int) -> str:
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = [" ".join(h.ljust(w) for h, w in zip(headers, widths)), " ".join("-" * w for w in widths)]
    lines += [" ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(line.rstrip() for line in lines)


def rank_by_goodput(rows: Sequence[Row]) -> list[Row]:
    """With SLOs set, the best backend first: most calls meeting the SLOs per second."""
    if not any(r.goodput is not None for r in rows):
        return list(rows)
    return sorted(rows, key=lambda r: -(r.goodput or 0.0))


EXPORT_FIELDS = ("run_id", "name", "label", "backend", "model", "calls", "errors", "p50", "p95", "p99", "tokens",
                 "tokens_per_s", "cost", "currency", "token_basis", "ttft", "itl_ms", "tpot_ms", "requested_rate",
                 "sent_rate", "completed_rate", "slo_attainment", "goodput", "pass_rate", "passed", "graded")


def export(rows: Sequence[Row], kind: str) -> str:
    """The rows as CSV or JSON (seconds for latencies, milliseconds where the name says ``_ms``); quality as
    ``pass_rate`` (with ``pass_rate_ci``), ``passed``, ``graded`` and ``<scorer>/mean`` per scorer."""
    labelled = label_rows(rows)
    scorers = sorted({name for r in labelled for name in r.quality})
    data = [{k: v for k, v in asdict(r).items() if k in EXPORT_FIELDS} for r in labelled]
    for item, row in zip(data, labelled):
        item["p50_ci"] = list(row.p50_ci) if row.p50_ci else None
        item["pass_rate_ci"] = list(row.pass_rate_ci) if row.pass_rate_ci else None
        item.update({f"{name}/mean": row.quality.get(name) for name in scorers})
    if kind == "json":
        return json.dumps(data, indent=2)
    out = io.StringIO()
    fields = [*EXPORT_FIELDS, "p50_ci", "pass_rate_ci", *(f"{name}/mean" for name in scorers)]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**item, **{k: "" if item[k] is None else "{} {}".format(*item[k])
                                 for k in ("p50_ci", "pass_rate_ci")}} for item in data)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pikeclient.tracking.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--experiment", default="pikeclient")
    parser.add_argument("--sweep", help="a sweep's parent run id, or 'latest'; default: every run")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table for people (default), csv or json for other tools")
    parser.add_argument("--plot", type=Path, help="write the PNG here (e.g. runs/report.png)")
    parser.add_argument("--curve", type=Path, help="a saturation sweep's curve (load.rate=...): write it here")
    parser.add_argument("--quality", type=Path, help="quality vs cost and vs latency p95, one point per run: "
                                                     "write the PNG here")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="two runs (ids or job folders) compared call by "
                        "call, B against A; or one sweep (parent run id, folder, latest): each job against --baseline")
    parser.add_argument("--baseline", help="with --compare SWEEP: the job the others are compared with (run id, job "
                                           "number or folder; default: the first job)")
    args = parser.parse_args(argv)
    if args.compare is not None and len(args.compare) > 2:
        parser.error("--compare takes two runs, or one sweep")
    uri = args.tracking_uri or default_tracking_uri("runs")
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise ConfigError(f"no tracking store at {uri}: run an experiment first, or pass --tracking-uri")
        if is_server_uri(uri):
            check_reachable(uri)  # seconds, not MLflow's minutes of HTTP retries
        client = MlflowClient(tracking_uri=uri)
        if args.compare:
            from pikeclient.tracking.compare_runs import main_compare

            print(main_compare(client, args.compare, args.experiment, args.baseline))
            return 0
        if args.baseline:
            raise ConfigError("--baseline goes with --compare SWEEP")
        rows = rank_by_goodput([to_row(run) for run in find_runs(client, args.experiment, args.sweep)])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(rows) if args.format == "table" else export(rows, args.format))
    if args.plot or args.curve or args.quality:
        from pikeclient.tracking.plots import plot, quality_picture, saturation_curve

        if args.plot:
            print(f"plot: {plot(client, label_rows(rows), args.plot)}", file=sys.stderr)
        if args.curve:
            print(f"saturation curve: {saturation_curve(rows, args.curve)}", file=sys.stderr)
        if args.quality:
            print(f"quality picture: {quality_picture(label_rows(rows), args.quality)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
