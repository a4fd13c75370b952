"""Compose the shipped configs (``compose``) and build a client from them (``create_client``).

Both serve run.py and Python users: ``compose`` finds the configs inside the package, so it works
from any folder, the way ``python run.py`` composes them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
import typing
from collections import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pikeclient.config.schema import register_configs, validate
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, PikeError, one_line

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The config ``python run.py OVERRIDES`` would run, without Hydra's own ``hydra`` block.

    ``compose(["llm=openai", "llm.base_url=http://127.0.0.1:8000/v1"])``; relative paths in it
    (``paths.runs_dir``) are relative to the current folder, as for run.py.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"cannot compose {config_name} with {list(overrides)}: {one_line(error)}") from error


# Built from the sampling, retry and rate_limit groups, not from llm.*.
INJECTED = ("sampling", "retry", "rate_limit")


def create_client(cfg: DictConfig) -> BaseLLMClient:
    """Instantiate ``cfg.llm`` with the config's sampling defaults and retry policy."""
    validate(cfg)
    groups = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("llm", *INJECTED)}
    return build_client(**groups)


def build_client(llm: Mapping[str, Any], sampling: Mapping[str, Any], retry: Mapping[str, Any],
                 rate_limit: Mapping[str, Any]) -> BaseLLMClient:
    """The backend ``llm`` names (``_target_`` and its arguments, resolved), with the sampling defaults,
    retry policy and rate limit of the ``sampling``, ``retry`` and ``rate_limit`` groups."""
    check_backend_args(dict(llm))
    target = llm["_target_"]
    log.info("Instantiating client <%s>", target)
    try:
        client = instantiate(dict(llm), sampling=dict(sampling), retry=dict(retry), rate_limit=dict(rate_limit),
                             _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, PikeError):
            raise cause from None
        detail = one_line(cause or error)
        raise ConfigError(f"llm ({target}): {detail}") from error
    if not isinstance(client, BaseLLMClient):
        raise ConfigError(f"llm._target_={target} did not build a pikeclient client")
    return client


def check_backend_args(llm: dict[str, Any]) -> None:
    """Each ``llm.*`` value against the type its backend's constructor declares, before it is built.

    ``llm`` is free-form in the schema (each backend takes its own arguments), so without this a
    ``llm.stream=maybe`` would stream (a non-empty string is true) and ``llm.context_window=abc``
    would fail deep inside a call.
    """
    check_target_args("llm", llm, INJECTED)


def check_target_args(group: str, spec: Mapping[str, Any], injected: Sequence[str] = ()) -> Any:
    """Each ``<group>.*`` value of a ``_target_`` block against the type its builder declares; the builder.

    An unknown key fails naming the allowed ones (``injected`` are passed by the caller, not the config)."""
    target = str(spec.get("_target_"))
    module, _, name = target.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{group}._target_={target}: cannot import it ({error})") from None
    if inspect.isclass(builder) and issubclass(builder, BaseLLMClient):
        # A backend passes ``**kwargs`` up to its base classes: their arguments count too.
        inits = [c.__init__ for c in reversed(builder.__mro__) if issubclass(c, BaseLLMClient)]
        takes_any = False
    else:
        inits = [builder.__init__ if inspect.isclass(builder) else builder]
        parameters = inspect.signature(inits[0]).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    hints: dict[str, Any] = {}
    known: set[str] = set()
    for init in inits:
        hints.update(_hints(init))
        known.update(p.name for p in inspect.signature(init).parameters.values()
                     if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD)
    for key, value in spec.items():
        if key.startswith("_") or key in injected:
            continue
        if key not in known:
            if takes_any:
                continue
            allowed = ", ".join(sorted(known - set(injected)))
            raise ConfigError(f"{group}.{key}: unknown argument of {builder.__name__} (allowed: {allowed})")
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            raise ConfigError(f"{group}.{key}={value!r}: expected {_type_name(hint)}")
    return builder


def _hints(function: Any) -> dict[str, Any]:
    try:
        return {k: v for k, v in typing.get_type_hints(function).items() if k != "return"}
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing rather than fail
        return {}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (dict, Mapping, abc.Mapping) or (inspect.isclass(base) and issubclass(base, abc.Mapping)):
        return isinstance(value, dict)
    if base in (list, tuple, abc.Sequence):
        return isinstance(value, (list, tuple))
    return True  # a type config values cannot hold (a client object): left to the constructor


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(typing.get_origin(hint) or hint, "__name__", str(hint)))
