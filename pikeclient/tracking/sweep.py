"""Sweeps in MLflow: one parent run per Hydra multirun, one child run per job.

A Hydra callback creates the experiment and the parent run before any job starts and closes the
parent after the last job. Jobs find the parent through a file in the sweep folder, which works for
every launcher on one machine (basic, joblib, Ray on a local cluster). Jobs on other machines (a Ray
cluster, SLURM) do not see that folder; they ask the tracking server for the run tagged with the
sweep's id: the sweep folder as the launching machine named it, which every job's config carries.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pikeclient.config.schema import is_server_uri
from pikeclient.core.errors import ConfigError
from pikeclient.tracking.remote import check_reachable, experiment_id, search_runs

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"
SWEEP_ID_TAG = "pikeclient.sweep_id"


def parent_file(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / PARENT_FILE


def read_parent(sweep_dir: str | Path) -> dict[str, str] | None:
    """The parent run recorded for a sweep, or None when the callback did not run."""
    file = parent_file(sweep_dir)
    return json.loads(file.read_text()) if file.is_file() else None


def sweep_id(sweep_dir: str | Path, launch_cwd: str | Path) -> str:
    """The sweep folder as an absolute path on the launching machine: the same string in every job,
    wherever it runs (``hydra.runtime.cwd`` is the launcher's), and different for sweeps started at the
    same second from different folders."""
    return os.path.normpath(os.path.join(launch_cwd, sweep_dir))


def find_parent(sweep_dir: str | Path, tracking_uri: str, experiment_name: str) -> dict[str, str] | None:
    """A job's parent run: from the sweep folder's file, else (a job on another machine) from the server."""
    parent = read_parent(sweep_dir)
    if parent is not None or not is_server_uri(tracking_uri):
        return parent
    launch_cwd = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()
    return search_parent(tracking_uri, experiment_name, sweep_id(sweep_dir, launch_cwd))


def search_parent(tracking_uri: str, experiment_name: str, sweep: str) -> dict[str, str] | None:
    """The newest sweep run tagged ``sweep`` on the tracking server, or None."""
    experiment = experiment_id(tracking_uri, experiment_name)
    if experiment is None or "'" in sweep:  # a quote would end the filter's string literal
        return None
    runs = search_runs(tracking_uri, experiment,
                       f"tags.`{SWEEP_ID_TAG}` = '{sweep}' and tags.`pikeclient.role` = 'sweep'", max_results=1)
    if not runs:
        return None
    return {"run_id": runs[0]["info"]["run_id"], "experiment_id": experiment, "tracking_uri": tracking_uri}


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
        from pikeclient.config.schema import tracking_uri

        uri = tracking_uri(config)
        if is_server_uri(uri):
            try:
                check_reachable(uri)  # seconds, not MLflow's minutes of retries; before any job starts
            except ConfigError as error:  # one line on stderr, exit 1, no job started
                raise SystemExit(f"error: {error}") from None
        from pikeclient.tracking.process import open_parent_run

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_tags = {SWEEP_ID_TAG: sweep_id(sweep_dir, config.hydra.runtime.cwd)}
        parent = earlier_parent(config, sweep_dir) if config.experiment.resume else None
        if parent is not None:  # resuming a sweep: its jobs complete their runs under the same parent
            from pikeclient.tracking.process import reopen_parent_run

            reopen_parent_run(parent, sweep_tags)  # jobs elsewhere find it by this sweep's id
        else:
            parent = open_parent_run(config, sweep_dir, sweep_tags)
        parent_file(sweep_dir).write_text(json.dumps(parent))
        log.info("MLflow parent run %s for sweep %s", parent["run_id"], sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = read_parent(config.hydra.sweep.dir) if config.tracking.enabled else None
        if parent is not None:
            from pikeclient.tracking.process import close_parent_run

            close_parent_run(parent)
