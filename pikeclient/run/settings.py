"""A run's settings, typed and checked, built once from the composed Hydra config.

``run.py`` composes a DictConfig; :meth:`RunSettings.from_config` checks it (one line per problem,
before any call), turns it into the schema's dataclasses and builds what the config describes: the
load strategy, the limits, the SLOs, the tracking store. Everything below takes these settings, not
the DictConfig.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pikeclient.config.schema import Config, ExperimentConfig, artifact_root, tracking_uri, validate
from pikeclient.core.errors import ConfigError
from pikeclient.run.datasets import DatasetReader, build_dataset
from pikeclient.run.load import Limit, Strategy, build_limits, build_strategy
from pikeclient.run.saturation import build_over_saturation
from pikeclient.run.stats import Slo
from pikeclient.run.workers import WORKER_SETTINGS, check_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """``config``: every group as the schema's dataclasses (``config.llm``: the backend's arguments);
    ``resolved``: the same as plain data, what the run logs (redacted first) and ``run.json`` keeps."""

    config: Config
    resolved: dict[str, Any]
    dataset: DatasetReader
    strategy: Strategy
    limits: tuple[Limit, ...]
    slo: Slo
    tracking_uri: str
    artifact_root: str | None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        validate(cfg)
        config = cast(Config, OmegaConf.to_object(cfg))
        experiment = config.experiment
        load = {k: v for k, v in asdict(config.load).items() if k not in ("kind", *WORKER_SETTINGS)}
        if experiment.concurrency is not None:
            log.warning("experiment.concurrency is deprecated: use load.concurrency (load=concurrency)")
            load["concurrency"] = experiment.concurrency
        strategy = build_strategy(config.load.kind, **load)
        trace = getattr(strategy, "prompts", None)  # a replayed trace is the run's prompts too
        dataset = trace() if trace else build_dataset(config.dataset)
        check_workers(config.load)
        if getattr(dataset, "conversations", False) and not getattr(strategy, "sessions", False):
            raise ConfigError(f"dataset.conversations=true needs load=sessions (turn k goes after the real answers to "
                              f"turns 1..k-1), not load={config.load.kind}")
        return cls(
            config=config,
            resolved=cast(dict, OmegaConf.to_container(cfg, resolve=True)),
            dataset=dataset,
            strategy=strategy,
            limits=tuple(build_limits(experiment.max_requests, experiment.max_duration)) + saturation(experiment, strategy),
            slo=Slo(**asdict(config.slo)),
            tracking_uri=tracking_uri(config),
            artifact_root=artifact_root(config),
        )

    def client_arguments(self) -> dict[str, dict[str, Any]]:
        """The groups a client is built from besides ``llm`` (see ``pikeclient.config.factory.build_client``)."""
        c = self.config
        return {"sampling": asdict(c.sampling), "retry": asdict(c.retry), "rate_limit": asdict(c.rate_limit)}


def saturation(experiment: ExperimentConfig, strategy: Strategy) -> tuple[Limit, ...]:
    """The over-saturation stop, when ``experiment.stop_when_saturated`` asks for it (an open loop's rate is
    what answers must keep up with; a replayed trace has none)."""
    stop = build_over_saturation(experiment.stop_when_saturated, getattr(strategy, "rate", None),
                                 experiment.saturation_min_s, experiment.saturation_window_s,
                                 experiment.saturation_min_calls)
    return () if stop is None else (stop,)
