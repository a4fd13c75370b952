"""The peer load tools, GuideLLM 0.8.1 and AIPerf 0.13, as benchmark contenders: each in its own virtual
environment, their command lines for a fixed request count (closed loop at a concurrency, or open loop at a
rate) against an OpenAI-compatible chat endpoint, and their per-request outputs read into one shape
(``Call``), next to pikeclient's records and the raw SDK's.

The environments are ``bench/.venv-guidellm`` and ``bench/.venv-aiperf``, made on first use with
``-c bench/guidellm-constraints.txt`` (the CPU torch 2.13.0 this machine has; never an uncapped torch).
They are kept apart from pikeclient's: each pins its own httpx, pydantic and transformers.

Both tools count tokens with a tokenizer and cannot fetch one offline: a tiny one is trained here
(``pikeclient.backends.smoke_llama``). Both are told to do no more than their job: no console UI or
dashboard, no server-metrics or GPU scraping, one output file of per-request records (as pikeclient's
``records.jsonl``), AIPerf taking the server's token counts (as pikeclient and GuideLLM do) instead of
re-tokenizing every answer. Everything else is left at their defaults (worker processes included).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench._common import REPO

CONSTRAINTS = REPO / "bench" / "guidellm-constraints.txt"
PACKAGES = {"guidellm": "guidellm==0.8.1", "aiperf": "aiperf==0.13.*"}
MODEL = "gpt-4o-mini"


def peer_binary(name: str) -> Path:
    """The tool's command in its own virtual environment (``bench/.venv-NAME``), made on first use."""
    venv = REPO / "bench" / f".venv-{name}"
    binary = venv / "bin" / name
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(CONSTRAINTS), PACKAGES[name]],
                       check=True)
    return binary


def tiny_tokenizer(folder: Path) -> Path:
    """A tokenizer folder the tools can load offline (trained once per folder)."""
    if not (folder / "tokenizer.json").exists():
        from pikeclient.backends.smoke_llama import build_tiny_llama

        build_tiny_llama(folder)
    return folder


@dataclass(frozen=True)
class Call:
    """One request as a tool saw it: wall-clock send and answer (epoch seconds), and where measured the
    time to first token, the inter-token latency and how late the send was against the tool's schedule."""

    start: float
    end: float
    ttft_s: float | None = None
    itl_s: float | None = None
    dispatch_s: float | None = None
    request_id: str | None = None  # the id the request carried on the wire (X-Request-Id), where the tool sets one


# --- GuideLLM ---------------------------------------------------------------------------------------

def guidellm_command(root: str, prefix: str, *, stream: bool, prompts: Path, tokenizer: Path, out: Path,
                     requests: int, concurrency: int | None = None, rate: float | None = None) -> list[str]:
    """``guidellm run`` for ``requests`` requests of ``prompts`` (a JSONL with a ``prompt`` column) to
    ``root + prefix + /v1/chat/completions``, closed loop at ``concurrency`` (profile ``concurrent``) or
    open loop at ``rate`` (profile ``constant``). It writes ``out/benchmarks.json``."""
    profile = f"kind=concurrent,streams={concurrency}" if concurrency else f"kind=constant,rate={rate:g}"
    return [str(peer_binary("guidellm")), "run",
            "--backend", f"kind=openai_http,target={root}{prefix},model={MODEL},"
                         f"request_format=/v1/chat/completions,validate_backend=false,stream={str(stream).lower()}",
            "--profile", profile,
            "--constraint", f"kind=max_requests,count={requests}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--data", f"kind=json_file,path={prompts}",
            "--output", f"kind=json,path={out / 'benchmarks.json'}",
            "--disable-console"]


def read_guidellm(out: Path) -> list[Call]:
    """The successful requests of the one benchmark in GuideLLM's JSON output."""
    benchmark = json.loads((out / "benchmarks.json").read_text())["benchmarks"][0]
    return [Call(r["request_start_time"], r["request_end_time"], ms(r.get("time_to_first_token_ms")),
                 ms(r.get("inter_token_latency_ms")), r.get("request_dispatch_delay"))
            for r in benchmark["requests"]["successful"]]


# --- AIPerf -----------------------------------------------------------------------------------------

