"""The command-line layer under run.py: run the experiment, print the summary, exit 1 on bad input."""

from __future__ import annotations

import contextlib
import itertools
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
from pikeclient.run.experiment import RunFailed, run_experiment
from pikeclient.run.redact import AUTH_HEADERS
from pikeclient.run.stats import format_summary

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
    """What identifies this Hydra job: its choices, and for a sweep its folder and number."""
    hydra = HydraConfig.get()
    info: dict[str, Any] = {f"choice.{k}": v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra")}
    info["job_name"] = hydra.job.override_dirname or hydra.runtime.choices.get("llm", hydra.job.name)
    if hydra.mode == RunMode.MULTIRUN:
        info["sweep_dir"] = hydra.sweep.dir
        info["job_num"] = hydra.job.num
    return info


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: calls cancelled, records flushed, the run marked KILLED."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(cfg: DictConfig) -> float | None:
    """Run one job; return its median latency (what a Hydra sweeper such as Optuna minimises)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    title = f"pikeclient: {hydra_job_info()['job_name']}"
    try:
        stats = run_experiment(cfg, HydraConfig.get().runtime.output_dir, hydra_job_info())
    except RunFailed as error:
        print(format_summary(error.stats, title))
        log.error("the run failed: %s; its MLflow run is marked FAILED", error)
        _fail_sweep(cfg)
        sys.exit(1)
    except PikeError as error:
        log.error("%s", error)
        _fail_sweep(cfg)
        sys.exit(1)
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated) or getattr(error, "signum", None) == signal.SIGTERM
        signal_name = "terminated (SIGTERM)" if terminated else "interrupted"
        log.error("%s: the MLflow run is marked KILLED and the records so far are kept; complete it with the "
                  "same command and experiment.resume=%s", signal_name, HydraConfig.get().runtime.output_dir)
        _fail_sweep(cfg)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(stats, title))
    print(first_answers(Path(HydraConfig.get().runtime.output_dir) / cfg.experiment.records_file))
    return stats.metrics().get("latency_s_p50")


def first_answers(records: Path, count: int = 3, width: int = 100) -> str:
    """The first answers of a run, one line each: what the model said, next to how fast it said it."""
    lines = ["", f"first answers (all in {records}):"]
    with contextlib.suppress(OSError), records.open(encoding="utf-8") as file:
        for raw in itertools.islice(file, count):
            record = json.loads(raw)
            text = " ".join((record.get("response") or f"[{record.get('error_kind')} error]").split())
            line = f"  {record['id']}: {text}"
            lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


def _fail_sweep(cfg: DictConfig) -> None:
    """A failed job ends the sweep (Hydra skips on_multirun_end then): mark its parent run FAILED."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or not cfg.tracking.enabled:
        return
    from pikeclient.tracking.sweep import read_parent

    parent = read_parent(HydraConfig.get().sweep.dir)
    if parent is not None:
        from pikeclient.tracking.process import close_parent_run

        close_parent_run(parent, "FAILED")
