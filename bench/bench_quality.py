"""What scoring costs a run: a 1,000-call zero-latency run, eval=none vs eval=basic, in one session.

    python bench/bench_quality.py [--calls 1000] [--repeats 7] [--concurrency 8] [--no-append]

Against one loopback server process, on a prompt set whose every line carries four checkable
expectations (so each answer gets four scores and four expectations on its trace):

1. A/B: whole ``run_experiment`` runs in fresh processes (tracking on, traces on: the default run's
   path), eval=none, eval=none again (the noise) and eval=basic, interleaved round by round. Reported:
   the whole run's wall time, the measured part's, the calls' latency p50 / p99, each compared with
   eval=none of the same round (median and range over the rounds).
2. Accounting: what eval=basic adds, measured piece by piece on the records and the store of one
   eval=none run of the same session: the run's scoring (``RunScoring``), split into what happens while
   the calls run (each answer noted, as the runner's hook does) and what comes after the calls and
   lengthens the run (the answers scored and journalled, the judges' turn, the records rewritten with
   scores, the metrics), and the assessments written to the run's traces (by the tracking process, on
   its own core, while the experiment computes the run's statistics). Each as a share of the eval=none run's wall time:
   on this shared 2-core machine the A/B wall times swing by far more than 3%, the pieces do not.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, compose_config, loopback_server  # noqa: E402
from bench._report import command_line, emit  # noqa: E402
from pikeclient.eval.evaluator import Evaluator  # noqa: E402
from pikeclient.run.dataset import Repeated, load_prompts  # noqa: E402
from pikeclient.run.quality import RunScoring  # noqa: E402
from pikeclient.run.resume import read_records  # noqa: E402
from pikeclient.run.stats import RunStats  # noqa: E402
from pikeclient.tracking.assessments import AssessmentLogger, log_call_assessments  # noqa: E402
from pikeclient.tracking.job_file import read_job_file  # noqa: E402
from pikeclient.tracking.process import open_client  # noqa: E402

VARIANTS = {
    "eval=none": ["eval=none"],
    "eval=none (again: noise)": ["eval=none"],
    "eval=basic": ["eval=basic"],
}

CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from bench._common import compose_config
from pikeclient.run.experiment import run_experiment
runs = Path(sys.argv[1]); overrides = json.loads(sys.argv[2])
cfg = compose_config(*overrides, runs_dir=runs)
start = time.perf_counter()
stats = run_experiment(cfg, runs / ("out-" + str(time.time_ns())))
wall = time.perf_counter() - start
while True:  # the tracking process: its CPU time counts too (assessments are written there)
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for f in ("ru_utime", "ru_stime"))
m = stats.metrics()
print(json.dumps({{"wall_s": wall, "measured_s": stats.wall_s, "p50": m["Latency/p50"], "p99": m["Latency/p99"],
                  "cpu_s": cpu, "scored": m.get("quality/passed", 0) + m.get("quality/failed", 0)}}))
"""


def write_dataset(path: Path, n: int) -> Path:
    """Prompts the loopback server echoes ("You said: ..."), each with checks the echo meets or misses."""
    with path.open("w") as f:
        for i in range(n):
            expects = {"contains": f"number {i}", "regex": r"\d+", "number": i if i % 2 else i + 1,
                       "length": {"max_length": 40, "unit": "words"}}
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Say back number {i}, briefly.",
                                "expectations": expects}) + "\n")
    return path


