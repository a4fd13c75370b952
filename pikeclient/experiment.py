"""The experiment: from a composed config to a tracked run (the calls themselves: ``pikeclient.runner``).

Every line of the dataset is called once per run, repeats included. What is measured starts after
the model is loaded, the client prepared and the warm-up calls made; the MLflow run's start and end
are the measured span. Answers from an interrupted run (``experiment.resume``) keep the measurements
they had; answers from the opt-in response cache (``cache.mode=use``) are counted apart, never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pikeclient.cache import ResponseCache
from pikeclient.client import BaseLLMClient
from pikeclient.config import artifact_root, tracking_uri, validate
from pikeclient.cost import find_price
from pikeclient.dataset import PromptItem, load_prompts
from pikeclient.errors import ConfigError, ContextWindowError, PikeError
from pikeclient.factory import create_client
from pikeclient.load import Strategy, build_limits, build_strategy
from pikeclient.redact import Redactor, secrets_in
from pikeclient.resume import Earlier, find_job_dir, load_earlier, write_job_file
from pikeclient.runner import RunStopped, run_prompts
from pikeclient.sidecar import TrackingSidecar
from pikeclient.stats import RunStats, Slo
from pikeclient.synthetic import synthetic_prompts

log = logging.getLogger(__name__)

__all__ = ["RunFailed", "RunStopped", "run_experiment", "run_prompts"]


class RunFailed(PikeError):
    """The run finished, but too many of its calls failed: its metrics are logged, its run is FAILED."""

    def __init__(self, message: str, stats: RunStats) -> None:
        super().__init__(message)
        self.stats = stats


def run_experiment(cfg: DictConfig, output_dir: str | Path, hydra_info: dict[str, Any] | None = None) -> RunStats:
    """Run ``cfg``'s dataset through ``cfg``'s client; write records to ``output_dir``; log to MLflow.

    Everything that can be checked before a call is made (config, dataset, credentials, model, the
    tracking store) is checked first, so a bad input fails before any call and leaves no run behind.
    """
    validate(cfg)
    redactor = Redactor(secrets_in(OmegaConf.to_container(cfg, resolve=True), os.environ))
    redactor.install()
    redactor.files(Path(output_dir) / ".hydra")  # Hydra wrote the composed config there already
    # The tracking process imports MLflow (~1.5 s of CPU) on another core while this one loads the
    # prompts and the client; it creates the run only when the measured part begins.
    tracking = TrackingSidecar() if cfg.tracking.enabled else None
    try:
        return _run(cfg, Path(output_dir), hydra_info or {}, tracking, redactor)
    except BaseException as error:
        if tracking is not None:
            tracking.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


def _run(cfg: DictConfig, output_dir: Path, hydra_info: dict[str, Any], tracking: TrackingSidecar | None,
         redactor: Redactor) -> RunStats:
    dataset = load_prompts(cfg.dataset.path, cfg.dataset.limit) if cfg.dataset.kind == "jsonl" else None
    strategy = load_strategy(cfg)
    limits = build_limits(cfg.experiment.max_requests, cfg.experiment.max_duration)
    config = redactor.data(OmegaConf.to_container(cfg, resolve=True))
    if dataset is not None:  # a resume that cannot work fails before the model loads
        earlier = find_earlier(cfg, config, repeat_prompts(dataset, cfg.experiment.repeats), output_dir, hydra_info)
    client = create_client(cfg)
    try:
        if dataset is None:  # synthetic prompts are sized with the client's own tokenizer
            d = cfg.dataset
            dataset = synthetic_prompts(client, d.count, d.input_tokens, d.output_tokens, d.input_tokens_std,
                                        d.output_tokens_std, d.seed)
            earlier = find_earlier(cfg, config, repeat_prompts(dataset, cfg.experiment.repeats), output_dir,
                                   hydra_info)
        prompts = repeat_prompts(dataset, cfg.experiment.repeats)
        check_prompts_fit(client, prompts)
        client.prepare()  # tokenizer tables and the like: never inside a measured call
        output_dir.mkdir(parents=True, exist_ok=True)
        write_job_file(output_dir, config)
        records_path = output_dir / cfg.experiment.records_file
        price = find_price(OmegaConf.to_container(cfg.pricing), client.describe())
        if tracking is not None:
            start_tracking(tracking, cfg, config, client, redactor.data(hydra_info), output_dir, earlier, redactor)
            tracking.wait_ready()  # a store or experiment that cannot be used fails here, before any call
        warmup = cfg.experiment.warmup if cfg.experiment.warmup is not None else client.default_warmup
        with contextlib.closing(ResponseCache(cfg.cache.path, cfg.cache.mode)) as cache, \
                records_path.open("w", encoding="utf-8") as sink:
            stats = asyncio.run(run_prompts(
                client, prompts, strategy, sink,
                on_record=tracking.add if tracking else None, cache=cache, fail_fast=cfg.experiment.fail_fast,
                warmup=warmup, earlier=earlier, on_begin=tracking.begin if tracking else None, redactor=redactor,
                limits=limits, slo=Slo(**OmegaConf.to_container(cfg.slo))))
        stats.price = price
        stats.requested_rate = getattr(strategy, "rate", None)
        stats.warn_about_the_client()
        verdict = failure_verdict(stats, cfg.experiment.max_error_rate)
        if tracking is not None:
            tracking.finish(stats.metrics(), stats.tags(), stats.end_time, records_path, output_dir,
                            log_records=cfg.tracking.log_records, status="FAILED" if verdict else "FINISHED")
    finally:
        client.close()
    if stats.token_sources["estimate"]:
        log.warning("%d calls' token counts are estimates (an encoding made for another model): set "
                    "llm.tokenizer to the model's tokenizer for exact counts", stats.token_sources["estimate"])
    if verdict:
        raise RunFailed(verdict, stats)
    return stats


def load_strategy(cfg: DictConfig) -> Strategy:
    """``load`` as a strategy; ``experiment.concurrency``, when set, is the deprecated spelling of
    ``load.concurrency``."""
    concurrency = cfg.load.concurrency
    if cfg.experiment.concurrency is not None:
        log.warning("experiment.concurrency is deprecated: use load.concurrency (load=concurrency)")
        concurrency = cfg.experiment.concurrency
    return build_strategy(cfg.load.kind, concurrency=concurrency, rate=cfg.load.rate,
                          max_in_flight=cfg.load.max_in_flight, seed=cfg.load.seed)


def repeat_prompts(prompts: Sequence[PromptItem], repeats: int) -> list[PromptItem]:
    """The dataset ``repeats`` times over, each pass numbered (records carry ``repeat``)."""
    if repeats < 1:
        raise ConfigError(f"experiment.repeats={repeats} is out of range: allowed >= 1")
    return [replace(item, repeat=r) for r in range(repeats) for item in prompts]


def failure_verdict(stats: RunStats, max_error_rate: float) -> str | None:
    """Why a finished run counts as failed, or None: every call failed, or more than the allowed share."""
    called = stats.calls - stats.cache_hits
    if called and stats.error_count == called:
        return f"every call failed ({_error_summary(stats)})"
    if stats.error_rate > max_error_rate:
        return (f"{stats.error_count} of {called} calls failed ({stats.error_rate:.0%} > "
                f"experiment.max_error_rate={max_error_rate:g}; {_error_summary(stats)})")
    return None


def _error_summary(stats: RunStats) -> str:
    return ", ".join(f"{kind}={count}" for kind, count in stats.errors.most_common())


def find_earlier(cfg: DictConfig, config: Mapping[str, Any], prompts: Sequence[PromptItem], output_dir: Path,
                 hydra_info: Mapping[str, Any]) -> Earlier | None:
    """The interrupted run that ``experiment.resume`` names, checked against this one; None without it."""
    if cfg.experiment.resume is None:
        return None
    job_dir = find_job_dir(str(cfg.experiment.resume), Path(cfg.paths.runs_dir), output_dir,
                           hydra_info.get("job_num"))
    earlier = load_earlier(job_dir, config, prompts, cfg.experiment.records_file)
    if earlier.run_id is not None and cfg.tracking.enabled:
        previous = json.loads((job_dir / "run.json").read_text()).get("tracking_uri")
        if previous and previous != tracking_uri(cfg):
            raise ConfigError(f"experiment.resume: run {earlier.run_id} is in {previous}, not {tracking_uri(cfg)}")
    log.info("resuming %s: %d of %d prompts answered there", job_dir, len(earlier.records), len(prompts))
    return earlier


def check_prompts_fit(client: BaseLLMClient, prompts: Sequence[PromptItem]) -> None:
    """Every prompt fits the model's context window (when it is known), before any call is made."""
    if client.context_window is None:
        return
    for item in prompts:
        try:
            client.check_context(item.messages)
        except ContextWindowError as error:
            raise ConfigError(f"dataset prompt {item.id!r}: {error}") from None


