"""``run.json`` in every job folder: the job's resolved config and, once tracking has made it, its MLflow
run id. The experiment writes it first, the tracking process again with the run id; ``experiment.resume``
(``pikeclient.run.resume``) reads it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

JOB_FILE = "run.json"


def write_job_file(output_dir: str | Path, config: Mapping[str, Any], run_id: str | None = None,
                   tracking_uri: str | None = None) -> None:
    """``run.json``: what a later ``experiment.resume`` needs. Written atomically (a kill leaves old or new)."""
    path = Path(output_dir) / JOB_FILE
    data = {"config": config, "run_id": run_id, "tracking_uri": tracking_uri}
    tmp = path.with_name(f".{JOB_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)
