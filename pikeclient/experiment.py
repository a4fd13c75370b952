"""The experiment: push a prompt set through a client with bounded concurrency and record every call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pikeclient.cache import ResponseCache, cache_key, scope_of
from pikeclient.client import BaseLLMClient
from pikeclient.config import artifact_root, tracking_uri, validate
from pikeclient.cost import find_price
from pikeclient.dataset import PromptItem, load_prompts
from pikeclient.errors import ConfigError, ContextWindowError, LLMError, PikeError
from pikeclient.factory import create_client
from pikeclient.sidecar import TrackingSidecar
from pikeclient.stats import RunStats

log = logging.getLogger(__name__)

NON_RETRYABLE = ("auth", "bad_request", "context_window", "model")


class RunStopped(PikeError):
    """The experiment stopped early (authentication failed, or fail_fast met an error)."""


def run_experiment(cfg: DictConfig, output_dir: str | Path, hydra_info: dict[str, Any] | None = None) -> RunStats:
    """Run ``cfg``'s dataset through ``cfg``'s client; write records to ``output_dir``; log to MLflow.

    Everything that can be checked before a call is made (config, dataset, credentials, model) is
    checked first, so a bad input fails before an MLflow run or a records file exists.
    """
    validate(cfg)
    # The tracking process imports MLflow (~1.5 s of CPU) on another core while this one loads the
    # prompts and the client; it creates a run only when start_tracking says so.
    tracking = TrackingSidecar() if cfg.tracking.enabled else None
    try:
        return _run(cfg, Path(output_dir), hydra_info or {}, tracking)
    except BaseException as error:
        if tracking is not None:
            tracking.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


def _run(cfg: DictConfig, output_dir: Path, hydra_info: dict[str, Any], tracking: TrackingSidecar | None) -> RunStats:
    prompts = load_prompts(cfg.dataset.path, cfg.dataset.limit)
    client = create_client(cfg)
    try:
        check_prompts_fit(client, prompts)
        output_dir.mkdir(parents=True, exist_ok=True)
        records_path = output_dir / cfg.experiment.records_file
        price = find_price(OmegaConf.to_container(cfg.pricing), client.describe())
        with contextlib.closing(ResponseCache(cfg.cache.path, cfg.cache.mode)) as cache:
            if tracking is not None:
                start_tracking(tracking, cfg, client, hydra_info)
                if client.computes_locally:
                    tracking.wait_ready()  # MLflow's start-up (~3 s of CPU) would slow the first generations
            with records_path.open("w", encoding="utf-8") as sink:
                stats = asyncio.run(run_prompts(client, prompts, cfg.experiment.concurrency, sink,
                                                on_record=tracking.add if tracking else None, cache=cache,
                                                cache_scope=cache_scope(cfg), fail_fast=cfg.experiment.fail_fast))
            stats.price = price
            if tracking is not None:
                tracking.finish(stats.metrics(), records_path, output_dir, log_records=cfg.tracking.log_records)
    finally:
        client.close()
    return stats


def cache_scope(cfg: DictConfig) -> str | None:
    if cfg.cache.scope == "shared":
        return None
    keys = ("llm", "retry", "rate_limit")
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys}
    return scope_of({**settings, "concurrency": cfg.experiment.concurrency})


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
    cache_scope: str | None = None,
    fail_fast: bool = False,
) -> RunStats:
    """Call ``client`` once per prompt, at most ``concurrency`` calls in flight; stream records to ``sink``.

    A fixed pool of workers pulls prompts from one iterator, so no task is created per prompt and a
    call's latency starts when the call starts, not while it waits for a free slot. Answers found in
    ``cache`` are not called again. An authentication error stops the run (every further call would
    fail the same way), and so does any error retrying cannot fix when ``fail_fast`` is set.
    """
    stats = RunStats()
    pending = iter(enumerate(prompts))
    stop: list[str] = []
    progress = tqdm(total=len(prompts), desc="calls", unit="call", file=sys.stderr, disable=None, mininterval=0.5)
    identity = client.describe()

    async def worker() -> None:
        for index, item in pending:
            if stop:
                return
            record = await call_one(client, index, item, cache, identity, cache_scope)
            stats.add(record)
            if sink is not None:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            if on_record is not None:
                on_record(record, item)
            progress.update(1)
            kind = record["error_kind"]
            if kind == "auth" or (fail_fast and kind in NON_RETRYABLE):
                stop.append(f"{kind} error on prompt {item.id!r}: {record['error']}")

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    finally:
        stats.wall_s = time.perf_counter() - start
        progress.close()
        await client.aclose()
    if stop:
        raise RunStopped(f"stopped after {stats.calls} of {len(prompts)} prompts: {stop[0]}")
    return stats


async def call_one(client: BaseLLMClient, index: int, item: PromptItem, cache: ResponseCache | None = None,
                   identity: Mapping[str, Any] | None = None, cache_scope: str | None = None) -> dict[str, Any]:
    """One prompt's record: the answer with its measurements, or the error with its class."""
    record: dict[str, Any] = {"index": index, "id": item.id, "prompt": item.prompt, "start_time": time.time()}
    key = cache_key(identity or client.describe(), item.messages, client.sampling, cache_scope) if cache else None
    try:
        result = cache.get(key) if cache else None
        if result is None:
            result = await client.achat(item.messages)
            if cache:
                cache.put(key, result)
    except LLMError as error:
        record.update(
            response=None, finish_reason=None, usage={"prompt_tokens": None, "completion_tokens": None,
                                                      "total_tokens": None, "source": "none"},
            latency_s=None, attempts=error.attempts, backoff_s=error.backoff_s, ttft_s=None,
            error=str(error), error_kind=error.kind,
        )
        return record
    data = result.to_dict()
    record.update(response=data.pop("text"), **data, error=None, error_kind=None)
    return record


def start_tracking(tracking: TrackingSidecar, cfg: DictConfig, client: BaseLLMClient, hydra_info: dict[str, Any]) -> None:
    """Start the MLflow run in the tracking process; a sweep's job becomes a child of the sweep's run.

    A tracking server that does not answer fails here, in seconds and before any call."""
    from pikeclient.remote import check_reachable, is_server_uri
    from pikeclient.sweep import find_parent

    uri = tracking_uri(cfg)
    if is_server_uri(uri):
        check_reachable(uri)
    description = client.describe()
    tags = {f"pikeclient.{k}": str(v) for k, v in {**description, **hydra_info}.items()}
    parent = (find_parent(hydra_info["sweep_dir"], uri, cfg.tracking.experiment_name)
              if "sweep_dir" in hydra_info else None)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent["run_id"]
    tracking.start({
        "tracking_uri": uri,
        "experiment_name": cfg.tracking.experiment_name,
        "run_name": cfg.tracking.run_name or hydra_info.get("job_name") or description["provider"],
        "tags": tags,
        "artifact_root": artifact_root(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "client": description,
        "traces": cfg.tracking.traces,
        "reconnect_timeout": cfg.tracking.reconnect_timeout,
    })