def start_tracking(tracking: TrackingSidecar, cfg: DictConfig, config: Mapping[str, Any], client: BaseLLMClient,
                   hydra_info: dict[str, Any], output_dir: Path, earlier: Earlier | None = None,
                   redactor: Redactor | None = None) -> None:
    """Prepare the MLflow run in the tracking process; a sweep's job becomes a child of the sweep's run.

    A tracking server that does not answer fails here, in seconds and before any call."""
    from pikeclient.remote import check_reachable, is_server_uri
    from pikeclient.sweep import find_parent

    uri = tracking_uri(cfg)
    if is_server_uri(uri):
        check_reachable(uri)
    redactor = redactor or Redactor(())
    description = redactor.data(client.describe())
    tags = {f"pikeclient.{k}": str(v) for k, v in {**description, **hydra_info}.items()}
    parent = (find_parent(hydra_info["sweep_dir"], uri, cfg.tracking.experiment_name)
              if "sweep_dir" in hydra_info else None)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent["run_id"]
    tags["pikeclient.output_dir"] = str(output_dir.resolve())
    tracking.start({
        "tracking_uri": uri,
        "experiment_name": cfg.tracking.experiment_name,
        "run_name": redactor.text(str(cfg.tracking.run_name or hydra_info.get("job_name") or description["provider"])),
        "tags": tags,
        "artifact_root": artifact_root(cfg),
        "config": config,  # resolved and redacted once, in _run
        "client": description,
        "traces": cfg.tracking.traces,
        "output_dir": str(output_dir),
        "resume_run_id": earlier.run_id if earlier else None,
        "reconnect_timeout": cfg.tracking.reconnect_timeout,
    })
