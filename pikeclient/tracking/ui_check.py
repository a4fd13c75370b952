"""Check what the MLflow UI serves: ``python -m pikeclient.tracking.ui_check [--screenshot compare.png]``.

Starts ``mlflow ui`` on the tracking store (loopback only; a tracking server is asked directly),
confirms through its REST API that the latest sweep's parent run and child runs are served with their
metrics, and, where Chromium is installed, saves a headless screenshot of the UI's run-compare page
for those runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pikeclient.config.schema import is_server_uri
from pikeclient.testing.server import free_port

REQUIRED_METRICS = ("calls/total", "Latency/p50", "Latency/p95")


@contextmanager
def mlflow_ui(tracking_uri: str, port: int, timeout: float = 90) -> Iterator[str]:
    """Run ``mlflow ui`` on 127.0.0.1:port until the block ends; yields its base URL."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow ui exited: {process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow ui did not answer on {base} within {timeout:.0f} s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def served_by(server: str) -> Iterator[str]:
    """A tracking server (``http://host:port``) is its own UI: check it answers, start nothing."""
    from pikeclient.core.errors import ConfigError
    from pikeclient.tracking.remote import check_reachable

    try:
        check_reachable(server)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    yield server.rstrip("/")


def api(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def served_sweep(base: str, experiment: str) -> dict[str, Any]:
    """The latest sweep as the UI's REST API serves it: experiment id, parent id, children's metrics."""
    exp = api(base, f"experiments/get-by-name?experiment_name={quote(experiment)}")["experiment"]
    search = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
    runs = api(base, "runs/search", search).get("runs", [])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [(r, t) for r, t in zip(runs, tags) if t.get("pikeclient.role") == "sweep"]
    if not parents:
        raise RuntimeError("the UI serves no sweep parent run")
    parent = max(parents, key=lambda pair: pair[0]["info"]["start_time"])[0]
    parent_id = parent["info"]["run_id"]
    children = {
        r["info"]["run_id"]: {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
        for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id
    }
    if not children:
        raise RuntimeError(f"the UI serves no child runs for sweep {parent_id}")
    for run_id, metrics in children.items():
        missing = [m for m in REQUIRED_METRICS if m not in metrics]
        if missing:
            raise RuntimeError(f"run {run_id} is served without {', '.join(missing)}")
    return {"experiment_id": exp["experiment_id"], "parent": parent_id, "children": children}


def find_chromium() -> str | None:
    return next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)


def screenshot(url: str, path: Path, chromium: str) -> Path:
    """Headless Chromium screenshot; flags that keep it off the network and the GPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", "--window-size=1500,1000", "--virtual-time-budget=15000",
               f"--user-data-dir={path.parent / '.chromium-profile'}", f"--screenshot={path.resolve()}", url]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    shutil.rmtree(path.parent / ".chromium-profile", ignore_errors=True)
    return path


def compare_url(base: str, sweep: dict[str, Any]) -> str:
    runs = quote(json.dumps(sorted(sweep["children"])))
    return f"{base}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([sweep['experiment_id']]))}"


def main(argv: Sequence[str] | None = None) -> int:
    from pikeclient.config.schema import default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m pikeclient.tracking.ui_check", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--experiment", default="pikeclient")
    parser.add_argument("--screenshot", type=Path, help="PNG of the run-compare page (needs Chromium)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri("runs")
    with (served_by(uri) if is_server_uri(uri) else mlflow_ui(uri, free_port())) as base:
        try:
            sweep = served_sweep(base, args.experiment)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"served: sweep {sweep['parent']} with {len(sweep['children'])} child runs and their metrics")
        if args.screenshot:
            chromium = find_chromium()
            if chromium is None:
                print("no Chromium found: screenshot skipped (apt-get install chromium)")
            else:
                print(f"screenshot: {screenshot(compare_url(base, sweep), args.screenshot, chromium)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