def aiperf_command(root: str, prefix: str, *, stream: bool, prompts: Path, tokenizer: Path, out: Path,
                   requests: int, concurrency: int | None = None, rate: float | None = None) -> list[str]:
    """``aiperf profile`` for ``requests`` requests of ``prompts`` (a JSONL of ``{"text": ...}``) to
    ``root + prefix + /v1/chat/completions``, closed loop at ``concurrency`` or open loop at ``rate``
    (constant arrivals). It writes its artifacts in the folder ``out``."""
    load = ["--concurrency", str(concurrency)] if concurrency else [
        "--request-rate", f"{rate:g}", "--arrival-pattern", "constant"]
    return [str(peer_binary("aiperf")), "profile",
            "--model", MODEL, "--url", root,
            "--endpoint-type", "chat", "--custom-endpoint", f"{prefix}/v1/chat/completions",
            *(["--streaming"] if stream else []),
            *load, "--request-count", str(requests),
            "--input-file", str(prompts), "--custom-dataset-type", "single_turn",
            "--tokenizer", str(tokenizer), "--use-server-token-count",
            "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
            "--artifact-dir", str(out)]


def read_aiperf(out: Path) -> list[Call]:
    """The requests without error in AIPerf's per-request export (``profile_export.jsonl``). It keeps no
    schedule per request, so no dispatch delay."""
    calls = []
    for line in (out / "profile_export.jsonl").read_text().splitlines():
        record = json.loads(line)
        meta, metrics = record["metadata"], record.get("metrics") or {}
        if record.get("error") or meta.get("was_cancelled"):
            continue
        calls.append(Call(meta["request_start_ns"] / 1e9, meta["request_end_ns"] / 1e9,
                          ms(value(metrics.get("time_to_first_token"))),
                          ms(value(metrics.get("inter_token_latency"))), request_id=meta.get("x_request_id")))
    return calls


def value(metric: dict | None) -> float | None:
    return None if metric is None else metric.get("value")


def aiperf_prompts(path: Path, n: int) -> Path:
    """The benchmarks' prompts (bench._common.write_prompts) in AIPerf's ``single_turn`` format."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Benchmark prompt number {i}: say something short."}) + "\n")
    return path


# --- pikeclient and the raw SDK -------------------------------------------------------------------

def read_records(runs_dir: Path) -> list[Call]:
    """The calls without error of the one job under ``runs_dir`` (its ``outputs/<date>/<time>/records.jsonl``;
    MLflow's artifact store holds a copy elsewhere under ``runs_dir``)."""
    found = sorted((runs_dir / "outputs").rglob("records.jsonl"))
    if len(found) != 1:
        raise RuntimeError(f"expected one records.jsonl under {runs_dir}, found {len(found)}")
    calls = []
    for line in found[0].read_text().splitlines():
        r = json.loads(line)
        if r.get("error") is None:
            calls.append(Call(r["start_time"], r["end_time"], r.get("ttft_s"), r.get("itl_s"),
                              r.get("dispatch_delay_s"), r.get("request_id")))
    return calls


def read_raw(out: Path) -> list[Call]:
    """The calls without error in bench/_raw_sdk.py's output: one JSON list per call (start, end, ttft_s,
    itl_s, dispatch_s, error)."""
    rows = (json.loads(line) for line in out.read_text().splitlines())
    return [Call(*row[:5]) for row in rows if row[5] is None]


# --- what the calls say -----------------------------------------------------------------------------

def ms(x: float | None) -> float | None:
    return None if x is None else x / 1000


def span(calls: list[Call]) -> float:
    """Seconds from the first send to the last answer."""
    return max(c.end for c in calls) - min(c.start for c in calls)


def achieved_rate(calls: list[Call]) -> float:
    """Completed requests over the time from the first send to the last answer."""
    return len(calls) / span(calls)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the two nearest ranks."""
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1] if len(values) > 1 \
        else values[0]


def schedule_lag(calls: list[Call], rate: float) -> list[float]:
    """How late each send was against an even schedule at ``rate`` from the first send (the i-th send
    due at first + i/rate): one measure for every tool, whatever each records of its own schedule."""
    starts = sorted(c.start for c in calls)
    return [s - (starts[0] + i / rate) for i, s in enumerate(starts)]
