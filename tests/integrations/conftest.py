"""The PIKE-RAG tier: PIKE-RAG's own code, from the checkout $PIKERAG_PATH names, calling pikeclient.

It skips, saying why, when PIKERAG_PATH is not set (CI sets it to ../shared/PIKE-RAG) or when what
PIKE-RAG imports is missing (``pip install -r tests/integrations/requirements.txt``).
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

# PIKE-RAG imports torch (its HF client). Torch's threads spin-wait on cores busy with the loopback server and
# the tracking process unless told not to, before torch is imported (here when the tier runs on its own):
# SmolLM2's test took 70 s instead of 18 s on 2 busy cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.integrations.pikerag_env import ENV, checkout, import_pikerag

REQUIREMENTS = "pip install -r tests/integrations/requirements.txt"
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="session")
def pikerag_path() -> Path:
    """PIKE-RAG importable (its checkout on sys.path) and the adapter with it."""
    path = checkout()
    if path is None:
        pytest.skip(f"{ENV} is not set: point it at a PIKE-RAG checkout (CI: ../shared/PIKE-RAG) to run "
                    "PIKE-RAG's own workflows on pikeclient")
    try:
        import_pikerag(path)
        importlib.import_module("pikeclient.integrations.pikerag")
    except ImportError as error:
        missing = getattr(error, "name", None) or getattr(error.__cause__, "name", None) or error
        pytest.skip(f"PIKE-RAG needs {missing}: {REQUIREMENTS}")
    return path


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def build(pikerag_path, tmp_path, api_env, no_tracking_env):
    """Build PikeClientLLM exactly as PIKE-RAG's workflows build their client (qa.py, tagging.py)."""
    from pikerag.llm_client.base import BaseLLMClient
    from pikerag.utils.logger import Logger

    clients = []

    def make(args: dict[str, Any], llm_config: dict[str, Any] | None = None, location: str | None = None,
             auto_dump: bool = True) -> Any:
        llm_client_config = {"module_path": "pikeclient.integrations.pikerag", "class_name": "PikeClientLLM",
                             "args": args, "llm_config": llm_config or {"model": MODEL, "temperature": 0},
                             "cache_config": {"location_prefix": "qa", "auto_dump": auto_dump}}
        client_logger = Logger(name="client", dump_mode="a", dump_folder=str(tmp_path / "logs"))
        client_module = importlib.import_module(llm_client_config["module_path"])
        client_class = getattr(client_module, llm_client_config["class_name"])
        assert issubclass(client_class, BaseLLMClient)
        client = client_class(
            location=location,
            auto_dump=llm_client_config["cache_config"]["auto_dump"],
            logger=client_logger,
            llm_config=llm_client_config["llm_config"],
            **llm_client_config.get("args", {}),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def server_args(server, tmp_path: Path, *overrides: str, **args: Any) -> dict[str, Any]:
    """``args`` for the loopback server through llm=openai, outputs under ``tmp_path``."""
    return {"llm": "openai", "overrides": [f"llm.base_url={server.url}/v1", f"paths.runs_dir={tmp_path / 'runs'}",
                                          *overrides], **args}


def tracked_run(runs_dir: Path, run_id: str | None = None) -> Any:
    """The one MLflow run in ``runs_dir``'s sqlite store (or the one with ``run_id``), read with MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if run_id is not None:
        runs = [r for r in runs if r.info.run_id == run_id]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def ended_run(runs_dir: Path, timeout: float = 60.0) -> Any:
    """The one run, once it has ended: after a SIGTERM its tracking process ends it, a moment after the
    workflow's process is gone (and creates it first if the workflow died before its ``begin`` was read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = tracked_run(runs_dir)
        except AssertionError:  # not created yet
            if time.monotonic() > deadline:
                raise
        else:
            if run.info.status != "RUNNING" or time.monotonic() > deadline:
                return run
        time.sleep(0.2)


def traces_of(runs_dir: Path, run: Any) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    return client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, max_results=500)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
