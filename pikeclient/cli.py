"""The command-line layer under run.py: run the experiment, print the summary, exit 1 on bad input."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pikeclient.config import is_secret_name
from pikeclient.errors import PikeError
from pikeclient.experiment import run_experiment
from pikeclient.stats import format_summary

log = logging.getLogger(__name__)

_SECRET_VALUE = re.compile(r"^(sk-[A-Za-z0-9_\-]{16,}|[0-9a-f]{32}|[A-Za-z0-9+/]{60,}={0,2})$")


def secret_overrides(args: list[str], environ: Mapping[str, str]) -> list[str]:
    """Command-line overrides that carry a credential; Hydra would save them in .hydra/overrides.yaml."""
    secrets = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= 8}
    found = []
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        if is_secret_name(name) or value in secrets or _SECRET_VALUE.match(value):
            found.append(key)
    return found


def refuse_secret_overrides(args: list[str]) -> None:
    """Exit before Hydra starts (and writes anything) when a key is passed on the command line."""
    found = secret_overrides(args, os.environ)
    if found:
        print(f"error: {', '.join(found)}: credentials must not be passed on the command line (Hydra saves "
              "overrides in the job's .hydra folder); put the key in the environment variable that "
              "llm.api_key_env names", file=sys.stderr)
        sys.exit(2)


def hydra_job_info() -> dict[str, Any]:
    """What identifies this Hydra job: its choices, and for a sweep its folder and number."""
    hydra = HydraConfig.get()
    info: dict[str, Any] = {f"choice.{k}": v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra")}
    info["job_name"] = hydra.job.override_dirname or hydra.runtime.choices.get("llm", hydra.job.name)
    if hydra.mode == RunMode.MULTIRUN:
        info["sweep_dir"] = hydra.sweep.dir
        info["job_num"] = hydra.job.num
    return info


def main(cfg: DictConfig) -> float | None:
    """Run one job; return its median latency (what a Hydra sweeper such as Optuna minimises)."""
    try:
        stats = run_experiment(cfg, HydraConfig.get().runtime.output_dir, hydra_job_info())
    except PikeError as error:
        log.error("%s", error)
        _fail_sweep(cfg)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted: the MLflow run is marked KILLED; answers so far are cached, "
                  "so running the same command again calls only the prompts still missing")
        _fail_sweep(cfg)
        sys.exit(130)
    print(format_summary(stats, f"pikeclient: {hydra_job_info()['job_name']}"))
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
    from pikeclient.sweep import read_parent

    parent = read_parent(HydraConfig.get().sweep.dir)
    if parent is not None:
        from pikeclient.tracking import close_parent_run

        close_parent_run(parent, "FAILED")