def run_variant(url: str, dataset: Path, overrides: list[str], concurrency: int, runs: Path) -> dict[str, float]:
    args = ["llm=openai", f"llm.base_url={url}", f"dataset.path={dataset}", "retry.initial_delay=0.01",
            f"load.concurrency={concurrency}", *overrides]
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(runs), json.dumps(args)],
                         capture_output=True, text=True, env={"OPENAI_API_KEY": API_KEY, "PATH": ""}, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def accounting(runs: Path, dataset: Path, repeats: int) -> tuple[float, float, float]:
    """Seconds (medians) of what the run's scoring does beside the calls (noting each) and after them, and
    of writing its assessments, on an eval=none run's records."""
    from omegaconf import OmegaConf

    job = max((p.parent for p in runs.glob("out-*/run.json")
               if not (read_job_file(p.parent) or {}).get("config", {}).get("eval", {}).get("scorers")),
              key=lambda folder: folder.stat().st_mtime)
    records, run_id = read_records(job / "records.jsonl"), read_job_file(job)["run_id"]
    prompts = Repeated(load_prompts(str(dataset)), 1)
    evaluator = Evaluator.from_config(OmegaConf.to_container(compose_config("eval=basic", runs_dir=runs).eval))
    client = open_client(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_run(run_id).info.experiment_id
    beside_s, after_s, assessing_s = [], [], []
    for repeat in range(repeats):
        folder = runs / f"scoring-{repeat}"
        folder.mkdir()
        (folder / "records.jsonl").write_text((job / "records.jsonl").read_text())
        started = time.perf_counter()
        scoring = RunScoring(evaluator, prompts, folder)
        for record in records:  # what the runner's hook does as each call ends
            scoring.submit(record, prompts[record["index"]])
        drained = time.perf_counter()
        assessments = scoring.finish(folder / "records.jsonl", RunStats())
        scoring.done()
        scored = time.perf_counter()
        logger = AssessmentLogger(client, experiment, run_id=run_id, expectations_source="prompts")
        if log_call_assessments(logger, run_id, assessments) != 8 * len(records):
            raise RuntimeError("not every assessment was written")
        beside_s.append(drained - started)
        after_s.append(scored - drained)
        assessing_s.append(time.perf_counter() - scored)
    return statistics.median(beside_s), statistics.median(after_s), statistics.median(assessing_s)


def main() -> None:
    args = command_line(__doc__, calls=1000, repeats=7, concurrency=8).parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, loopback_server(0.0) as url:
        runs = Path(tmp) / "runs"
        dataset = write_dataset(Path(tmp) / "prompts.jsonl", args.calls)
        run_variant(url, dataset, ["dataset.limit=100"], args.concurrency, runs)  # creates the store
        variants = {name: functools.partial(run_variant, url, dataset, overrides, args.concurrency, runs)
                    for name, overrides in VARIANTS.items()}
        for round_number in range(args.repeats):  # interleaved; every other round in reverse order
            order = list(variants.items())
            for name, run in order[::-1] if round_number % 2 else order:
                results[name].append(run())
        beside_s, after_s, assessing_s = accounting(runs, dataset, args.repeats)
    base = results["eval=none"]

    def paired(name: str, key: str) -> str:
        """The median over rounds of this variant's figure against eval=none's in the same round, and the range."""
        ratios = sorted(r[key] / b[key] - 1 for r, b in zip(results[name], base))
        return f"{statistics.median(ratios):+.1%} [{ratios[0]:+.1%}, {ratios[-1]:+.1%}]"

    rows = [("calls, server latency, concurrency", f"{args.calls}, 0 s, {args.concurrency}; tracking and traces on"),
            ("rounds (variants interleaved)", str(args.repeats)),
            ("answers scored per run (eval=basic)", f"{results['eval=basic'][0]['scored']:.0f}")]
    for name in VARIANTS:
        found = results[name]
        rows.append((f"{name}: whole run / measured part / CPU (s), medians",
                     " / ".join(f"{statistics.median(r[k] for r in found):.2f}"
                                for k in ("wall_s", "measured_s", "cpu_s"))))
    for name in ("eval=basic", "eval=none (again: noise)"):
        rows.append((f"{name} vs eval=none, same round: whole run, median [range]", paired(name, "wall_s")))
        rows.append((f"{name} vs eval=none: latency p50; p99", f"{paired(name, 'p50')}; {paired(name, 'p99')}"))
    wall = statistics.median(r["wall_s"] for r in base)
    rows += [("accounting, share of eval=none's whole run: beside the calls (each answer noted)",
              f"{beside_s:.4f} s ({beside_s / wall:.2%})"),
             ("accounting: after the calls (scores, judges' turn, records rewritten, metrics): the run's tail",
              f"{after_s:.3f} s ({after_s / wall:.1%})"),
             ("accounting: assessments written to the store (tracking process, beside the statistics)",
              f"{assessing_s:.3f} s ({assessing_s / wall:.1%})"),
             ("accounting: all three, as if one after the other", f"{(beside_s + after_s + assessing_s) / wall:.1%}"),
             ("target", "eval=basic adds <= 3% to the whole run; latencies within noise of eval=none")]
    emit(f"Scoring overhead ({args.calls} calls, zero latency)", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
