"""The command-line layer under run.py: run the experiment, print the summary, exit 1 on bad input."""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pikeclient.config.schema import is_secret_name
from pikeclient.core.errors import PikeError
from pikeclient.core.folderlock import FolderLock
from pikeclient.eval.score import verdict
from pikeclient.run.experiment import RunFailed, run_experiment
from pikeclient.run.redact import AUTH_HEADERS
from pikeclient.run.resume import find_job_dir, find_sweep_dir
from pikeclient.run.stats import RunStats, format_summary
from pikeclient.tracking.job_file import read_job_file, read_sweep_file, task_overrides

log = logging.getLogger(__name__)

_SECRET_VALUE = re.compile(r"^(sk-[A-Za-z0-9_\-]{16,}|[0-9a-f]{32}|[A-Za-z0-9+/]{60,}={0,2})$")
# Overrides whose values look like keys but are identifiers (an MLflow run id is 32 hex digits, like an
# Azure key); a value equal to a key held in the environment is still refused.
_ID_KEYS = ("experiment.resume",)


def secret_overrides(args: list[str], environ: Mapping[str, str]) -> list[str]:
    """Command-line overrides that carry a credential; Hydra would save them in .hydra/overrides.yaml."""
    secrets = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= 8}
    found = []
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        looks_secret = key not in _ID_KEYS and _SECRET_VALUE.match(value)
        credential_header = "headers." in key.lower() and name.lower() in AUTH_HEADERS
        if is_secret_name(name) or value in secrets or looks_secret or credential_header or _has_password(value):
            found.append(key)
    return found


def _has_password(value: str) -> bool:
    """A URL with ``user:key@``: the key would be saved with the overrides."""
    if "://" not in value:
        return False
    try:
        return urlsplit(value.strip("'\"")).password is not None
    except ValueError:
        return False


def refuse_secret_overrides(args: list[str]) -> None:
    """Exit before Hydra starts (and writes anything) when a key is passed on the command line."""
    found = secret_overrides(args, os.environ)
    if found:
        print(f"error: {', '.join(found)}: credentials must not be passed on the command line (Hydra saves "
              "overrides in the job's .hydra folder); put the key in the environment variable that "
              "llm.api_key_env names (headers and URLs with user:key@ included)", file=sys.stderr)
        sys.exit(2)


