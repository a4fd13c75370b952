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
from dataclasses import replace
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
from pikeclient.load import Concurrency, Limit, Strategy, build_limits, build_strategy
from pikeclient.redact import Redactor, secrets_in
from pikeclient.resume import Earlier, find_job_dir, load_earlier, write_job_file
from pikeclient.sidecar import TrackingSidecar
from pikeclient.stats import RunStats, Slo
from pikeclient.synthetic import synthetic_prompts

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
            start_tracking(tracking, cfg, client, redactor.data(hydra_info), output_dir, earlier, redactor)
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


async def run_prompts(
    client: BaseLLMClient,
    prompts: Sequence[PromptItem],
    load: int | Strategy,
    sink: IO[str] | None = None,
    on_record: Callable[[dict[str, Any], PromptItem], None] | None = None,
    cache: ResponseCache | None = None,
    fail_fast: bool = False,
    warmup: int = 0,
    earlier: Earlier | None = None,
    on_begin: Callable[[float], None] | None = None,
    redactor: Redactor | None = None,
    limits: Sequence[Limit] = (),
    slo: Slo | None = None,
) -> RunStats:
    """Call ``client`` once per prompt under the ``load`` strategy; stream records to ``sink``.

    ``load`` is a strategy from ``pikeclient.load`` (an int means that many workers in a closed loop).
    ``warmup`` calls go first and are discarded. Prompts answered in ``earlier`` are not called again;
    ``limits`` end the sending early. An authentication error stops the run (every further call would
    fail the same way), and so does any error retrying cannot fix when ``fail_fast`` is set.
    """
    strategy = Concurrency(load) if isinstance(load, int) else load
    stats = RunStats(slo=slo)
    try:
        stats.warmup_calls = await warm_up(client, prompts, warmup, strategy.max_in_flight)
        stats.start_time = time.time()
        if on_begin is not None:
            on_begin(stats.start_time)
        done = earlier.records if earlier else {}
        todo = [(i, item) for i, item in enumerate(prompts) if i not in done]
        calls = _Calls(client, stats, sink, on_record, cache, fail_fast, redactor, limits, len(todo))
        for index, record in sorted(done.items()):
            calls.emit(record, prompts[index])
        lag = LoopLag()
        watcher = asyncio.create_task(lag.watch())
        start = time.perf_counter()
        try:
            if strategy.open_loop:
                await calls.open_loop(todo, strategy, start)
            else:
                await calls.closed_loop(todo, strategy.max_in_flight, start)
        finally:
            stats.wall_s = time.perf_counter() - start + (earlier.wall_s if earlier else 0.0)
            stats.end_time = time.time()
            watcher.cancel()
            stats.loop_lags = lag.samples
            calls.progress.close()
    finally:
        await client.aclose()
    if calls.stop:
        raise RunStopped(f"stopped after {stats.calls} of {len(prompts)} prompts: {calls.stop[0]}")
    return stats


class _Calls:
    """Makes and records the calls of one run, under a closed or an open loop."""

    def __init__(self, client: BaseLLMClient, stats: RunStats, sink: IO[str] | None,
                 on_record: Callable[[dict[str, Any], PromptItem], None] | None, cache: ResponseCache | None,
                 fail_fast: bool, redactor: Redactor | None, limits: Sequence[Limit], total: int) -> None:
        self.client, self.stats, self.sink, self.on_record, self.cache = client, stats, sink, on_record, cache
        self.fail_fast, self.redactor, self.limits = fail_fast, redactor, limits
        self.identity = client.describe()
        self.stop: list[str] = []
        self.sent = 0
        self.progress = tqdm(total=total, desc="calls", unit="call", file=sys.stderr, disable=None, mininterval=0.5)

    def allowed(self, start: float) -> bool:
        """No stop asked for, and every limit still allows another request."""
        elapsed = time.perf_counter() - start
        return not self.stop and all(limit.allows(self.sent, elapsed) for limit in self.limits)

    def emit(self, record: dict[str, Any], item: PromptItem) -> None:
        if self.redactor and record["error"] is not None:  # a server may echo the key in its error body
            record["error"] = self.redactor.text(record["error"])
        self.stats.add(record)
        if self.sink is not None:
            self.sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.on_record is not None:
            self.on_record(record, item)

    async def one(self, index: int, item: PromptItem, due: float | None = None) -> None:
        """One call; ``due`` (perf_counter) is when an open loop scheduled it: its dispatch delay is kept."""
        self.sent += 1
        late = None if due is None else time.perf_counter() - due
        record = await call_one(self.client, index, item, self.cache, self.identity)
        if late is not None:
            record["dispatch_delay_s"] = late
        self.stats.slo_verdict(record)
        self.emit(record, item)
        self.progress.update(1)
        kind = record["error_kind"]
        if kind == "auth" or (self.fail_fast and kind in NON_RETRYABLE):
            self.stop.append(f"{kind} error on prompt {item.id!r}: {record['error']}")

    async def closed_loop(self, todo: Sequence[tuple[int, PromptItem]], workers: int, start: float) -> None:
        """A fixed pool of workers pulls prompts from one iterator: no task per prompt, and a call's
        latency starts when the call starts, not while it waits for a free worker."""
        pending = iter(todo)

        async def worker() -> None:
            for index, item in pending:
                if not self.allowed(start):
                    return
                await self.one(index, item)

        await asyncio.gather(*(worker() for _ in range(min(workers, len(todo)))))

    async def open_loop(self, todo: Sequence[tuple[int, PromptItem]], strategy: Strategy, start: float) -> None:
        """Requests go when they are due, whether or not earlier ones returned; ``max_in_flight`` caps
        them, and a request held back by the cap (or by a busy loop) records how late it went."""
        slots = asyncio.Semaphore(strategy.max_in_flight)
        tasks: set[asyncio.Task] = set()

        async def send(index: int, item: PromptItem, due: float) -> None:
            try:
                await self.one(index, item, due)
            finally:
                slots.release()

        for (index, item), offset in zip(todo, strategy.offsets()):
            due = start + offset
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.allowed(start):
                break
            await slots.acquire()
            task = asyncio.create_task(send(index, item, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)


class LoopLag:
    """Samples how late the event loop wakes a 10 ms timer: the client's own headroom.

    A busy loop delays every timestamp taken on it; when the lag is high, latencies partly measure
    the client, not the server.
    """

    INTERVAL = 0.01

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.INTERVAL)
            self.samples.append(max(0.0, time.perf_counter() - before - self.INTERVAL))


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
    if item.repeat:
        record["repeat"] = item.repeat
    overrides = {"max_tokens": item.max_tokens} if item.max_tokens else {}
    if overrides:
        record["requested_output_tokens"] = item.max_tokens
    use_cache = cache is not None and cache.mode != "off"
    key = cache_key(identity or client.describe(), item.messages, client.sampling.merged(overrides)) if use_cache else None
    try:
        result = cache.get(key) if use_cache else None
        if result is None:
            result = await client.achat(item.messages, **overrides)
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
