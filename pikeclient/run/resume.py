"""Resuming an interrupted run: ``experiment.resume=<job folder | MLflow run id | latest>``.

Every job writes ``run.json`` into its folder (its resolved config and, once tracking has made it, its
MLflow run id). Resuming reads the earlier job's records, keeps the answers it got (with the
measurements they really had, marked ``resumed``), calls only the prompts without an answer, and
completes the same MLflow run. The config must be the same, or the numbers would mix two experiments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem
from pikeclient.tracking.job_file import JOB_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Settings that may differ between the interrupted run and its resumption.
FREE_KEYS = ("experiment.resume", "tracking.run_name")


@dataclass
class Earlier:
    """What an interrupted job left: its answered records by prompt index, and its MLflow run."""

    job_dir: Path
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    run_id: str | None = None
    wall_s: float = 0.0  # the measured span of its calls: first start to last end


def find_job_dir(target: str, runs_dir: Path, current: Path, job_num: int | None) -> Path:
    """The job folder that ``experiment.resume`` names; for a sweep job, its job in that sweep."""
    target = str(target).strip()
    if target == "latest":
        return _latest(runs_dir, current, job_num)
    if RUN_ID.match(target):
        return _by_run_id(target, runs_dir)
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"experiment.resume={target!r}: not a job folder, an MLflow run id, or latest")
    if not (folder / JOB_FILE).is_file() and job_num is not None and (folder / str(job_num) / JOB_FILE).is_file():
        folder = folder / str(job_num)  # a sweep folder: this job's folder in it
    if not (folder / JOB_FILE).is_file():
        raise ConfigError(f"experiment.resume={target!r}: no {JOB_FILE} there (not a pikeclient job folder)")
    return folder


def _job_files(runs_dir: Path, bases: Sequence[str] = ("outputs", "multirun")) -> list[Path]:
    return [p for base in bases for p in (runs_dir / base).glob(f"**/{JOB_FILE}")]


def _latest(runs_dir: Path, current: Path, job_num: int | None) -> Path:
    """A single run resumes the latest other single run; a sweep job, its number in the latest other sweep."""
    current = current.resolve()
    if job_num is None:
        candidates = [p.parent for p in _job_files(runs_dir, ("outputs",)) if p.parent.resolve() != current]
    else:
        candidates = [p.parent for p in _job_files(runs_dir, ("multirun",))
                      if p.parent.name == str(job_num) and p.parent.parent.resolve() != current.parent]
    if not candidates:
        raise ConfigError(f"experiment.resume=latest: no earlier job folder under {runs_dir}")
    return max(candidates, key=lambda c: (c / JOB_FILE).stat().st_mtime)


def _by_run_id(run_id: str, runs_dir: Path) -> Path:
    for path in _job_files(runs_dir):
        try:
            if json.loads(path.read_text()).get("run_id") == run_id:
                return path.parent
        except (OSError, ValueError):
            continue
    raise ConfigError(f"experiment.resume={run_id}: no job folder under {runs_dir} has that MLflow run")


def load_earlier(job_dir: Path, config: Mapping[str, Any], prompts: Sequence[PromptItem],
                 records_file: str) -> Earlier:
    """The earlier job's answers, checked against this run's config and prompts."""
    try:
        job = json.loads((job_dir / JOB_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"experiment.resume: cannot read {job_dir / JOB_FILE}: {error}") from None
    changed = config_differences(job.get("config") or {}, config)
    if changed:
        raise ConfigError(f"experiment.resume: {job_dir} ran with other settings ({', '.join(changed[:3])}); "
                          "resume with the same overrides")
    earlier = Earlier(job_dir, run_id=job.get("run_id"))
    starts, ends = [], []
    for record in read_records(job_dir / records_file):
        index = record.get("index")
        if not isinstance(index, int) or index >= len(prompts) or prompts[index].id != record.get("id"):
            raise ConfigError(f"experiment.resume: {job_dir} holds prompt {record.get('id')!r} at {index}, "
                              "which this dataset does not: resume with the same dataset")
        if record.get("error") is None and not record.get("cached"):
            earlier.records[index] = {**record, "resumed": True}
            starts.append(record["start_time"])
            ends.append(record.get("end_time") or record["start_time"])
    if starts:
        earlier.wall_s = max(ends) - min(starts)
    return earlier


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a job; a last line cut by a kill is dropped (its prompt is called again)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring those a resumption may change."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [k for k in keys if not k.startswith(FREE_KEYS) and flat_old.get(k) != flat_new.get(k)]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, default=str, sort_keys=True)
    return flat
