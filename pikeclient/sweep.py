"""Sweeps in MLflow: one parent run per Hydra multirun, one child run per job.

A Hydra callback creates the experiment and the parent run before any job starts and closes the
parent after the last job. Jobs find the parent through a file in the sweep folder, so this works with
any launcher (basic, joblib, ray), in-process or not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"


def parent_file(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / PARENT_FILE


def read_parent(sweep_dir: str | Path) -> dict[str, str] | None:
    """The parent run recorded for a sweep, or None when the callback did not run."""
    file = parent_file(sweep_dir)
    return json.loads(file.read_text()) if file.is_file() else None


def earlier_parent(config: DictConfig, sweep_dir: Path) -> dict[str, str] | None:
    """The parent run of the sweep that ``experiment.resume`` names (a sweep folder, or latest)."""
    target = str(config.experiment.resume)
    if target == "latest":
        others = [f.parent for f in (Path(config.paths.runs_dir) / "multirun").glob(f"*/*/{PARENT_FILE}")
                  if f.parent.resolve() != sweep_dir.resolve()]
        folder = max(others, key=lambda f: parent_file(f).stat().st_mtime) if others else None
    else:
        folder = Path(target)
        if not parent_file(folder).is_file() and parent_file(folder.parent).is_file():
            folder = folder.parent  # a job folder of the sweep
    return read_parent(folder) if folder is not None and parent_file(folder).is_file() else None


class MlflowSweepCallback(Callback):
    """Registered in ``conf/config.yaml`` under ``hydra.callbacks``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        from pikeclient.tracking import open_parent_run

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = earlier_parent(config, sweep_dir) if config.experiment.resume else None
        if parent is not None:  # resuming a sweep: its jobs complete their runs under the same parent
            from pikeclient.tracking import reopen_parent_run

            reopen_parent_run(parent)
        else:
            parent = open_parent_run(config, sweep_dir)
        parent_file(sweep_dir).write_text(json.dumps(parent))
        log.info("MLflow parent run %s for sweep %s", parent["run_id"], sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = read_parent(config.hydra.sweep.dir) if config.tracking.enabled else None
        if parent is not None:
            from pikeclient.tracking import close_parent_run

            close_parent_run(parent)
