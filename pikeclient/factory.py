"""Compose the shipped configs (``compose``) and build a client from them (``create_client``).

Both serve run.py and Python users: ``compose`` finds the configs inside the package, so it works
from any folder, the way ``python run.py`` composes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pikeclient.client import BaseLLMClient
from pikeclient.config import register_configs, validate
from pikeclient.errors import ConfigError, PikeError, one_line

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent / "conf"


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


def create_client(cfg: DictConfig) -> BaseLLMClient:
    """Instantiate ``cfg.llm`` with the config's sampling defaults and retry policy."""
    validate(cfg)
    log.info("Instantiating client <%s>", cfg.llm._target_)
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    retry = OmegaConf.to_container(cfg.retry, resolve=True)
    rate_limit = OmegaConf.to_container(cfg.rate_limit, resolve=True)
    try:
        client = instantiate(cfg.llm, sampling=sampling, retry=retry, rate_limit=rate_limit, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, PikeError):
            raise cause from None
        detail = one_line(cause or error)
        raise ConfigError(f"llm ({cfg.llm._target_}): {detail}") from error
    if not isinstance(client, BaseLLMClient):
        raise ConfigError(f"llm._target_={cfg.llm._target_} did not build a pikeclient client")
    return client
