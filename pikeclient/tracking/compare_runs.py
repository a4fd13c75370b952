"""Is B really better than A? ``python -m pikeclient.tracking.report --compare A B``, call by call.

A and B are MLflow run ids or job folders; ``--compare SWEEP`` (a sweep's parent run id, its folder, or
``latest``) compares every job of the sweep with one baseline job (``--baseline``: a run id, a job
number or a job folder; the first job by default). The records of each run (its job folder's
``records.jsonl``, else the run's records artifact) are paired by prompt id and repeat, and
:func:`pikeclient.eval.compare.compare` reports per scorer the difference with a paired bootstrap
interval and McNemar's test for pass/fail, and the paired latency difference; "no detectable
difference" when the interval covers zero.

The comparison is logged on the later run of the two (a sweep: on each job compared with the baseline)
as ``compare/...`` metrics and a ``comparison.json`` table; a sweep's parent gets the table of all.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from pikeclient.core.errors import ConfigError
from pikeclient.eval.compare import Comparison, compare
from pikeclient.tracking.job_file import JOB_FILE, SWEEP_FILE, read_job_file, read_json
from pikeclient.tracking.sweep import PARENT_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TABLE = "comparison.json"


@dataclass
class Side:
    """One run of a comparison: what to call it, its records, and its MLflow run when the store has it."""

    label: str
    records: list[dict[str, Any]]
    run: Run | None = None


def resolve(client: MlflowClient, target: str) -> Side:
    """A run id or a job folder, with its records."""
    folder = Path(target).expanduser()
    if folder.is_dir():
        job = read_job_file(folder)
        if job is None:
            raise ConfigError(f"--compare {target}: no {JOB_FILE} there (not a pikeclient job folder)")
        run = _run_or_none(client, job.get("run_id"))
        return Side(_label(run, str(folder)), _records(folder, job), run)
    if not RUN_ID.match(target):
        raise ConfigError(f"--compare {target}: not a run id (32 hex digits) or a job folder")
    run = _get_run(client, target)
    folder = Path(run.data.tags.get("pikeclient.output_dir", ""))
    job = read_job_file(folder) if folder.name else None
    if job is not None and job.get("run_id") == target:
        return Side(_label(run, target), _records(folder, job), run)
    return Side(_label(run, target), _artifact_records(client, run), run)


def sweep_sides(client: MlflowClient, target: str, experiment: str,
                baseline: str | None) -> tuple[Run, Side, list[Side]]:
    """A sweep's parent run, its baseline job and its other jobs (each with its records)."""
    parent = _sweep_parent(client, target, experiment)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    if len(children) < 2:
        raise ConfigError(f"--compare: sweep run {parent.info.run_id} has {len(children)} job run(s); two are needed")
    chosen = children[0] if baseline is None else _pick(children, baseline)
    sides = {c.info.run_id: resolve(client, c.info.run_id) for c in children}
    return parent, sides[chosen.info.run_id], [s for rid, s in sides.items() if rid != chosen.info.run_id]


def compare_sides(a: Side, b: Side) -> Comparison:
    try:
        comparison = compare(a.records, b.records)
    except ValueError as error:
        raise ConfigError(f"--compare: {error}") from None
    if not comparison.pairs:
        raise ConfigError(f"--compare: {a.label} and {b.label} share no prompt (another dataset?)")
    return comparison


def format_comparison(a: Side, b: Side, comparison: Comparison) -> str:
    """What a person reads: the pairing, then one line per difference, B - A."""
    lines = [f"A: {a.label}", f"B: {b.label}",
             f"{comparison.pairs} prompts answered by both (only A: {comparison.only_a}, only B: {comparison.only_b})"]
    headers = ["", "A", "B", "B - A", "95% CI", "test", "verdict"]
    body = []
    for d in comparison.differences.values():
        test = f"McNemar {d.test} p={d.p_value:.3g} ({d.b_only} vs {d.a_only})" if d.p_value is not None else ""
        scale, unit = (1000.0, ", ms") if d.name.endswith("_s") else (1.0, "")  # timings read best in ms
        a_value, b_value, diff, low, high = (v * scale for v in (d.a, d.b, d.estimate, d.ci_low, d.ci_high))
        body.append([f"{d.name} ({d.statistic}{unit})", _number(a_value), _number(b_value), _number(diff, "+"),
                     f"[{_number(low, '+')}, {_number(high, '+')}]", test, d.verdict])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
              "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def _number(value: float, sign: str = "") -> str:
    """Four significant digits, without an exponent for the milliseconds of a long call (10110, not 1.011e+04)."""
    return f"{value:{sign},.0f}" if abs(value) >= 1000 else f"{value:{sign}.4g}"


def later(a: Side, b: Side) -> Side | None:
    """The side whose run started last (where a comparison is logged); None when neither is in the store."""
    known = [side for side in (a, b) if side.run is not None]
    return max(known, key=lambda side: side.run.info.start_time or 0) if known else None


