"""Capacity search: pikeclient's ``hydra/sweeper=capacity`` against GuideLLM 0.8.1's ``knee`` profile.

    python bench/bench_capacity.py [--capacity 4] [--latency 0.1] [--probe-s 4] [--no-append]

Both are pointed at the loopback server in its own process, working on ``--capacity`` requests at once,
``--latency`` seconds each, and queueing the rest: its true capacity is ``capacity / latency`` requests/s
(40/s by default), reached at ``capacity`` requests in flight. Measured for each: the answer against that
truth and the total wall time of the command, start-up included.

- pikeclient: ``python run.py -m hydra/sweeper=capacity llm=openai ...`` with ``hydra.sweeper.probe_s``;
  its answer is a request rate.
- GuideLLM: ``guidellm run --profile kind=knee`` (a closed-loop sweep over concurrency, 6 points from 1
  to 16, each ``--probe-s`` seconds, then its one adaptive refinement around the knee; ``--adaptive no``
  leaves it out), in its own virtual environment (``bench/.venv-guidellm``, made on first use by
  bench/_peers.py). Its answer is a concurrency (the knee of output tokens/s against streams); the rate
  it stands for is the requests/s measured there (interpolated between the two benchmarks around it).
  GuideLLM needs a tokenizer: a tiny one is trained here, offline (bench/_peers.py); the prompts are its
  synthetic ones (32 tokens in, 16 out).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, loopback_server  # noqa: E402
from bench._peers import peer_binary, tiny_tokenizer  # noqa: E402
from bench._report import append, command_line  # noqa: E402

def pikeclient_search(url: str, root: Path, probe_s: float) -> tuple[float, str, float]:
    """(rate found, the answer line, wall seconds) of the one-command search."""
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "-m", "hydra/sweeper=capacity", "llm=openai",
                           f"llm.base_url={url}", f"hydra.sweeper.probe_s={probe_s:g}", "tracking.traces=false"],
                          cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"pikeclient's search failed: {done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("capacity of"))
    return float(re.search(r": ([\d.]+) requests/s", line).group(1)), line, wall


def guidellm_knee(url: str, root: Path, probe_s: float, adaptive: bool) -> tuple[float, float, float, int]:
    """(knee concurrency, requests/s there, wall seconds, benchmarks run) of GuideLLM's knee profile."""
    binary = peer_binary("guidellm")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    out = root / "guidellm.json"
    command = [str(binary), "run",
               "--backend", f"kind=openai_http,target={url.removesuffix('/v1')},model=fake-model,"
                            "request_format=/v1/chat/completions,validate_backend=false",
               "--profile", f"kind=knee,min_streams=1,max_streams=16,count=6,adaptive={str(adaptive).lower()}",
               "--constraint", f"kind=max_duration,seconds={probe_s:g}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"GuideLLM failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    knee = result["conclusions"][0]["final"]["throughput"]["knee"]
    points = sorted((b["config"]["strategy"]["streams"], b["metrics"]["requests_per_second"]["successful"]["mean"])
                    for b in result["benchmarks"])
    return knee, interpolate(points, knee), wall, len(points)


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at ``x`` on the line through ``points`` (one y per x: a repeated x keeps its mean)."""
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        by_x.setdefault(px, []).append(py)
    points = sorted((px, sum(ys) / len(ys)) for px, ys in by_x.items())
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1] if x > points[-1][0] else points[0][1]


def main() -> None:
    args = command_line(__doc__, capacity=4, latency=0.1, probe_s=4.0, adaptive="yes").parse_args()
    truth = args.capacity / args.latency
    root = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    rows = [("server", f"loopback, {args.capacity} requests at once, {args.latency:g} s each: true capacity "
                       f"{truth:g} requests/s at {args.capacity} in flight"),
            ("probe / benchmark length (s)", f"{args.probe_s:g}")]
    with loopback_server(args.latency, "--capacity", str(args.capacity)) as url:
        rate, line, wall = pikeclient_search(url, root, args.probe_s)
        rows += [("pikeclient: answer", line.removeprefix("capacity of openai: ")),
                 ("pikeclient: error vs truth", f"{(rate - truth) / truth:+.1%}"),
                 ("pikeclient: total time (s)", f"{wall:.1f}")]
        print("\n".join(f"{k}: {v}" for k, v in rows), flush=True)
        try:
            knee, knee_rate, g_wall, benchmarks = guidellm_knee(url, root, args.probe_s, args.adaptive == "yes")
        except (SystemExit, subprocess.CalledProcessError, OSError) as error:
            rows.append(("GuideLLM 0.8.1", f"could not be run: {str(error)[:300]}"))
        else:
            rows += [("GuideLLM: profile", f"knee, streams 1 to 16 in 6 points, adaptive refinement {args.adaptive}"),
                     ("GuideLLM: knee (concurrency)", f"{knee:.2f} streams (truth {args.capacity}: "
                                                      f"{(knee - args.capacity) / args.capacity:+.1%})"),
                     ("GuideLLM: requests/s at the knee", f"{knee_rate:.2f} ({(knee_rate - truth) / truth:+.1%} vs "
                                                          "truth)"),
                     ("GuideLLM: benchmarks, total time (s)", f"{benchmarks}, {g_wall:.1f}")]
    text = "\n".join(f"{k}: {v}" for k, v in rows)
    if args.no_append:
        print(text)
    else:
        print(append("Capacity search against GuideLLM's knee (issue 22)", rows))


if __name__ == "__main__":
    main()
