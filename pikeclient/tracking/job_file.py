"""The files that make a folder resumable: ``run.json`` in every job folder, ``sweep.json`` in a sweep's.

``run.json`` holds the job's resolved config, the command's overrides (what ``experiment.resume=latest``
matches), the dataset's digest and, once tracking has made it, the MLflow run id and how the run ended.
The experiment writes it first, the tracking process again with the run id and at the end;
``experiment.resume`` (``pikeclient.run.resume``) reads it. ``sweep.json`` holds a sweep's own overrides
(``llm=a,b``, as typed), written by the sweep callback before any job starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

JOB_FILE = "run.json"
SWEEP_FILE = "sweep.json"
RESUME_KEYS = ("experiment.resume", "experiment.resume_grown")  # how to resume, not what was run
# Hydra's options that take a value in the next argument (not overrides).
_VALUE_FLAGS = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "--experimental-rerun")


def write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """A kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's object, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_job_file(output_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(output_dir) / JOB_FILE)


def write_job_file(output_dir: str | Path, config: Mapping[str, Any] | None = None, **fields: Any) -> None:
    """Create or update ``run.json``: ``config`` and ``fields`` (run_id, tracking_uri, status, overrides,
    dataset) replace what the file held; the rest is kept, and ``created`` is set once."""
    path = Path(output_dir) / JOB_FILE
    data = read_json(path) or {"created": time.time()}
    if config is not None:
        data["config"] = config
    data.update(fields)
    write_json_atomically(path, data)


def write_sweep_file(sweep_dir: str | Path, overrides: list[str]) -> None:
    write_json_atomically(Path(sweep_dir) / SWEEP_FILE, {"created": time.time(), "overrides": overrides})


def read_sweep_file(sweep_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(sweep_dir) / SWEEP_FILE)


def task_overrides(args: Iterable[str]) -> list[str]:
    """The command's own overrides, as Hydra keeps them: no options, no ``hydra`` settings, no resume."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _VALUE_FLAGS:
            skip = True
            continue
        if arg.startswith("-") and not arg.startswith(("+", "~")):
            continue
        key = arg.lstrip("+~").partition("=")[0].strip()
        if key.startswith(("hydra.", "hydra/")) or key == "hydra" or key in RESUME_KEYS:
            continue
        out.append(arg.strip())
    return sorted(out)
