"""A shared MLflow tracking server (``http://host:port``), seen from pikeclient without importing mlflow.

The experiment process never imports mlflow, and a job must learn that the server is down in seconds,
not after MLflow's HTTP retries (minutes). So the few questions asked before a run starts -- is the
server there, which run is this sweep's parent -- go through MLflow's REST API with urllib and short
timeouts.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from pikeclient.core.errors import ConfigError

# The tracking process's own MLflow HTTP settings (MLflow's defaults retry for minutes per request).
# The tracking process sets these unless the environment does: pikeclient waits out an outage itself
# (tracking.Outage), so one request gives up within seconds and the wait is measured and logged.
TRACKING_PROCESS_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def check_reachable(uri: str, timeout: float = 5.0, attempts: int = 3) -> None:
    """Raise ConfigError (one line) unless the tracking server at ``uri`` answers ``/health``.

    A few quick tries cover a server that is still starting or a dropped packet; a server that is
    down or a wrong port fails within about ``attempts * timeout`` seconds, before any call is made.
    """
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
        except (OSError, ValueError) as failure:  # URLError, refused, timeout, reset; bad URL
            error = failure
        if attempt + 1 < attempts:
            time.sleep(0.5 * (attempt + 1))
    reason = getattr(error, "reason", error) or "no answer"
    raise ConfigError(f"the MLflow tracking server at {uri} is unreachable ({reason}); start it or fix "
                      "tracking.tracking_uri / MLFLOW_TRACKING_URI")


def rest(uri: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """One call to the server's REST API (``/api/2.0/mlflow/<path>``); GET without ``body``, else POST."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/{path}", data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment ``name`` on the server, or None when it does not exist."""
    try:
        return rest(uri, f"experiments/get-by-name?experiment_name={quote(name)}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def search_runs(uri: str, experiment: str, filter_string: str, max_results: int = 10) -> list[dict[str, Any]]:
    """Runs of one experiment matching an MLflow filter string, newest first, as the REST API gives them."""
    body = {"experiment_ids": [experiment], "filter": filter_string, "max_results": max_results,
            "order_by": ["attributes.start_time DESC"]}
    return rest(uri, "runs/search", body).get("runs", [])


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
