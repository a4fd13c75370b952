"""Structured config: dataclass schemas registered in Hydra's ConfigStore, and validation.

Types are checked when Hydra composes the config (a typo in a key or a string where a number belongs
fails at load time); ranges are checked by :func:`validate`, which turns every problem into one line.
The schemas use ``Optional``/``List`` because OmegaConf 2.3 does not read ``X | None`` annotations.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf 2.3 needs typing generics
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pikeclient.config.checks import check_cache_path, check_numbers, check_pricing
from pikeclient.core.errors import ConfigError
from pikeclient.core.ratelimit import RateLimiter
from pikeclient.core.retry import RetryPolicy
from pikeclient.core.types import SamplingParams

# The job's journal of scores not yet in its records (pikeclient.run.quality).
SCORES_JOURNAL = "scores.jsonl"


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: Optional[List[str]] = None
    seed: Optional[int] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None  # where the server reads it (llm.flavour vllm, llamacpp; local models)


@dataclass
class RetryConfig:
    max_attempts: int = 4
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 20.0
    jitter: bool = True
    max_retry_after: float = 60.0
    deadline: Optional[float] = None


@dataclass
class RateLimitConfig:
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None


@dataclass
class CacheConfig:
    mode: str = "off"
    path: str = MISSING


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment_name: str = "pikeclient"
    run_name: Optional[str] = None
    log_records: bool = True
    traces: bool = True
    live_cpu: float = 0.1
    reconnect_timeout: float = 600.0


@dataclass
class EndpointPrice:
    """A price for one endpoint (a self-hosted server billed by the token, say), matched by URL prefix."""

    url: str = MISSING
    input: float = MISSING
    output: float = MISSING


@dataclass
class PricingConfig:
    currency: str = "USD"
    # {model: {input, output}}; checked by pikeclient.config.checks.check_pricing. Not Dict[str, ModelPrice]:
    # OmegaConf then refuses `+pricing.models.mine={input: 1, output: 2}` ("Error merging override").
    models: Dict[str, Any] = field(default_factory=dict)
    # {deployment: model}; null, not {}: Hydra's struct mode lets `pricing.deployments={prod: gpt-4o}`
    # replace a null but not add keys to an empty mapping; Any: OmegaConf crashes merging into a typed null.
    deployments: Any = None
    endpoints: List[EndpointPrice] = field(default_factory=list)


@dataclass
class LoadConfig:
    """``conf/load/``: when requests go (pikeclient.run.load)."""

    kind: str = "concurrency"
    concurrency: Optional[int] = None  # each strategy's YAML sets what it uses; the others stay null
    rate: Optional[float] = None
    max_in_flight: Optional[int] = None
    seed: Optional[int] = None
    burstiness: Optional[float] = None  # poisson: the gaps' gamma shape
    ramp_up: Optional[float] = None  # constant, poisson: seconds of ramp from ramp_start_rate
    ramp_start_rate: Optional[float] = None
    ramp_shape: Optional[str] = None
    trace: Optional[str] = None  # replay
    time_scale: Optional[float] = None
    block_size: Optional[int] = None
    users: Optional[int] = None  # sessions
    think_time_s: Optional[float] = None
    think_time_dist: Optional[str] = None
    # Any strategy: the calls are made in this many worker processes under one schedule (null: what the
    # machine and the load need; 1: in the run's own process), here or as Ray actors (pikeclient.run.workers).
    workers: Optional[int] = None
    backend: str = "processes"  # processes | ray
    ray_address: Optional[str] = None  # backend=ray: the cluster (null: RAY_ADDRESS, else the running one)


@dataclass
class SloConfig:
    """Service-level objectives a call must meet (null: none)."""

    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    latency_s: Optional[float] = None
    require_correct: bool = False  # a call meets the SLOs only if it passed its pass/fail scores (eval)


@dataclass
class EvalConfig:
    """``conf/eval/``: how answers are scored (pikeclient.eval). ``scorers`` and ``judges`` map a name to a
    ``_target_`` (null drops an inherited one); ``judge`` is an llm-like block (the judges' own client)."""

    scorers: Dict[str, Any] = field(default_factory=dict)
    judges: Dict[str, Any] = field(default_factory=dict)
    judge: Any = None
    judge_sampling: Dict[str, Any] = field(default_factory=dict)
    concurrency: int = 4
    max_pending: int = 4096
    resamples: int = 1000


@dataclass
class ExperimentConfig:
    concurrency: Optional[int] = None  # deprecated: load.concurrency
    records_file: str = "records.jsonl"
    fail_fast: bool = False
    max_error_rate: float = 0.5
    warmup: Optional[int] = None
    resume: Optional[str] = None
    max_requests: Optional[int] = None
    max_duration: Optional[float] = None
    repeats: int = 1
    resume_grown: bool = False
    stop_when_saturated: bool = False  # the over-saturation stop (pikeclient.run.saturation)
    stop_when_behind: bool = True  # an open loop whose client fell hopelessly behind its schedule stops early
    saturation_min_s: float = 5.0
    saturation_window_s: float = 5.0
    saturation_min_calls: int = 10
    timeline_interval_s: int = 1  # the run over time: timeline/* series, one point per this many seconds


@dataclass
class ServerMetricsConfig:
    """The server's Prometheus endpoint, scraped during the run (pikeclient.tracking.server_metrics)."""

    url: Optional[str] = None  # null: not scraped
    flavour: str = "auto"  # auto | vllm | sglang | tgi | llamacpp
    timeout_s: float = 2.0


@dataclass
class PathsConfig:
    runs_dir: str = MISSING


@dataclass
class Config:
    """The root schema; ``llm`` is free-form because each backend takes its own arguments."""

    llm: Any = MISSING
    base_url: Optional[str] = None  # every HTTP backend's llm.base_url unless the backend's own is set
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # a reader's _target_ and its options (conf/dataset/): each reader checks its own (pikeclient.run.datasets)
    dataset: Any = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    server_metrics: ServerMetricsConfig = field(default_factory=ServerMetricsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


_SCHEMAS = {"sampling": SamplingConfig, "retry": RetryConfig, "rate_limit": RateLimitConfig, "cache": CacheConfig,
            "tracking": TrackingConfig, "experiment": ExperimentConfig,
            "load": LoadConfig, "slo": SloConfig, "eval": EvalConfig,
            "pricing": PricingConfig, "server_metrics": ServerMetricsConfig, "paths": PathsConfig}


def register_configs() -> None:
    """Register the schemas; ``conf/config.yaml`` lists ``base_config`` first in its defaults.

    Also the ``${pid:}`` resolver: job and sweep folders carry the launching process's id, so two runs
    started in the same second never share a folder. It is cached like Hydra's ``${now:}``, and Hydra
    copies that cache into every sweep job's config, so all jobs of a sweep agree on its folder.
    """
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True, replace=True)


def sampling_params(cfg: DictConfig) -> SamplingParams:
    return _checked("sampling", lambda: SamplingParams.from_mapping(OmegaConf.to_container(cfg.sampling)))


def retry_policy(cfg: DictConfig) -> RetryPolicy:
    return _checked("retry", lambda: RetryPolicy(**OmegaConf.to_container(cfg.retry)))


def rate_limiter(cfg: DictConfig) -> RateLimiter:
    return _checked("rate_limit", lambda: RateLimiter(**OmegaConf.to_container(cfg.rate_limit)))


def validate(cfg: DictConfig) -> None:
    """Check ranges the schema's types cannot express; raise ConfigError naming the key.

    The load strategy and limits check their own values when they are built (``pikeclient.run.settings``)."""
    check_known_keys(cfg)
    check_numbers(cfg)
    sampling_params(cfg)
    retry_policy(cfg)
    rate_limiter(cfg)
    if cfg.cache.mode not in ("off", "use", "refresh"):
        raise ConfigError(f"cache.mode={cfg.cache.mode!r}: allowed off, use, refresh")
    if cfg.cache.mode != "off":
        check_cache_path(cfg.cache.path)
    check_pricing(cfg.pricing)
    experiment = cfg.experiment
    if experiment.concurrency is not None and experiment.concurrency < 1:
        raise ConfigError(f"experiment.concurrency={experiment.concurrency} is out of range: allowed >= 1")
    if experiment.repeats < 1:
        raise ConfigError(f"experiment.repeats={experiment.repeats} is out of range: allowed >= 1")
    for name, value in OmegaConf.to_container(cfg.slo).items():
        if name != "require_correct" and value is not None and not value > 0:
            raise ConfigError(f"slo.{name}={value} is out of range: allowed > 0 (seconds) or null")
    if not 0.0 <= experiment.max_error_rate <= 1.0:
        raise ConfigError(f"experiment.max_error_rate={experiment.max_error_rate} is out of range: allowed [0, 1]")
    flavours = ("auto", "vllm", "sglang", "tgi", "llamacpp")  # pikeclient.tracking.server_metrics.FLAVOURS
    if cfg.server_metrics.flavour not in flavours:
        raise ConfigError(f"server_metrics.flavour={cfg.server_metrics.flavour!r}: allowed {', '.join(flavours)}")
    if experiment.timeline_interval_s < 1:
        raise ConfigError(f"experiment.timeline_interval_s={experiment.timeline_interval_s} is out of range: allowed "
                          ">= 1 (whole seconds: MLflow's steps are integers)")
    if experiment.warmup is not None and experiment.warmup < 0:
        raise ConfigError(f"experiment.warmup={experiment.warmup} is out of range: allowed >= 0 (null: automatic)")
    records = str(experiment.records_file)
    if not records.strip() or records in (".", "..") or "/" in records or "\\" in records:
        raise ConfigError(f"experiment.records_file={records!r}: give a file name (it goes in the job's folder)")
    if records in (SCORES_JOURNAL, "run.json"):
        raise ConfigError(f"experiment.records_file={records!r}: the job's folder keeps another file of that name")
    if experiment.resume is not None and not str(experiment.resume).strip():
        raise ConfigError("experiment.resume is empty: give a job folder, an MLflow run id, or latest")
    if not 0 < cfg.tracking.live_cpu <= 1:
        raise ConfigError(f"tracking.live_cpu={cfg.tracking.live_cpu} is out of range: allowed > 0 and <= 1")
    if cfg.tracking.reconnect_timeout < 0:
        raise ConfigError(f"tracking.reconnect_timeout={cfg.tracking.reconnect_timeout} is out of range: allowed >= 0")
    if not OmegaConf.is_dict(cfg.dataset) or "_target_" not in cfg.dataset:
        raise ConfigError("dataset must name a reader with _target_ (choose a file in conf/dataset/)")
    if not OmegaConf.is_dict(cfg.llm) or "_target_" not in cfg.llm:
        raise ConfigError("llm must name a backend with _target_ (choose a file in conf/llm/)")
    validate_eval(cfg.eval)


def validate_eval(node: DictConfig) -> None:
    """The ``eval`` group's ranges and shapes; the scorers' targets are imported when the evaluator is built."""
    for key, low in (("concurrency", 1), ("max_pending", 1), ("resamples", 100)):
        if node[key] < low:
            raise ConfigError(f"eval.{key}={node[key]} is out of range: allowed >= {low}")
    for group in ("scorers", "judges"):
        for name, spec in node[group].items():
            if spec is not None and (not OmegaConf.is_dict(spec) or not spec.get("_target_")):
                raise ConfigError(f"eval.{group}.{name}: give a _target_ (a scorer function or class), or null")
    if node.judge is not None and (not OmegaConf.is_dict(node.judge) or not node.judge.get("_target_")):
        raise ConfigError("eval.judge must name a backend with _target_ (as llm does), or be null")
    _checked("eval.judge_sampling", lambda: SamplingParams(**OmegaConf.to_container(node.judge_sampling)))


def check_known_keys(cfg: DictConfig) -> None:
    """Keys the schema does not know fail, also when added with ``+`` (which bypasses Hydra's own check:
    ``+sampling.temprature=0.5`` would otherwise run at temperature 0 without a word)."""
    for name, schema in _SCHEMAS.items():
        node = cfg.get(name)
        if not OmegaConf.is_dict(node):
            continue
        allowed = {f.name for f in fields(schema)}
        unknown = sorted(set(node.keys()) - allowed)
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    unknown = sorted(set(cfg.keys()) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown config group or key")


def _checked(group: str, build: Any) -> Any:
    try:
        return build()
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{group}.{error}") from error


# Config keys and environment variables whose values are credentials. ``api_key_env`` names a
# variable and is safe; a bare ``key`` is, but ``cache_key`` or ``bogus_key`` are not.
_SECRET_NAME = re.compile(r"^((.*_)?(api_?key|access_key|secret|password|token|credential)|key)$", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.match(name))


def default_tracking_uri(runs_dir: str | os.PathLike[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else one sqlite store for all runs and sweep jobs."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: Any) -> str:
    """The store a config logs to: ``tracking.tracking_uri``, else the default above."""
    return cfg.tracking.tracking_uri or default_tracking_uri(cfg.paths.runs_dir)


def is_server_uri(uri: str | None) -> bool:
    """A tracking server, as opposed to a local store (sqlite, file)."""
    return bool(uri) and urlsplit(uri).scheme in ("http", "https")


def artifact_root(cfg: Any) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local store; a tracking server decides
    (with ``--serve-artifacts`` they are uploaded through it, so every machine sees them)."""
    if is_server_uri(tracking_uri(cfg)):
        return None
    return str(Path(cfg.paths.runs_dir).resolve() / "mlartifacts")
