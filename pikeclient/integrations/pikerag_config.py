"""From PIKE-RAG's ``llm_client`` block to pikeclient's settings (no PIKE-RAG import needed here).

``args`` choose the backend as ``run.py`` does: the name of a shipped ``llm=`` config, or a block with
``_target_``, plus ``overrides`` in run.py's command-line syntax. ``llm_config`` (what PIKE-RAG sends
with every call) becomes per-call sampling settings, HF generation names included.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pikeclient.config.factory import compose
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import SamplingParams

log = logging.getLogger(__name__)

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
# Names PIKE-RAG's clients pass on as they are: transformers' generate() and newer OpenAI models.
ALIASES = {"max_new_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# PIKE-RAG's own retry settings: pikeclient retries (``retry`` group), once, with the server's Retry-After.
PIKERAG_RETRY_ARGS = {"exponential_backoff_factor": "retry.multiplier", "unit_wait_time": "retry.initial_delay"}
ON_ERROR = ("empty", "raise")


def sampling_from_llm_config(llm_config: Mapping[str, Any]) -> dict[str, Any]:
    """Per-call sampling overrides from PIKE-RAG's ``llm_config`` (``model`` is checked elsewhere).

    ``do_sample: false`` is greedy decoding (temperature 0), as transformers reads it; ``do_sample:
    true`` without a temperature samples at transformers' default of 1.0. Anything pikeclient would not
    send fails here, with the way to send it, rather than being dropped.
    """
    sampling: dict[str, Any] = {}
    for key, value in llm_config.items():
        if key in ("model", "do_sample"):
            continue
        if key == "n":
            if value != 1:
                raise ConfigError(f"llm_config.n={value}: PIKE-RAG reads one answer a call; only n=1 is supported")
            continue
        name = ALIASES.get(key, key)
        if name not in SAMPLING_FIELDS:
            raise ConfigError(f"llm_config.{key}: not a sampling setting pikeclient sends (allowed: "
                              f"{', '.join(sorted(SAMPLING_FIELDS | set(ALIASES) | {'model', 'do_sample', 'n'}))});"
                              " send server-specific ones with args.overrides: ['llm.extra_body={" + key + ": ...}']")
        if name in sampling and sampling[name] != value:
            raise ConfigError(f"llm_config.{key}={value!r} contradicts another name for {name} ({sampling[name]!r})")
        sampling[name] = value
    do_sample = llm_config.get("do_sample")
    if do_sample is False:
        sampling["temperature"] = 0.0
    elif do_sample is True and "temperature" not in sampling:
        sampling["temperature"] = 1.0
    if isinstance(sampling.get("stop"), list):
        sampling["stop"] = tuple(sampling["stop"])
    return sampling


def pikerag_config(llm: str | Mapping[str, Any] | None, overrides: Sequence[str] = (),
                   llm_config: Mapping[str, Any] | None = None, tracking: bool | Mapping[str, Any] = False,
                   max_attempt: int | None = None) -> DictConfig:
    """The composed config for PIKE-RAG's ``args``, as run.py would compose it.

    ``llm`` names a shipped config (``openai``, ``azure_openai``, ``smollm2``, ...) or is a block with
    ``_target_``. A named config's ``model`` is PIKE-RAG's ``llm_config.model`` unless an override sets
    ``llm.model``. ``max_attempt`` (PIKE-RAG's name) is ``retry.max_attempts``. ``tracking``: false (off),
    true (the ``tracking`` group as composed), or a mapping of ``tracking.*`` settings.
    """
    overrides = [str(o) for o in overrides]
    llm_config = llm_config or {}
    if isinstance(llm, str) and llm.strip():
        cfg = compose([f"llm={llm}", *overrides])
        if llm_config.get("model") and "model" in cfg.llm and not _overridden(overrides, "llm.model"):
            cfg.llm.model = str(llm_config["model"])
    elif isinstance(llm, Mapping) and "_target_" in llm:
        if _overridden(overrides, "llm"):
            raise ConfigError("args.overrides: with an args.llm block, give the backend's settings inside the block")
        cfg = compose(overrides)
        with open_dict(cfg):
            cfg.llm = OmegaConf.create(dict(llm))
    else:
        raise ConfigError("args.llm: name a shipped llm config (openai, azure_openai, azure_meta_llama, smollm2, "
                          f"hf_meta_llama) or give a block with _target_ (got {llm!r})")
    if max_attempt is not None:
        if _overridden(overrides, "retry.max_attempts"):
            raise ConfigError("args.max_attempt and retry.max_attempts both given: keep one")
        cfg.retry.max_attempts = max_attempt
    _set_tracking(cfg, tracking)
    return cfg


def _set_tracking(cfg: DictConfig, tracking: bool | Mapping[str, Any]) -> None:
    if isinstance(tracking, Mapping):
        settings = {"enabled": True, **tracking}
        unknown = sorted(set(settings) - set(cfg.tracking.keys()))
        if unknown:
            raise ConfigError(f"args.tracking.{unknown[0]}: unknown key (allowed: {', '.join(cfg.tracking.keys())})")
        cfg.tracking = OmegaConf.merge(cfg.tracking, settings)
    elif isinstance(tracking, bool):
        cfg.tracking.enabled = tracking
    else:
        raise ConfigError(f"args.tracking={tracking!r}: give true, false or a mapping of tracking settings")


def _overridden(overrides: Sequence[str], key: str) -> bool:
    """Whether an override sets ``key`` or something under it (``llm.model=x``, ``+llm.x=1``, ``~llm.x``)."""
    for override in overrides:
        name = override.lstrip("+~").split("=", 1)[0].strip()
        if name == key or name.startswith((key + ".", key + "@")):
            return True
    return False


def check_args(unknown: Mapping[str, Any], on_error: str) -> None:
    """PIKE-RAG's retry settings and unknown ``args`` fail with one line naming what to use instead."""
    for name, setting in PIKERAG_RETRY_ARGS.items():
        if name in unknown:
            raise ConfigError(f"args.{name}: pikeclient retries, with the server's Retry-After; set {setting} in "
                              "args.overrides (or choose retry=patient)")
    if unknown:
        raise ConfigError(f"args.{min(unknown)}: unknown argument of PikeClientLLM (allowed: llm, overrides, "
                          "tracking, output_dir, on_error, max_attempt)")
    if on_error not in ON_ERROR:
        raise ConfigError(f"args.on_error={on_error!r}: allowed {', '.join(ON_ERROR)}")


def log_dir_of(logger: Any) -> Path | None:
    """The folder PIKE-RAG's client logger writes to (the workflow's ``log_dir``), if it writes a file."""
    for handler in getattr(logger, "handlers", ()):
        filename = getattr(handler, "baseFilename", None)
        if filename:
            return Path(filename).parent
    return None


def default_output_dir(logger: Any, runs_dir: str) -> Path:
    """A new folder (made here) for a tracked workflow's records: beside PIKE-RAG's own logs
    (``<log_dir>/pikeclient/<date>_<time>-<pid>``), or without a log file under ``<runs_dir>/pikerag/``."""
    log_dir = log_dir_of(logger)
    root = log_dir / "pikeclient" if log_dir is not None else Path(runs_dir) / "pikerag"
    stem = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{os.getpid()}"
    for number in range(1, 1000):  # a second client of the same process in the same second gets its own
        folder = root / (stem if number == 1 else f"{stem}-{number}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"cannot make a new records folder under {root}")
