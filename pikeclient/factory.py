"""Build a client from a composed Hydra config (``create_client``), for run.py and for Python users."""

from __future__ import annotations

import logging

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pikeclient.client import BaseLLMClient
from pikeclient.config import validate
from pikeclient.errors import ConfigError, PikeError

log = logging.getLogger(__name__)


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
        detail = str(cause or error).strip().splitlines()[0]
        raise ConfigError(f"llm ({cfg.llm._target_}): {detail}") from error
    if not isinstance(client, BaseLLMClient):
        raise ConfigError(f"llm._target_={cfg.llm._target_} did not build a pikeclient client")
    return client
