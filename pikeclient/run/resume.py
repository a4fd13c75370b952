"""Resuming an interrupted run or sweep: ``experiment.resume=<job folder | sweep folder | MLflow run id | latest>``.

A run is completed where it started: ``run.py`` points Hydra at the interrupted job's folder (a sweep:
the sweep's folder), so the records, ``run.json`` and the MLflow run are those of the first attempt and
a second interruption is resumed like the first. ``latest`` is the latest run (or sweep) of the same
command: the same overrides, ``experiment.resume`` aside; never another command's.

Every earlier answer is matched to the exact request it answered: records carry a digest of the
messages and sampling they were sent with, and ``run.json`` the digest of the whole dataset. A changed,
swapped, shortened or grown dataset is refused with what differs (a grown one is accepted with
``experiment.resume_grown=true``: the added prompts are called too). Only prompts without an answer are
called; the earlier answers keep the measurements they had (marked ``resumed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pikeclient.core.errors import ConfigError
from pikeclient.core.types import SamplingParams
from pikeclient.run.cache import request_digest
from pikeclient.run.dataset import PromptItem
from pikeclient.tracking.job_file import JOB_FILE, RESUME_KEYS, SWEEP_FILE, read_job_file, read_json
from pikeclient.tracking.sweep import PARENT_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Settings that may differ between the interrupted run and its resumption.
FREE_KEYS = (*RESUME_KEYS, "tracking.run_name")


@dataclass
class Earlier:
    """What an interrupted job left: its answered records by prompt index, and its MLflow run."""

    job_dir: Path
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    run_id: str | None = None
    status: str | None = None  # how its tracking process ended the MLflow run (FINISHED, KILLED, ...), if it did
    segments: list[tuple[float, float]] = field(default_factory=list)  # measured spans of earlier processes
    added: int = 0  # prompts appended to the dataset since (experiment.resume_grown)

    @property
    def wall_s(self) -> float:
        return sum(end - start for start, end in self.segments)


@dataclass(frozen=True)
class DatasetDigest:
    """The dataset a run was asked to call: its distinct prompts and a digest of every request in order."""

    prompts: int
    digest: str

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "digest": self.digest}


def item_digest(item: PromptItem, base: SamplingParams) -> str:
    """The digest of the request ``item`` is sent as: its messages and sampling (its own max_tokens included)."""
    return request_digest(item.messages, base.merged(item.sampling_overrides()))


def dataset_digest(items: Sequence[PromptItem], base: SamplingParams, count: int | None = None) -> DatasetDigest:
    """The digest of the first ``count`` prompts (all by default), in order."""
    chain = hashlib.sha256()
    items = items if count is None else items[:count]
    for item in items:
        chain.update(item_digest(item, base).encode())
    return DatasetDigest(len(items), chain.hexdigest()[:32])


# -- which folder ------------------------------------------------------------------------------------------------


def find_job_dir(target: str, runs_dir: Path, overrides: Sequence[str] | None = None) -> Path:
    """The job folder a single run's ``experiment.resume`` names."""
    target = str(target).strip()
    if target == "latest":
        return _latest(runs_dir / "outputs", JOB_FILE, overrides, "run")
    if RUN_ID.match(target):
        return _by_run_id(target, runs_dir)
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"experiment.resume={target!r}: not a job folder, an MLflow run id, or latest")
    if not (folder / JOB_FILE).is_file():
        if is_sweep_dir(folder):
            raise ConfigError(f"experiment.resume={target!r} is a sweep folder: resume it with -m and the sweep's "
                              "overrides")
        raise ConfigError(f"experiment.resume={target!r}: no {JOB_FILE} there (not a pikeclient job folder)")
    return folder


def find_sweep_dir(target: str, runs_dir: Path, overrides: Sequence[str] | None = None) -> Path:
    """The sweep folder a sweep's ``experiment.resume`` names: the folder, one of its job folders, the
    MLflow run id of one of its jobs, or the latest sweep of the same command."""
    target = str(target).strip()
    if target == "latest":
        return _latest(runs_dir / "multirun", SWEEP_FILE, overrides, "sweep")
    folder = _by_run_id(target, runs_dir) if RUN_ID.match(target) else Path(target).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"experiment.resume={target!r}: not a sweep folder, an MLflow run id, or latest")
    for candidate in (folder, folder.parent):
        if is_sweep_dir(candidate):
            return candidate
    raise ConfigError(f"experiment.resume={target!r}: no {SWEEP_FILE} there or above (not a pikeclient sweep folder)")


def is_sweep_dir(folder: Path) -> bool:
    return (folder / SWEEP_FILE).is_file() or (folder / PARENT_FILE).is_file()


def _latest(base: Path, file_name: str, overrides: Sequence[str] | None, what: str) -> Path:
    """The newest folder under ``base`` made by the same command (``file_name`` records its overrides)."""
    candidates, others = [], 0
    for path in base.glob(f"**/{file_name}"):
        data = read_json(path) or {}
        if overrides is None or sorted(data.get("overrides") or ()) == sorted(overrides):
            candidates.append((float(data.get("created") or path.stat().st_mtime), path.parent))
        else:
            others += 1
    if not candidates:
        command = " ".join(overrides or ()) or "(no overrides)"
        other = f" ({others} {what}s of other commands are there)" if others else ""
        raise ConfigError(f"experiment.resume=latest: no earlier {what} of this command [{command}] under {base}"
                          f"{other}")
    return max(candidates)[1]


