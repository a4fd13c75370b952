"""Checks of values the schema's types cannot judge: numbers that are not numbers, the price table, and
the response cache's file. Each raises a one-line ConfigError naming the key; all run before any call."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from pikeclient.core.errors import ConfigError

SQLITE_HEADER = b"SQLite format 3\x00"


def check_numbers(cfg: DictConfig) -> None:
    """NaN is no setting anywhere (it compares false with every bound, so range checks let it through)."""
    for name in cfg:
        if OmegaConf.is_config(cfg[name]):
            for key, value in _leaves(OmegaConf.to_container(cfg[name], resolve=True), str(name)):
                if isinstance(value, float) and math.isnan(value):
                    raise ConfigError(f"{key}=nan is not a number")


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{index}]")
    else:
        yield prefix, node


def check_finite(key: str, value: float, low: float = 0.0) -> None:
    """``value`` a finite number >= ``low``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{key}={value} is out of range: allowed a finite number >= {low:g}")


def check_pricing(pricing: DictConfig) -> None:
    """Prices finite and >= 0, every price complete, deployments mapped to a priced model, endpoint URLs
    real (an empty one is a prefix of every endpoint, and priced them all)."""
    currency = str(pricing.currency)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,15}", currency):
        raise ConfigError(f"pricing.currency={currency!r}: a currency code such as USD (letters, digits, _; it "
                          "names the cost metric)")
    for model in pricing.models:
        _check_price(f"pricing.models.{model}", pricing.models[model], ("input", "output"))
    deployments = pricing.deployments
    if deployments is not None and not OmegaConf.is_dict(deployments):
        raise ConfigError(f"pricing.deployments={deployments!r}: a mapping of Azure deployment names to models in "
                          "pricing.models, e.g. {prod-chat: gpt-4o}")
    for deployment, model in (deployments or {}).items():
        if not isinstance(model, str) or model not in pricing.models:
            raise ConfigError(f"pricing.deployments.{deployment}={model!r}: no such model in pricing.models")
    for index, entry in enumerate(pricing.endpoints):
        key = f"pricing.endpoints[{index}]"
        url = "" if OmegaConf.is_missing(entry, "url") else str(entry.url)
        parsed = urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{key}.url={url!r}: give the endpoint's http(s) URL (matched as a prefix: an empty "
                              "or partial one would price other endpoints)")
        _check_price(key, entry, ("url", "input", "output"))


def _check_price(key: str, entry: Any, allowed: tuple[str, ...]) -> None:
    if not OmegaConf.is_dict(entry):
        raise ConfigError(f"{key}={entry!r}: give the prices per 1M tokens as {{input: ..., output: ...}}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (allowed: {', '.join(allowed)})")
    for side in ("input", "output"):
        if side not in entry or OmegaConf.is_missing(entry, side):
            raise ConfigError(f"{key}.{side} is missing: give the price per 1M {side} tokens")
        check_finite(f"{key}.{side}", entry[side])


def check_cache_path(path: str | os.PathLike[str]) -> None:
    """The response cache's file can be opened or made: not a folder, not some other file, in a folder
    this process can write (sqlite keeps its journal beside the file). Checked before any call."""
    target = Path(path).expanduser()
    key = f"cache.path={str(path)!r}"
    if target.is_dir():
        raise ConfigError(f"{key} is a folder: name the cache's file in it (e.g. {target / 'cache.db'})")
    if target.exists():
        if not target.is_file():
            raise ConfigError(f"{key} is not a regular file: name the cache's sqlite file")
        with target.open("rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            raise ConfigError(f"{key} holds something else than a sqlite cache: name another file")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: cannot make it, {folder} is a file, not a folder")
    try:  # a real probe: permissions, read-only mounts, /proc and the like all say no the same way
        with tempfile.TemporaryFile(dir=folder, prefix=".pikeclient-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}: cannot write in {folder} ({error.strerror or error})") from None
