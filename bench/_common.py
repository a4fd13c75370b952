"""Benchmark plumbing: a loopback server in its own process, generated prompt sets, composed configs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pikeclient.testing.server import free_port

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-bench"


def interleaved_medians(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each contender's median wall time; rounds interleave them, so drift on the machine hits all alike,
    and every other round runs them in reverse order, so none always goes first (or right after another)."""
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(repeats):
        order = list(contenders.items())
        for name, run in order[::-1] if round_number % 2 else order:
            walls[name].append(run())
    return {name: sorted(values)[len(values) // 2] for name, values in walls.items()}


@contextlib.contextmanager
def loopback_server(latency: float = 0.0, *extra: str, cpus: set[int] | None = None,
                    keep_log: bool = False) -> Iterator[str]:
    """The fake OpenAI server in a separate process (so it does not share the client's GIL); yields /v1 URL.

    ``cpus``: the cores the server may use (the caller keeps the others for the client); ``keep_log``: the
    server keeps when each request arrived (``GET /_received``)."""
    port = free_port()
    command = [sys.executable, "-m", "pikeclient.testing.server", "--port", str(port), "--latency", str(latency),
               *(() if keep_log else ("--no-log",)), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    if cpus:
        os.sched_setaffinity(process.pid, cpus)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)



def llama_server(gguf: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """llama.cpp's server (llama-cpp-python) on a free loopback port, serving ``gguf`` as ``smollm2``:
    its /v1 URL and process, once it answers (the caller terminates it)."""
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", *extra]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return url, process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"llama.cpp server did not start: {log.read_text()[-2000:]}")

def write_prompts(path: Path, n: int) -> Path:
    """``n`` distinct short prompts (a benchmark measures the client, not the prompt)."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Benchmark prompt number {i}: say something short."}) + "\n")
    return path


def compose_config(*overrides: str, runs_dir: Path) -> DictConfig:
    from pikeclient.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "pikeclient" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.runs_dir = str(runs_dir)
    return cfg


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}x"
