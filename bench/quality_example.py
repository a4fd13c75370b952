"""The pictures of docs/quality.md, made offline on this machine by a real sweep over two backends.

    python bench/quality_example.py [--root DIR] [--models DIR] [--out docs]

SmolLM2-135M-Instruct in transformers (``llm=smollm2``) and the same model's GGUF behind llama.cpp's
server (``llm=openai`` with ``base_url``; priced with ``pricing.endpoints`` as a self-hosted box billed
per token), each at temperature 0 and 0.7, on ``dataset=qa``. Then the report's quality table and
``--quality`` picture, ``--compare`` of the sweep against its first job, and a headless Chromium
screenshot of MLflow's trace view of one scored call with its assessments. Needs
``llama-cpp-python[server]``, Chromium, and for the assessments pane open, Playwright (``pip install
playwright``: it drives the system's Chromium, no browser download).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import llama_server  # noqa: E402
from pikeclient.backends.smollm2 import SMOLLM2, ensure_gguf  # noqa: E402
from pikeclient.testing.server import free_port  # noqa: E402
from pikeclient.tracking.ui_check import find_chromium, mlflow_ui, screenshot  # noqa: E402


def report(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pikeclient.tracking.report", "--tracking-uri",
                           f"sqlite:///{root / 'runs' / 'mlflow.db'}", *args], capture_output=True, text=True,
                          cwd=REPO, check=True)
    return done.stdout


def scored_trace(root: Path, prompt_id: str) -> tuple[str, str, int]:
    """Experiment id, trace id and assessment count of one scored call (the latest sweep's first job)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pikeclient").experiment_id
    job = client.search_runs([experiment], "tags.`pikeclient.job_num` = '0'", order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    for trace in client.search_traces(locations=[experiment], run_id=job.info.run_id, max_results=500):
        if trace.data.spans[0].attributes.get("pikeclient.prompt_id") == prompt_id:
            return experiment, trace.info.trace_id, len(trace.info.assessments)
    raise SystemExit(f"no trace for prompt {prompt_id!r}")


def trace_screenshot(base: str, experiment: str, trace_id: str, count: int, path: Path) -> Path:
    """The trace view with its assessments pane open, the UI's first-visit panels closed (Playwright,
    driving the system's Chromium); without Playwright, the trace view as it opens."""
    url = f"{base}/#/experiments/{experiment}/traces/{trace_id}"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("pip install playwright for the assessments pane open; a plain screenshot instead")
        return screenshot(url, path, find_chromium() or "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(),
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{base}/#/experiments/{experiment}/traces")
        page.get_by_role("button", name="Got it").click(timeout=60_000)  # the first-visit panels
        page.get_by_role("button", name="Close", exact=True).click()
        page.goto(url)
        page.get_by_role("button", name=f"Assess trace ({count} assessments)").click(timeout=60_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(path))
        browser.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--models", type=Path, default=REPO / "runs" / "models")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="pikeclient-quality-"))
    (root / "runs").mkdir(parents=True, exist_ok=True)
    if not (root / "runs" / "models").exists():
        os.symlink(args.models.resolve(), root / "runs" / "models")  # one converted copy of the model
    gguf = ensure_gguf(SMOLLM2, args.models)
    url, server = llama_server(gguf, root / "llama.log")
    try:
        price = f"pricing.endpoints=[{{url:'{url.removesuffix('/v1')}',input:0.05,output:0.1}}]"
        env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "no-key")}  # llama.cpp takes any
        sweep = ["-m", "llm=smollm2,openai", "sampling.temperature=0,0.7", f"base_url={url}", "dataset=qa",
                 "sampling.max_tokens=96", price]
        subprocess.run([sys.executable, str(REPO / "run.py"), *sweep], cwd=root, check=True, env=env)
    finally:
        server.terminate()
        server.wait(30)
    print(report(root, "--sweep", "latest", "--quality", str(args.out / "quality_example.png")))
    print(report(root, "--compare", "latest", "--baseline", "0"))
    if find_chromium() is not None:
        experiment, trace_id, count = scored_trace(root, "one-colour")
        with mlflow_ui(f"sqlite:///{root / 'runs' / 'mlflow.db'}", free_port()) as base:
            print(trace_screenshot(base, experiment, trace_id, count, args.out / "mlflow_assessments.png"))
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