def log_comparison(client: MlflowClient, on: Side, a: Side, b: Side, comparison: Comparison) -> None:
    """``compare/...`` metrics (B - A) and the ``comparison.json`` table on ``on``'s run (A's or B's); tags
    say which runs A and B were."""
    assert on.run is not None
    now = int(time.time() * 1000)
    client.log_batch(on.run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in comparison.metrics().items()],
                     tags=[RunTag("pikeclient.compare.a", a.label), RunTag("pikeclient.compare.b", b.label)])
    log_table(client, on.run, [{"run A": a.label, "run B": b.label, **row} for row in comparison.rows()])


def log_table(client: MlflowClient, run: Run, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as a table artifact the UI shows (pandas' split layout, as ``log_table`` writes it)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / TABLE
        path.write_text(json.dumps({"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}))
        client.log_artifact(run.info.run_id, str(path))
    listed = json.loads(client.get_run(run.info.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS) or "[]")
    if not any(entry.get("path") == TABLE for entry in listed):
        listed.append({"path": TABLE, "type": "table"})
        client.set_tag(run.info.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(listed))


def _label(run: Run | None, fallback: str) -> str:
    if run is None:
        return fallback
    return f"{run.info.run_name or run.info.run_id} ({run.info.run_id[:8]})"


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--compare: no run {run_id} in {client.tracking_uri}") from None


def _run_or_none(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None  # tracked elsewhere: compared, not logged


def _records(folder: Path, job: dict[str, Any]) -> list[dict[str, Any]]:
    name = ((job.get("config") or {}).get("experiment") or {}).get("records_file") or "records.jsonl"
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"--compare: {folder} has no {name}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _artifact_records(client: MlflowClient, run: Run) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.info.run_id, "records.jsonl", folder)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise ConfigError(f"--compare: run {run.info.run_id} has no job folder here and no records artifact "
                              "(tracking.log_records=false)") from None
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _sweep_parent(client: MlflowClient, target: str, experiment: str) -> Run:
    if target == "latest":
        found = client.get_experiment_by_name(experiment)
        parents = [] if found is None else client.search_runs(
            [found.experiment_id], "tags.`pikeclient.role` = 'sweep'", order_by=["attributes.start_time DESC"],
            max_results=1)
        if not parents:
            raise ConfigError(f"--compare latest: no sweep in experiment {experiment!r}")
        return parents[0]
    folder = Path(target).expanduser()
    if folder.is_dir():
        parent = read_json(folder / PARENT_FILE)
        if parent is None:
            what = "a sweep without tracking" if (folder / SWEEP_FILE).is_file() else "not a sweep folder"
            raise ConfigError(f"--compare {target}: {what} (give two runs or job folders to compare)")
        target = str(parent.get("run_id"))
    if not RUN_ID.match(target):
        raise ConfigError(f"--compare {target}: not a sweep (its parent run id, its folder, or latest); give two "
                          "runs or job folders to compare them")
    run = _get_run(client, target)
    if run.data.tags.get("pikeclient.role") != "sweep":
        raise ConfigError(f"--compare {target}: a single run; give a second one to compare it with")
    return run


def _pick(children: Sequence[Run], baseline: str) -> Run:
    """The baseline job: by run id, job number (``pikeclient.job_num``) or job folder."""
    folder = Path(baseline).expanduser()
    for child in children:
        tags = child.data.tags
        if baseline in (child.info.run_id, tags.get("pikeclient.job_num")):
            return child
        if folder.is_dir() and Path(tags.get("pikeclient.output_dir", "")).resolve() == folder.resolve():
            return child
    raise ConfigError(f"--baseline {baseline}: not one of the sweep's {len(children)} jobs (a run id, job number "
                      "or job folder)")


def main_compare(client: MlflowClient, targets: Sequence[str], experiment: str, baseline: str | None) -> str:
    """Run ``--compare``: print-ready text; the comparison is logged as it goes."""
    if len(targets) == 2:
        if baseline is not None:
            raise ConfigError("--baseline goes with --compare SWEEP (one sweep), not with two runs")
        a, b = (resolve(client, t) for t in targets)
        comparison = compare_sides(a, b)
        target = later(a, b)
        if target is not None:
            log_comparison(client, target, a, b, comparison)
        return format_comparison(a, b, comparison)
    parent, base, others = sweep_sides(client, targets[0], experiment, baseline)
    texts, rows = [], []
    for other in others:
        comparison = compare_sides(base, other)
        log_comparison(client, other, base, other, comparison)
        rows += [{"run A": base.label, "run B": other.label, **row} for row in comparison.rows()]
        texts.append(format_comparison(base, other, comparison))
    log_table(client, parent, rows)
    return "\n\n".join(texts)