def check_runs_dir(args: list[str], default: str = "runs") -> None:
    """Exit with one line when the outputs folder cannot be written (Hydra would fail with a traceback
    creating the job's folder there, before any of our code runs)."""
    runs_dir = default
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key == "paths.runs_dir":
            runs_dir = value.strip("'\"")
    folder = Path(runs_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        print(f"error: paths.runs_dir={runs_dir!r} cannot hold the outputs: {error.strerror or error}", file=sys.stderr)
        sys.exit(1)


def hydra_job_info() -> dict[str, Any]:
    """What identifies this Hydra job: its choices, its overrides, and for a sweep its folder and number."""
    hydra = HydraConfig.get()
    info: dict[str, Any] = {f"choice.{k}": v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra")}
    info["overrides"] = task_overrides(hydra.overrides.task)
    # Endpoints and paths make long names that do not tell runs apart (conf/config.yaml lists them).
    named = [o for o in info["overrides"]
             if o.lstrip("+~").partition("=")[0] not in hydra.job.config.override_dirname.exclude_keys]
    swept = swept_keys(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else set()
    info["job_name"] = job_name(named, swept) or hydra.runtime.choices.get("llm", hydra.job.name)
    if hydra.mode == RunMode.MULTIRUN:
        info["sweep_dir"] = hydra.sweep.dir
        info["job_num"] = hydra.job.num
        info["swept"] = ",".join(sorted(k.lstrip("+~") for k in swept))  # what the report labels runs by
    return info


def swept_keys(sweep_dir: str | Path) -> set[str]:
    """The keys a sweep varies (``sampling.temperature=0,0.7``), from the overrides it was started with."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    manifest = read_sweep_file(sweep_dir) or {}
    try:
        overrides = OverridesParser.create().parse_overrides(list(manifest.get("overrides") or ()))
    except Exception:  # noqa: BLE001 - a name is cosmetic: fall back to the job's own overrides
        return set()
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def job_name(overrides: list[str], swept: set[str]) -> str:
    """A run's name: what the sweep varies first (``llm=openai temperature=0.7``), then the rest; keys
    shortened to their last part where that stays unambiguous."""
    pairs = [o.lstrip("+~").partition("=")[::2] for o in overrides]
    varying = [(k, v) for k, v in pairs if k in swept]
    fixed = [(k, v) for k, v in pairs if k not in swept]
    lasts = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    short = {k: k.rsplit(".", 1)[-1] if lasts.count(k.rsplit(".", 1)[-1]) == 1 else k for k, _ in pairs}
    return " ".join(f"{short[k]}={v.replace(chr(92), '')}" for k, v in varying + fixed)  # Hydra's escapes dropped


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: calls cancelled, records flushed, the run marked KILLED."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(cfg: DictConfig) -> float | None:
    """Run one job; return its median latency (what a Hydra sweeper such as Optuna minimises)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    info = hydra_job_info()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    title = f"pikeclient: {info['job_name']}"
    printed: list[RunStats] = []

    def show(stats: RunStats) -> None:  # as soon as the calls are over, before MLflow has it all
        print(format_summary(stats, title))
        print(first_answers(output_dir / cfg.experiment.records_file), flush=True)
        printed.append(stats)

    try:
        stats = run_experiment(cfg, output_dir, info, on_calls_done=show)
    except RunFailed as error:
        if not printed:
            print(format_summary(error.stats, title))
        log.error("the run failed: %s; its MLflow run is marked FAILED", error)
        _end_sweep(cfg, "FAILED")
        sys.exit(1)
    except PikeError as error:
        log.error("%s", error)
        _end_sweep(cfg, "FAILED")
        sys.exit(1)
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated) or getattr(error, "signum", None) == signal.SIGTERM
        log.error("%s: %s", "terminated (SIGTERM)" if terminated else "interrupted",
                  interruption_note(output_dir, cfg.experiment.records_file, info.get("sweep_dir")))
        _end_sweep(cfg, "KILLED")
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not printed:  # a finished run resumed again: nothing was called
        show(stats)
    return stats.metrics().get("Latency/p50")


def interruption_note(output_dir: Path, records_file: str, sweep_dir: str | None = None) -> str:
    """What an interruption left, as it is: calls recorded or not, an MLflow run or not, and how to go on."""
    job = read_job_file(output_dir) or {}
    records, recorded = output_dir / records_file, 0
    with contextlib.suppress(OSError), records.open("rb") as file:
        recorded = sum(1 for line in file if line.strip())
    run = f"the MLflow run {job['run_id']} is marked KILLED" if job.get("run_id") else "no MLflow run was made"
    resume = f"complete it with the same command and experiment.resume={sweep_dir or output_dir}"
    if sweep_dir is not None:
        return f"{recorded} calls of this job are recorded; {run}; the sweep is unfinished: {resume}"
    if not recorded and not job.get("run_id"):
        return "no call was recorded and no MLflow run was made; run the command again"
    return f"{recorded} calls are recorded in {records}; {run}; {resume}"


def first_answers(records: Path, count: int = 3, width: int = 100) -> str:
    """The first answers of a run in prompt order, one line each: what the model said, next to how fast."""
    lines = ["", f"first answers (all in {records}):"]
    with contextlib.suppress(OSError), records.open(encoding="utf-8") as file:
        first = heapq.nsmallest(count, (json.loads(raw) for raw in file if raw.strip()),
                                key=lambda r: r.get("index", 0))
        for record in first:
            text = " ".join((record.get("response") or f"[{record.get('error_kind')} error]").split())
            grade = {"pass": " (right)", "fail": " (wrong)"}.get(verdict(record.get("scores") or {}) or "", "")
            line = f"  {record['id']}{grade}: {text}"
            lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


def _end_sweep(cfg: DictConfig, status: str) -> None:
    """A job that fails or is interrupted ends the sweep (Hydra skips on_multirun_end then): its parent
    run is marked FAILED or KILLED."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or not cfg.tracking.enabled:
        return
    from pikeclient.tracking.sweep import read_parent

    parent = read_parent(HydraConfig.get().sweep.dir)
    if parent is not None:
        from pikeclient.tracking.process import close_parent_run

        with contextlib.suppress(Exception):  # the job's own outcome is what the user must see
            close_parent_run(parent, status)


def resume_in_place(args: list[str]) -> list[str]:
    """``experiment.resume=...`` completes a run (a sweep) in its own folder: Hydra is pointed at it.

    Called before Hydra starts, which otherwise makes a new folder for every attempt, so that a second
    interruption would have to be resumed from the first attempt's folder and the second's at once."""
    target = next((a.partition("=")[2] for a in reversed(args) if a.lstrip("+").startswith("experiment.resume=")),
                  None)
    if target is None or not target.strip() or target.strip() == "null":
        return args
    sweep = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    runs_dir = Path(next((a.partition("=")[2] for a in reversed(args) if a.startswith("paths.runs_dir=")), "runs"))
    overrides = task_overrides(args)
    try:
        folder = (find_sweep_dir if sweep else find_job_dir)(target.strip("'\""), runs_dir, overrides)
        with FolderLock(folder, "sweep folder" if sweep else "job folder"):
            pass  # refused before Hydra writes its files into a folder another process is writing
    except PikeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    folder = folder.resolve()
    given = next((a.partition("=")[2] for a in args if a.startswith(f"{key}=")), None)
    if given is not None:
        if Path(given.strip("'\"")).resolve() != folder:
            print(f"error: experiment.resume completes the run in its own folder ({folder}); leave out {key}",
                  file=sys.stderr)
            sys.exit(1)
        return args
    quoted = str(folder).replace("\\", "\\\\").replace("'", "\\'")
    return [*args, f"{key}='{quoted}'"]
