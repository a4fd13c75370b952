"""What logging scores as MLflow assessments costs per trace: MLflow's create_assessment (one transaction
per assessment) against AssessmentLogger's one transaction per batch, on one sqlite store, in one run.

Each call's trace (written as the tracking process writes it) gets ``--feedbacks`` Feedbacks and
``--expectations`` Expectations. Reported: milliseconds per trace of each path and their ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import command_line, emit  # noqa: E402
from pikeclient.eval.score import CODE, Score  # noqa: E402
from pikeclient.tracking.assessments import AssessmentLogger  # noqa: E402
from pikeclient.tracking.process import CallLogger, MlflowRun, get_or_create_experiment, open_client  # noqa: E402


def traces(folder: Path, count: int) -> tuple:
    client = open_client(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
    experiment = get_or_create_experiment(client, "bench", str(folder / "artifacts"))
    run = MlflowRun.create(client, experiment, run_name="assessments")
    calls = CallLogger(run, {"model": "m", "provider": "openai"}, traces=True)
    now = time.time()
    calls.write([({"index": n, "id": f"p{n}", "start_time": now + n / 1000, "latency_s": 0.01, "attempts": 1,
                   "error": None, "response": "Paris", "finish_reason": "stop",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                  [{"role": "user", "content": "Capital?"}]) for n in range(count)])
    return client, experiment, run, calls.trace_ids


def main() -> None:
    args = command_line(__doc__, traces=200, feedbacks=2, expectations=2).parse_args()
    scores = {f"scorer_{k}": Score(k % 2 == 0, "why", CODE, f"scorer_{k}") for k in range(args.feedbacks)}
    expects = {f"kind_{k}": ["Paris"] for k in range(args.expectations)}
    with tempfile.TemporaryDirectory() as tmp:
        client, experiment, run, ids = traces(Path(tmp), args.traces)
        half = len(ids) // 2
        timings = {}
        for name, bulk, chunk in (("create_assessment", False, ids[:half]), ("one transaction", True, ids[half:])):
            logger = AssessmentLogger(client, experiment, run_id=run.run_id, bulk=bulk)
            started = time.perf_counter()
            logger.log((trace_id, scores, expects) for trace_id in chunk)
            timings[name] = (time.perf_counter() - started) / len(chunk) * 1000
    each = args.feedbacks + args.expectations
    emit("Assessments per trace on a sqlite store", [
        ("setting", f"{args.traces // 2} traces a path, {args.feedbacks} feedbacks + {args.expectations} expectations"),
        ("create_assessment, per trace (ms)",
         f"{timings['create_assessment']:.2f} ({timings['create_assessment'] / each:.2f} each)"),
        ("one transaction, per trace (ms)", f"{timings['one transaction']:.2f}"),
        ("ratio", f"{timings['create_assessment'] / timings['one transaction']:.0f}x"),
    ], to_results=not args.no_append)


if __name__ == "__main__":
    main()
