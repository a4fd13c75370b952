"""The experiment: push a prompt set through a client with bounded concurrency and record every call.

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
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pikeclient.cache import ResponseCache, cache_key
from pikeclient.client import BaseLLMClient
from pikeclient.config import artifact_root, tracking_uri, validate
from pikeclient.cost import find_price
from pikeclient.dataset import PromptItem, load_prompts
from pikeclient.errors import ConfigError, ContextWindowError, LLMError, PikeError
from pikeclient.factory import create_client
from pikeclient.redact import Redactor, secrets_in
from pikeclient.resume import Earlier, find_job_dir, load_earlier, write_job_file
from pikeclient.sidecar import TrackingSidecar
from pikeclient.stats import RunStats

log = logging.getLogger(__name__)

NON_RETRYABLE = ("auth", "bad_request", "context_window", "model")


class RunStopped(PikeError):
    """The experiment stopped early (authentication failed, or fail_fast met an error)."""


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
    prompts = load_prompts(cfg.dataset.path, cfg.dataset.limit)
    config = redactor.data(OmegaConf.to_container(cfg, resolve=True))
    earlier = find_earlier(cfg, config, prompts, output_dir, hydra_info)
    client = create_client(cfg)
    try:
        check_prompts_fit(client, prompts)
        client.prepare()  # tokenizer tables and the like: never inside a measured call
        output_dir.mkdir(parents=True, exist_ok=True)
        write_job_file(output_dir, config)
        records_path = output_dir / cfg.experiment.records_file
        price = find_price(OmegaConf.to_container(cfg.pricing), client.describe())
        if tracking is not None:
            start_tracking(tracking, cfg, client, redactor.data(hydra_info), output_dir, earlier, redactor)
            tracking.wait_ready()  # a store or experiment that cannot be used fails here, before any call
        warmup = cfg.experiment.warmup if cfg.experiment.warmup is not None else client.default_warmup
        with contextlib.closing(ResponseCache(cfg.cache.path, cfg.cache.mode)) as cache, \
                records_path.open("w", encoding="utf-8") as sink:
            stats = asyncio.run(run_prompts(
                client, prompts, cfg.experiment.concurrency, sink,
                on_record=tracking.add if tracking else None, cache=cache, fail_fast=cfg.experiment.fail_fast,
                warmup=warmup, earlier=earlier, on_begin=tracking.begin if tracking else None, redactor=redactor))
        stats.price = price
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


async def run_prompts(
    client: BaseLLMClient,
    prompts: Sequence[PromptItem],
    concurrency: int,
    sink: IO[str] | None = None,
    on_record: Callable[[dict[str, Any], PromptItem], None] | None = None,
    cache: ResponseCache | None = None,
    fail_fast: bool = False,
    warmup: int = 0,
    earlier: Earlier | None = None,
    on_begin: Callable[[float], None] | None = None,
    redactor: Redactor | None = None,
) -> RunStats:
    """Call ``client`` once per prompt, at most ``concurrency`` calls in flight; stream records to ``sink``.

    A fixed pool of workers pulls prompts from one iterator, so no task is created per prompt and a
    call's latency starts when the call starts, not while it waits for a free slot. ``warmup`` calls
    go first and are discarded. Prompts answered in ``earlier`` are not called again. An
    authentication error stops the run (every further call would fail the same way), and so does any
    error retrying cannot fix when ``fail_fast`` is set.
    """
    stats = RunStats()
    stop: list[str] = []
    identity = client.describe()
    try:
        stats.warmup_calls = await warm_up(client, prompts, warmup, concurrency)

        def emit(record: dict[str, Any], item: PromptItem) -> None:
            if redactor and record["error"] is not None:  # a server may echo the key in its error body
                record["error"] = redactor.text(record["error"])
            stats.add(record)
            if sink is not None:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            if on_record is not None:
                on_record(record, item)

        stats.start_time = time.time()
        if on_begin is not None:
            on_begin(stats.start_time)
        done = earlier.records if earlier else {}
        for index, record in sorted(done.items()):
            emit(record, prompts[index])
        pending = iter([(i, item) for i, item in enumerate(prompts) if i not in done])
        progress = tqdm(total=len(prompts) - len(done), desc="calls", unit="call", file=sys.stderr, disable=None,
                        mininterval=0.5)

        async def worker() -> None:
            for index, item in pending:
                if stop:
                    return
                record = await call_one(client, index, item, cache, identity)
                emit(record, item)
                progress.update(1)
                kind = record["error_kind"]
                if kind == "auth" or (fail_fast and kind in NON_RETRYABLE):
                    stop.append(f"{kind} error on prompt {item.id!r}: {record['error']}")

        start = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts) - len(done)))))
        finally:
            stats.wall_s = time.perf_counter() - start + (earlier.wall_s if earlier else 0.0)
            stats.end_time = time.time()
            progress.close()
    finally:
        await client.aclose()
    if stop:
        raise RunStopped(f"stopped after {stats.calls} of {len(prompts)} prompts: {stop[0]}")
    return stats


async def warm_up(client: BaseLLMClient, prompts: Sequence[PromptItem], count: int, concurrency: int) -> int:
    """``count`` calls on the first prompts, as the run will make them, whose results are discarded.

    They pay for what only the first calls pay (connection set-up, a local model's first batch),
    so that no statistic describes it.
    """
    if count <= 0:
        return 0
    started = time.perf_counter()
    slots = asyncio.Semaphore(concurrency)

    async def one(item: PromptItem) -> None:
        async with slots:
            with contextlib.suppress(LLMError):
                await client.achat(item.messages)

    await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(count)))
    log.info("warm-up: %d calls in %.2f s, not measured", count, time.perf_counter() - started)
    return count


async def call_one(client: BaseLLMClient, index: int, item: PromptItem, cache: ResponseCache | None = None,
                   identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One prompt's record: the answer with its measurements, or the error with its class."""
    record: dict[str, Any] = {"index": index, "id": item.id, "prompt": item.prompt, "start_time": time.time()}
    use_cache = cache is not None and cache.mode != "off"
    key = cache_key(identity or client.describe(), item.messages, client.sampling) if use_cache else None
    try:
        result = cache.get(key) if use_cache else None
        if result is None:
            result = await client.achat(item.messages)
            if use_cache:
                cache.put(key, result)
    except LLMError as error:
        record.update(
            end_time=time.time(), response=None, finish_reason=None,
            usage={"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "source": "none"},
            latency_s=None, attempts=error.attempts, backoff_s=error.backoff_s, ttft_s=None,
            error=str(error), error_kind=error.kind,
        )
        return record
    data = result.to_dict()
    record["end_time"] = time.time()
    record.update(response=data.pop("text"), **data, error=None, error_kind=None)
    if result.cached:  # an earlier answer: none of its timings or attempts belong to this run
        record.update(latency_s=None, ttft_s=None, itl_s=None, tpot_s=None, attempts=0, backoff_s=0.0,
                      throttle_s=0.0, output_tokens_per_s=None)
    else:
        tokens = result.usage.completion_tokens
        record["output_tokens_per_s"] = tokens / result.latency_s if tokens and result.latency_s > 0 else None
    return record


def start_tracking(tracking: TrackingSidecar, cfg: DictConfig, client: BaseLLMClient, hydra_info: dict[str, Any],
                   output_dir: Path, earlier: Earlier | None = None, redactor: Redactor | None = None) -> None:
    """Prepare the MLflow run in the tracking process; a sweep's job becomes a child of the sweep's run."""
    from pikeclient.sweep import read_parent

    redactor = redactor or Redactor(())
    description = redactor.data(client.describe())
    tags = {f"pikeclient.{k}": str(v) for k, v in {**description, **hydra_info}.items()}
    parent = read_parent(hydra_info["sweep_dir"]) if "sweep_dir" in hydra_info else None
    if parent is not None:
        tags["mlflow.parentRunId"] = parent["run_id"]
    tags["pikeclient.output_dir"] = str(output_dir.resolve())
    tracking.start({
        "tracking_uri": tracking_uri(cfg),
        "experiment_name": cfg.tracking.experiment_name,
        "run_name": redactor.text(str(cfg.tracking.run_name or hydra_info.get("job_name") or description["provider"])),
        "tags": tags,
        "artifact_root": artifact_root(cfg),
        "config": redactor.data(OmegaConf.to_container(cfg, resolve=True)),
        "client": description,
        "traces": cfg.tracking.traces,
        "output_dir": str(output_dir),
        "resume_run_id": earlier.run_id if earlier else None,
    })
