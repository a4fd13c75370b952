"""The experiment: from a composed config to a tracked run (the calls themselves: ``pikeclient.run.runner``).

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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pikeclient.config.factory import build_client
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, ContextWindowError, PikeError
from pikeclient.run.cache import ResponseCache
from pikeclient.run.cost import find_price
from pikeclient.run.dataset import PromptItem, load_prompts
from pikeclient.run.redact import Redactor, secrets_in
from pikeclient.run.resume import Earlier, find_job_dir, load_earlier
from pikeclient.run.runner import RunStopped, run_prompts
from pikeclient.run.settings import RunSettings
from pikeclient.run.stats import RunStats
from pikeclient.run.synthetic import synthetic_prompts
from pikeclient.tracking.job_file import JOB_FILE, write_job_file
from pikeclient.tracking.sidecar import TrackingSidecar

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
    settings = RunSettings.from_config(cfg)
    redactor = Redactor(secrets_in(settings.resolved, os.environ))
    redactor.install()
    redactor.files(Path(output_dir) / ".hydra")  # Hydra wrote the composed config there already
    # The tracking process imports MLflow (~1.5 s of CPU) on another core while this one loads the
    # prompts and the client; it creates the run only when the measured part begins.
    tracking = TrackingSidecar() if settings.config.tracking.enabled else None
    try:
        return _run(settings, Path(output_dir), hydra_info or {}, tracking, redactor)
    except BaseException as error:
        if tracking is not None:
            tracking.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


def _run(settings: RunSettings, output_dir: Path, hydra_info: dict[str, Any], tracking: TrackingSidecar | None,
         redactor: Redactor) -> RunStats:
    c = settings.config
    experiment = c.experiment
    dataset = load_prompts(c.dataset.path, c.dataset.limit) if c.dataset.kind == "jsonl" else None
    config = redactor.data(settings.resolved)
    if dataset is not None:  # a resume that cannot work fails before the model loads
        earlier = find_earlier(settings, config, repeat_prompts(dataset, experiment.repeats), output_dir, hydra_info)
    client = build_client(c.llm, **settings.client_arguments())
    try:
        if dataset is None:  # synthetic prompts are sized with the client's own tokenizer
            d = c.dataset
            dataset = synthetic_prompts(client, d.count, d.input_tokens, d.output_tokens, d.input_tokens_std,
                                        d.output_tokens_std, d.seed)
            earlier = find_earlier(settings, config, repeat_prompts(dataset, experiment.repeats), output_dir,
                                   hydra_info)
        prompts = repeat_prompts(dataset, experiment.repeats)
        check_prompts_fit(client, prompts)
        client.prepare()  # tokenizer tables and the like: never inside a measured call
        output_dir.mkdir(parents=True, exist_ok=True)
        write_job_file(output_dir, config)
        records_path = output_dir / experiment.records_file
        price = find_price(asdict(c.pricing), client.describe())
        if tracking is not None:
            start_tracking(tracking, settings, config, client, redactor.data(hydra_info), output_dir, earlier, redactor)
            tracking.wait_ready()  # a store or experiment that cannot be used fails here, before any call
        warmup = experiment.warmup if experiment.warmup is not None else client.default_warmup
        with contextlib.closing(ResponseCache(c.cache.path, c.cache.mode)) as cache, \
                records_path.open("w", encoding="utf-8", buffering=1) as sink:  # a line each: a kill loses no answer
            stats = asyncio.run(run_prompts(
                client, prompts, settings.strategy, sink,
                on_record=tracking.add if tracking else None, cache=cache, fail_fast=experiment.fail_fast,
                warmup=warmup, earlier=earlier, on_begin=tracking.begin if tracking else None, redactor=redactor,
                limits=settings.limits, slo=settings.slo))
        stats.price = price
        stats.requested_rate = getattr(settings.strategy, "rate", None)
        stats.warn_about_the_client()
        verdict = failure_verdict(stats, experiment.max_error_rate)
        if tracking is not None:
            tracking.finish(stats.metrics(), stats.tags(), stats.end_time, records_path, output_dir,
                            log_records=c.tracking.log_records, status="FAILED" if verdict else "FINISHED")
    finally:
        client.close()
    if stats.token_sources["estimate"]:
        log.warning("%d calls' token counts are estimates (an encoding made for another model): set "
                    "llm.tokenizer to the model's tokenizer for exact counts", stats.token_sources["estimate"])
    if verdict:
        raise RunFailed(verdict, stats)
    return stats


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


def find_earlier(settings: RunSettings, config: Mapping[str, Any], prompts: Sequence[PromptItem], output_dir: Path,
                 hydra_info: Mapping[str, Any]) -> Earlier | None:
    """The interrupted run that ``experiment.resume`` names, checked against this one; None without it."""
    c = settings.config
    if c.experiment.resume is None:
        return None
    job_dir = find_job_dir(str(c.experiment.resume), Path(c.paths.runs_dir), output_dir, hydra_info.get("job_num"))
    earlier = load_earlier(job_dir, config, prompts, c.experiment.records_file)
    if earlier.run_id is not None and c.tracking.enabled:
        previous = json.loads((job_dir / JOB_FILE).read_text()).get("tracking_uri")
        if previous and previous != settings.tracking_uri:
            raise ConfigError(f"experiment.resume: run {earlier.run_id} is in {previous}, not {settings.tracking_uri}")
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


def start_tracking(tracking: TrackingSidecar, settings: RunSettings, config: Mapping[str, Any], client: BaseLLMClient,
                   hydra_info: dict[str, Any], output_dir: Path, earlier: Earlier | None = None,
                   redactor: Redactor | None = None) -> None:
    """Prepare the MLflow run in the tracking process; a sweep's job becomes a child of the sweep's run.

    A tracking server that does not answer fails here, in seconds and before any call."""
    from pikeclient.config.schema import is_server_uri
    from pikeclient.tracking.remote import check_reachable
    from pikeclient.tracking.sweep import find_parent

    uri, track = settings.tracking_uri, settings.config.tracking
    if is_server_uri(uri):
        check_reachable(uri)
    redactor = redactor or Redactor(())
    description = redactor.data(client.describe())
    tags = {f"pikeclient.{k}": str(v) for k, v in {**description, **hydra_info}.items()}
    parent = find_parent(hydra_info["sweep_dir"], uri, track.experiment_name) if "sweep_dir" in hydra_info else None
    if parent is not None:
        tags["mlflow.parentRunId"] = parent["run_id"]
    tags["pikeclient.output_dir"] = str(output_dir.resolve())
    tracking.start({
        "tracking_uri": uri,
        "experiment_name": track.experiment_name,
        "run_name": redactor.text(str(track.run_name or hydra_info.get("job_name") or description["provider"])),
        "tags": tags,
        "artifact_root": settings.artifact_root,
        "config": config,  # resolved and redacted once, in _run
        "client": description,
        "traces": track.traces,
        "output_dir": str(output_dir),
        "resume_run_id": earlier.run_id if earlier else None,
        "reconnect_timeout": track.reconnect_timeout,
    })
