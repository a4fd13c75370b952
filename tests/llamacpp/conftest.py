"""A real llama.cpp server (llama-cpp-python) on loopback, serving SmolLM2-135M-Instruct's GGUF.

Skipped only when llama_cpp cannot be imported (``pip install "llama-cpp-python[server]"``; ``.ci/run``
installs it). The server runs as a subprocess for the whole session and is stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pikeclient.testing.server import free_port

ALIAS = "smollm2"


@dataclass
class LlamaServer:
    url: str  # the OpenAI base URL, .../v1
    process: subprocess.Popen
    log: Path


def start_llama_server(gguf: Path, log: Path, *extra: str) -> LlamaServer:
    """``python -m llama_cpp.server`` on a free loopback port; returns once it answers /v1/models."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/models", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)  # polling a condition, with a deadline
    stop(server)
    pytest.fail(f"llama.cpp server did not answer within 120 s:\n{log.read_text()[-2000:]}")


def stop(server: LlamaServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def smollm2_gguf(models_dir) -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama.cpp tier: llama_cpp is not importable (pip install "llama-cpp-python[server]")')
    from pikeclient.backends.smollm2 import SMOLLM2, ensure_gguf

    return ensure_gguf(SMOLLM2, models_dir)


@pytest.fixture(scope="session")
def llamacpp(smollm2_gguf, tmp_path_factory):
    """The server as benchmarks should run it: streams are never cut for waiting requests."""
    server = start_llama_server(smollm2_gguf, tmp_path_factory.mktemp("llamacpp") / "server.log",
                                "--interrupt_requests", "False")
    yield server
    stop(server)
