"""The experiment: from a composed config to a tracked run (the calls themselves: ``pikeclient.run.runner``).

Every line of the dataset is called once per run, repeats included. What is measured starts after
the model is loaded, the client prepared and the warm-up calls made; the MLflow run's start and end
are the measured span. Answers from an interrupted run (``experiment.resume``) keep the measurements
they had; answers from the opt-in response cache (``cache.mode=use``) are counted apart, never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pikeclient.config.factory import build_client
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, ContextWindowError, PikeError
from pikeclient.core.folderlock import FolderLock
from pikeclient.core.types import SamplingParams
from pikeclient.run.cache import ResponseCache
from pikeclient.run.cost import Price, find_price
from pikeclient.run.dataset import PromptItem, Repeated
from pikeclient.run.datasets import DatasetReader
from pikeclient.run.load import offered_rate
from pikeclient.run.quality import RunScoring, build_evaluator, chain, earlier_quality, usable_evaluator
from pikeclient.run.redact import Redactor, secrets_in
from pikeclient.run.resume import (
    DatasetDigest,
    Earlier,
    dataset_digest,
    find_job_dir,
    load_earlier,
    write_records,
)
from pikeclient.run.runner import RunStopped, run_prompts
from pikeclient.run.settings import RunSettings
from pikeclient.run.stats import RunStats
from pikeclient.run.workers import WorkerPlan, choose_workers
from pikeclient.tracking.job_file import JOB_FILE, read_job_file, write_job_file
from pikeclient.tracking.server_metrics import ServerScraper
from pikeclient.tracking.sidecar import TrackingSidecar

log = logging.getLogger(__name__)

__all__ = ["RunFailed", "RunStopped", "run_experiment", "run_prompts"]


class RunFailed(PikeError):
    """The run finished, but too many of its calls failed: its metrics are logged, its run is FAILED."""

    def __init__(self, message: str, stats: RunStats) -> None:
        super().__init__(message)
        self.stats = stats


def run_experiment(cfg: DictConfig, output_dir: str | Path, hydra_info: dict[str, Any] | None = None,
                   on_calls_done: Callable[[RunStats], None] | None = None) -> RunStats:
    """Run ``cfg``'s dataset through ``cfg``'s client; write records to ``output_dir``; log to MLflow.

    ``on_calls_done(stats)`` is called as soon as the calls are over and every record is written, before
    the tracking process has logged the rest (traces of the last calls, metrics, artifacts): the command
    line prints its summary then, and returns once the run is whole in the store.

    Everything that can be checked before a call is made (config, dataset, credentials, model, the
    tracking store) is checked first, so a bad input fails before any call and leaves no run behind.
    The job folder belongs to this process while it runs: another process resuming it is refused.
    """
    settings = RunSettings.from_config(cfg)
    redactor = Redactor(secrets_in(settings.resolved, os.environ))
    redactor.install()
    output_dir = Path(output_dir)
    redactor.files(output_dir / ".hydra")  # Hydra wrote the composed config there already
    with contextlib.ExitStack() as locks:
        locks.enter_context(FolderLock(output_dir))
        # The tracking process imports MLflow (~1.5 s of CPU) on another core while this one loads the
        # prompts and the client; it creates the run only when the measured part begins.
        tracking = TrackingSidecar() if settings.config.tracking.enabled else None
        try:
            return _run(settings, output_dir, hydra_info or {}, tracking, redactor, locks, on_calls_done)
        except BaseException as error:
            if tracking is not None:
                tracking.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise


def _run(settings: RunSettings, output_dir: Path, hydra_info: dict[str, Any], tracking: TrackingSidecar | None,
         redactor: Redactor, locks: contextlib.ExitStack,
         on_calls_done: Callable[[RunStats], None] | None = None) -> RunStats:
    c = settings.config
    experiment = c.experiment
    reader = settings.dataset
    items = None if reader.needs_client else reader.read()
    config = redactor.data(settings.resolved)
    base = SamplingParams.from_mapping(asdict(c.sampling))
    if items is not None:  # a resume that cannot work fails before the model loads
        digest = dataset_digest(items, base)
        earlier = find_earlier(settings, config, items, digest, output_dir, hydra_info, locks)
    evaluator = build_evaluator(settings)  # a scorer or judge that cannot be built fails before the model loads
    scraper = server_scraper(settings)
    client = build_client(c.llm, **settings.client_arguments())
    scoring = None
    try:
        if items is None:  # prompts sized, filtered or measured with the client's own tokenizer
            items = reader.read(client)
            digest = dataset_digest(items, base)
            earlier = find_earlier(settings, config, items, digest, output_dir, hydra_info, locks)
        prompts = Repeated(items, experiment.repeats)
        check_prompts_fit(client, items)
        check_slo_measurable(settings, client)
        evaluator = usable_evaluator(settings, evaluator, items)
        if earlier is not None and earlier.status == "FINISHED":
            return already_complete(earlier, prompts, settings, tracking)
        client.prepare()  # tokenizer tables and the like: never inside a measured call
        write_job_file(output_dir, config, overrides=hydra_info.get("overrides", []), dataset=digest.as_dict())
        price = find_price(asdict(c.pricing), client.describe())
        if tracking is not None:
            info = {**redactor.data(hydra_info), **price_tags(price)}
            start_tracking(tracking, settings, config, client, info, output_dir, earlier, redactor,
                           dataset=dataset_input(reader, digest))
            tracking.wait_ready()  # a store or experiment that cannot be used fails here, before any call
        records_path = output_dir / experiment.records_file
        write_records(records_path, (earlier.records[i] for i in sorted(earlier.records)) if earlier else ())
        warmup = experiment.warmup if experiment.warmup is not None else client.default_warmup
        scoring = RunScoring.start(settings, evaluator, prompts, output_dir) if evaluator is not None else None
        on_record = chain(tracking.add if tracking else None, scoring.submit if scoring else None)
        on_begin = begin_all(tracking.begin if tracking else None, scraper.begin if scraper else None)
        with contextlib.closing(ResponseCache(c.cache.path, c.cache.mode)) as cache, \
                records_path.open("a", encoding="utf-8", buffering=1) as sink:  # a line each: a kill loses no answer
            stats = asyncio.run(run_prompts(
                client, prompts, settings.strategy, sink,
                on_record=on_record, cache=cache, fail_fast=experiment.fail_fast,
                warmup=warmup, earlier=earlier, before_start=tracking.open_run if tracking else None,
                on_begin=on_begin, redactor=redactor,
                limits=settings.limits, slo=settings.slo, workers=worker_plan(settings, client),
                stop_when_behind=experiment.stop_when_behind))
        if scraper is not None:  # the counters' last values, then the server's series on the run's time axis
            scraper.stop()
            stats.server_series = scraper.series()
            stats.server_totals = scraper.totals()
            scraper.compare(stats.metrics())
        if scoring is not None:  # the judges run now, after the measured calls
            assessments = scoring.finish(records_path, stats)
            if tracking is not None and assessments:  # logged by the tracking process while this one goes on
                tracking.assess(assessments)
        stats.price = price
        stats.timeline.interval_s = experiment.timeline_interval_s
        stats.requested_rate = offered_rate(settings.strategy, items)
        stats.max_in_flight = settings.strategy.max_in_flight
        stats.warn_about_the_client()
        verdict = failure_verdict(stats, experiment.max_error_rate)
        metrics = stats.metrics()
        if on_calls_done is not None:
            on_calls_done(stats)
        if tracking is not None:
            metrics = {**metrics, **stats.series()}  # series by turn: {step: value}
            log.info("MLflow: completing run %s (the last calls' series and traces, metrics, artifacts)",
                     tracking.run_id or "")
            tracking.finish(metrics, stats.tags(), stats.end_time, records_path, output_dir,
                            log_records=c.tracking.log_records, status="FAILED" if verdict else "FINISHED")
            log.info("MLflow: run %s is complete in %s", tracking.run_id, settings.tracking_uri)
        # The headline figures too: what a sweeper choosing the next job reads (hydra_plugins.pikeclient_capacity).
        write_job_file(output_dir, status="FAILED" if verdict else "FINISHED", metrics=stats.metrics(),
                       saturated=stats.saturated)
        if scoring is not None:
            scoring.done()
    finally:
        client.close()
        if scraper is not None:
            scraper.stop()
        if scoring is not None:
            scoring.close()
        elif evaluator is not None:
            evaluator.close()
    if stats.token_sources["estimate"]:
        log.warning("%d calls' token counts are estimates (an encoding made for another model): set "
                    "llm.tokenizer to the model's tokenizer for exact counts", stats.token_sources["estimate"])
    if verdict:
        raise RunFailed(verdict, stats)
    return stats


def worker_plan(settings: RunSettings, client: BaseLLMClient) -> WorkerPlan | None:
    """The workers that make the calls (``load.workers``, ``load.backend``); None: this process makes them."""
    c = settings.config
    count = choose_workers(c.load.workers, c.load.backend, settings.strategy, client.computes_locally)
    if count == 1 and c.load.backend != "ray":
        return None
    return WorkerPlan(count, llm=dict(c.llm), client_arguments=settings.client_arguments(), cache_path=str(c.cache.path),
                      cache_mode=c.cache.mode, backend=c.load.backend, ray_address=c.load.ray_address)


def server_scraper(settings: RunSettings) -> ServerScraper | None:
    """The scraper of ``server_metrics.url`` (None without one), checked before any call."""
    c = settings.config
    if not c.server_metrics.url:
        return None
    return ServerScraper(c.server_metrics.url, c.experiment.timeline_interval_s, c.server_metrics.flavour,
                         c.server_metrics.timeout_s)


def begin_all(*callbacks: Callable[[float], None] | None) -> Callable[[float], None] | None:
    """One ``on_begin`` calling each given callback with the measured start."""
    given = [callback for callback in callbacks if callback is not None]
    if not given:
        return None

    def begin(start_time: float) -> None:
        for callback in given:
            callback(start_time)

    return begin


def already_complete(earlier: Earlier, prompts: Sequence[PromptItem], settings: RunSettings,
                     tracking: TrackingSidecar | None) -> RunStats:
    """A finished run resumed again: nothing is called and its MLflow run is left as it is."""
    if tracking is not None:
        tracking.end("FINISHED")  # never started: the tracking process just stops
    run = f", MLflow run {earlier.run_id}" if earlier.run_id else ""
    log.warning("%s is already complete (%d of %d prompts answered%s, FINISHED): nothing to call",
                earlier.job_dir, len(earlier.records), len(prompts), run)
    stats = RunStats(slo=settings.slo)
    for index in sorted(earlier.records):
        stats.add(earlier.records[index])
    stats.wall_s = earlier.wall_s
    stats.segments = list(earlier.segments)
    stats.quality = earlier_quality(list(earlier.records.values()))
    return stats


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


def find_earlier(settings: RunSettings, config: Mapping[str, Any], items: Sequence[PromptItem],
                 digest: DatasetDigest, output_dir: Path, hydra_info: Mapping[str, Any],
                 locks: contextlib.ExitStack) -> Earlier | None:
    """The interrupted run that ``experiment.resume`` names, checked against this one; None without it.

    ``run.py`` points Hydra at the interrupted job's folder, so the job resumes in place; a job of a
    resumed sweep that never started has no ``run.json`` and runs now. Called from Python with another
    folder, the earlier job's answers are carried into ``output_dir``.
    """
    c = settings.config
    here = output_dir / JOB_FILE
    if c.experiment.resume is None:
        if here.is_file():
            raise ConfigError(f"{output_dir} already holds a job ({JOB_FILE}): complete it with "
                              f"experiment.resume={output_dir}, or give the run another folder")
        return None
    if here.is_file():
        job_dir = output_dir
    elif "sweep_dir" in hydra_info:
        log.info("resuming the sweep: job %s had not started, it runs now", hydra_info.get("job_num"))
        return None
    else:
        job_dir = find_job_dir(str(c.experiment.resume), Path(c.paths.runs_dir), hydra_info.get("overrides"))
        locks.enter_context(FolderLock(job_dir))
    prompts = Repeated(items, c.experiment.repeats)
    base = SamplingParams.from_mapping(asdict(c.sampling))
    earlier = load_earlier(job_dir, config, items, prompts, c.experiment.records_file, base, digest,
                           allow_grown=c.experiment.resume_grown)
    if earlier.run_id is not None and c.tracking.enabled:
        previous = (read_job_file(job_dir) or {}).get("tracking_uri")
        if previous and previous != settings.tracking_uri:
            raise ConfigError(f"experiment.resume: run {earlier.run_id} is in {previous}, not {settings.tracking_uri}")
    added = f"; {earlier.added} prompts added to the dataset since" if earlier.added else ""
    log.info("resuming %s: %d of %d prompts answered there%s", job_dir, len(earlier.records), len(prompts), added)
    return earlier


def dataset_input(reader: DatasetReader, digest: DatasetDigest) -> dict[str, Any]:
    """What MLflow's Datasets column shows for the run: the prompt set's name, source and digest."""
    return {"name": reader.name, "source": reader.source(), **digest.as_dict()}


def check_slo_measurable(settings: RunSettings, client: BaseLLMClient) -> None:
    """An SLO on time to first token needs calls that report one (a streamed answer, or a local model)."""
    slo = settings.slo
    for name in ("ttft_s", "tpot_s"):
        if getattr(slo, name) is not None and not client.measures_ttft:
            raise ConfigError(f"slo.{name}={getattr(slo, name)}: {client.provider} calls report no time to first "
                              "token without streaming (set llm.stream=true), so no call could meet it")


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
                   redactor: Redactor | None = None, dataset: Mapping[str, Any] | None = None) -> None:
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
    tags = {f"pikeclient.{k}": " ".join(map(str, v)) if isinstance(v, list) else str(v)
            for k, v in {**description, **hydra_info}.items()}
    tags.update(source_tags())
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
        "config": run_params(config),  # resolved and redacted once, in _run
        "client": description,
        "traces": track.traces,
        "live_cpu": track.live_cpu,
        "output_dir": str(output_dir),
        "resume_run_id": earlier.run_id if earlier else None,
        "resuming": settings.config.experiment.resume is not None,
        "reconnect_timeout": track.reconnect_timeout,
        "dataset": dict(dataset or {}),
    })


def price_tags(price: Price | None) -> dict[str, str]:
    """The price a run's cost was computed with (``pikeclient.price``), or that it had none."""
    if price is None:
        return {"price": "none"}
    return {"price": f"{price.model}: {price.input_per_m:g} / {price.output_per_m:g} {price.currency} per 1M "
                     "input / output tokens"}


def run_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as MLflow params: what describes this run, without the tables every run shares (the
    price a run used is logged apart)."""
    params = {k: v for k, v in config.items() if k != "pricing"}
    pricing = config.get("pricing") or {}
    if pricing.get("endpoints"):
        params["pricing"] = {"endpoints": pricing["endpoints"]}
    return params


def source_tags() -> dict[str, str]:
    """Who ran what, as MLflow's UI shows it (User and Source columns, the source's git commit)."""
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    tags = {"mlflow.user": _user(), "mlflow.source.type": "LOCAL"}
    if entry is not None and entry.is_file():
        tags["mlflow.source.name"] = str(entry)
        commit = _git_commit(entry.parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return str(os.getuid())


def _git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None
