"""Start-up: ``python run.py llm=openai`` on a 1-prompt dataset vs a minimal SDK + MLflow script.

    python bench/bench_startup.py [--repeats 5] [--no-append]

Both make the same single call to the same loopback server and log one MLflow run to the same sqlite
store (created beforehand, as it is after a user's first run). Whole-process wall time, median.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, interleaved_medians, loopback_server, ratio  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

MINIMAL = """
import sys, time
import mlflow, openai
url, store = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(store)
mlflow.set_experiment("minimal")
with mlflow.start_run():
    start = time.perf_counter()
    r = openai.OpenAI(base_url=url, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": "What is the capital of France?"}])
    mlflow.log_metric("latency_s", time.perf_counter() - start)
    mlflow.log_metric("completion_tokens", r.usage.completion_tokens)
"""


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    args = command_line(__doc__, repeats=5).parse_args()
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp, loopback_server(0.0) as url:
        root = Path(tmp)
        (root / "one.jsonl").write_text(json.dumps({"id": "one", "prompt": "What is the capital of France?"}) + "\n")
        store = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
        pike = [sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={url}", "dataset.path=one.jsonl",
                "cache.mode=off"]
        minimal = [sys.executable, "-c", MINIMAL, url, store]
        timed(pike, root, env), timed(minimal, root, env)  # creates the store; warms the page cache
        med = interleaved_medians({"minimal SDK + MLflow script": lambda: timed(minimal, root, env),
                                   "python run.py llm=openai": lambda: timed(pike, root, env)}, args.repeats)
    base = med["minimal SDK + MLflow script"]
    rows = [(k, f"{v:.2f} s ({ratio(v, base)})") for k, v in med.items()]
    rows.append(("torch / transformers imported by an API run", "never (tests/test_imports.py)"))
    emit(f"Start-up, 1 prompt; median of {args.repeats}", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
