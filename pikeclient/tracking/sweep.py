"""Sweeps in MLflow: one parent run per Hydra multirun, one child run per job.

A Hydra callback creates the experiment and the parent run before any job starts and closes the
parent after the last job. Jobs find the parent through a file in the sweep folder, which works for
every launcher on one machine (basic, joblib, Ray on a local cluster). Jobs on other machines (a Ray
cluster, SLURM) do not see that folder; they ask the tracking server for the run tagged with the
sweep's id: the sweep folder as the launching machine named it, which every job's config carries.
"""

from __future__ import annotations

import atexit
import contextlib
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
from pikeclient.core.folderlock import FolderLock
from pikeclient.tracking.job_file import read_sweep_file, task_overrides, write_sweep_file
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


ACTIVE_SWEEP_DIR: Path | None = None  # the sweep this process launches, for its Ctrl-C message


def interrupted_sweep_note() -> str:
    """What ``run.py`` says when Ctrl-C ends a sweep outside a job (between jobs, or while a launcher's
    worker processes ran them)."""
    if ACTIVE_SWEEP_DIR is None:
        return "interrupted: resume the sweep with the same command and experiment.resume=latest"
    folder = ACTIVE_SWEEP_DIR
    with contextlib.suppress(ValueError):
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    return (f"interrupted: the sweep {folder} is unfinished: complete it with the same "
            f"command and experiment.resume={folder}")


class MlflowSweepCallback(Callback):
    """Registered in ``conf/config.yaml`` under ``hydra.callbacks``.

    The sweep folder belongs to the launching process while its jobs run (a second sweep given the same
    ``hydra.sweep.dir`` is refused, never interleaved) and records the sweep's own overrides
    (``sweep.json``), which ``experiment.resume=latest`` matches. A sweep that does not reach its end
    (Ctrl-C, a failed job) leaves its parent run KILLED or FAILED; resumed, the same parent runs again."""

    def __init__(self) -> None:
        self.lock: FolderLock | None = None
        self.parent: dict[str, str] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        global ACTIVE_SWEEP_DIR
        ACTIVE_SWEEP_DIR = sweep_dir
        try:
            self.lock = FolderLock(sweep_dir, "sweep folder").acquire()
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        resume = config.experiment.resume is not None
        manifest = read_sweep_file(sweep_dir)
        if manifest is not None and not resume:
            raise SystemExit(f"error: {sweep_dir} already holds a sweep: complete it with the same overrides and "
                             f"experiment.resume={sweep_dir}, or give this sweep another hydra.sweep.dir")
        if manifest is None:
            write_sweep_file(sweep_dir, task_overrides(config.hydra.overrides.task))
        if config.tracking.enabled:
            self.parent = self._open_parent(config, sweep_dir, resume)
            atexit.register(self._end_unfinished)

    def _open_parent(self, config: DictConfig, sweep_dir: Path, resume: bool) -> dict[str, str]:
        from pikeclient.config.schema import tracking_uri

        uri = tracking_uri(config)
        if is_server_uri(uri):
            try:
                check_reachable(uri)  # seconds, not MLflow's minutes of retries; before any job starts
            except ConfigError as error:  # one line on stderr, exit 1, no job started
                raise SystemExit(f"error: {error}") from None
        from pikeclient.tracking.process import open_parent_run, reopen_parent_run

        sweep_tags = {SWEEP_ID_TAG: sweep_id(sweep_dir, config.hydra.runtime.cwd)}
        parent = read_parent(sweep_dir) if resume else None
        if parent is not None:  # resuming a sweep: its jobs complete their runs under the same parent
            reopen_parent_run(parent, sweep_tags)  # jobs elsewhere find it by this sweep's id
        else:
            parent = open_parent_run(config, sweep_dir, sweep_tags)
            parent_file(sweep_dir).write_text(json.dumps(parent))
        log.info("MLflow parent run %s for sweep %s", parent["run_id"], sweep_dir)
        return parent

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is not None:
            from pikeclient.tracking.process import close_parent_run

            close_parent_run(self.parent)
            self.parent = None
        if self.lock is not None:
            self.lock.release()

    def _end_unfinished(self) -> None:
        """At exit without on_multirun_end (Ctrl-C between jobs, a failed job): a parent still RUNNING is
        KILLED (a failed job has marked it FAILED already)."""
        if self.parent is None:
            return
        from pikeclient.tracking.process import close_parent_run

        with contextlib.suppress(Exception):
            close_parent_run(self.parent, "KILLED", only_if_running=True)