def _by_run_id(run_id: str, runs_dir: Path) -> Path:
    for path in [*(runs_dir / "outputs").glob(f"**/{JOB_FILE}"), *(runs_dir / "multirun").glob(f"**/{JOB_FILE}")]:
        if (read_json(path) or {}).get("run_id") == run_id:
            return path.parent
    raise ConfigError(f"experiment.resume={run_id}: no job folder under {runs_dir} has that MLflow run")


# -- what it left ------------------------------------------------------------------------------------------------


def load_earlier(job_dir: Path, config: Mapping[str, Any], items: Sequence[PromptItem], prompts: Sequence[PromptItem],
                 records_file: str, base: SamplingParams, dataset: DatasetDigest, *,
                 allow_grown: bool = False) -> Earlier:
    """The earlier job's answers, each checked against the request this run would send for it.

    ``items`` are the dataset's prompts, ``prompts`` the run's (``items`` repeated), ``dataset`` the digest
    of ``items``."""
    job = read_job_file(job_dir)
    if job is None:
        raise ConfigError(f"experiment.resume: cannot read {job_dir / JOB_FILE}")
    changed = config_differences(job.get("config") or {}, config)
    if changed:
        raise ConfigError(f"experiment.resume: {job_dir} ran with other settings ({', '.join(changed[:3])}); "
                          "resume with the same overrides")
    earlier = Earlier(job_dir, run_id=job.get("run_id"), status=job.get("status"))
    before = job.get("dataset")
    old_count = _check_dataset(job_dir, before, items, base, dataset, allow_grown)
    if old_count is not None and old_count < dataset.prompts:
        earlier.added = dataset.prompts - old_count
    segments: dict[Any, list[float]] = {}
    for record in read_records(job_dir / records_file):
        index = _current_index(record.get("index"), old_count, dataset.prompts)
        if index is None or index >= len(prompts) or prompts[index].id != record.get("id"):
            raise ConfigError(f"experiment.resume: {job_dir} holds prompt {record.get('id')!r} at "
                              f"{record.get('index')}, which this dataset does not: resume with the same dataset")
        digest = record.get("request_digest")
        if digest is not None and digest != item_digest(prompts[index], base):
            raise ConfigError(f"experiment.resume: prompt {record.get('id')!r} (index {index}) changed since "
                              f"{job_dir} answered it (its messages or sampling differ): resume with the same dataset")
        if record.get("error") is None and not record.get("cached"):
            earlier.records[index] = {**record, "index": index, "resumed": True}
            span = segments.setdefault(record.get("session", 0), [record["start_time"], record["start_time"]])
            span[0] = min(span[0], record["start_time"])
            span[1] = max(span[1], record.get("end_time") or record["start_time"])
    if isinstance(before, Mapping) and old_count == dataset.prompts and before.get("digest") != dataset.digest:
        # Every answer matched its request, but a prompt without one changed (or the order of those).
        raise ConfigError(f"experiment.resume: the dataset differs from the one the run in {job_dir} had (same "
                          f"{old_count} prompts in number, other text, order or sampling among those not yet "
                          "answered): resume with the same dataset")
    earlier.segments = [(start, end) for start, end in segments.values()]
    return earlier


def _check_dataset(job_dir: Path, before: Mapping[str, Any] | None, items: Sequence[PromptItem],
                   base: SamplingParams, now: DatasetDigest, allow_grown: bool) -> int | None:
    """How many distinct prompts the earlier run had (None: a run from before digests were kept)."""
    if not isinstance(before, Mapping):
        return None
    count, digest = int(before.get("prompts", 0)), before.get("digest")
    if count > now.prompts:
        raise ConfigError(f"experiment.resume: the dataset has {now.prompts} prompts, the run in {job_dir} had "
                          f"{count}: resume with the same dataset")
    if count < now.prompts:
        if not allow_grown:
            raise ConfigError(f"experiment.resume: the dataset has {now.prompts} prompts, the run in {job_dir} had "
                              f"{count} ({now.prompts - count} added): to call the added prompts too, resume with "
                              "experiment.resume_grown=true")
        if dataset_digest(items, base, count).digest != digest:
            raise ConfigError(f"experiment.resume: the dataset's first {count} prompts differ from those the run in "
                              f"{job_dir} had: resume with the same dataset (new prompts may only be appended)")
    return count


def _current_index(index: Any, old_count: int | None, new_count: int) -> int | None:
    """A record's index in this run: a grown dataset moves the repeats after the first pass."""
    if not isinstance(index, int) or index < 0:
        return None
    if old_count is None or old_count == new_count or old_count == 0:
        return index
    repeat, position = divmod(index, old_count)
    return repeat * new_count + position


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


def write_records(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` with ``records`` atomically: a kill while resuming in place loses nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


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
