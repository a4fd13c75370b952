"""Memory: peak RSS of a 10,000-prompt API run (``python run.py llm=openai``, tracking on).

    python bench/bench_memory.py [--prompts 10000] [--no-append]

Samples every process of the run (the experiment, and the MLflow tracking sidecar) from /proc and
reports each one's peak resident set (VmHWM). Records are streamed to disk, not kept in memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, loopback_server, write_prompts  # noqa: E402
from bench._report import command_line, emit  # noqa: E402


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    parser = command_line(__doc__, prompts=10_000)
    parser.add_argument("--override", action="append", default=[], help="extra run.py override, repeatable")
    args = parser.parse_args()
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp, loopback_server(0.0) as url:
        dataset = write_prompts(Path(tmp) / "prompts.jsonl", args.prompts)
        command = [sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={url}",
                   f"dataset.path={dataset}", "load.concurrency=32", "cache.mode=off", *args.override]
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peaks: dict[str, int] = {}
        start = time.perf_counter()
        while process.poll() is None:
            for name, pid in [("experiment process", process.pid)] + [("tracking sidecar", c) for c in children(process.pid)]:
                value = peak_kib(pid)
                if value:
                    peaks[name] = max(peaks.get(name, 0), value)
            time.sleep(0.05)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise SystemExit(process.stderr.read().decode()[-3000:])
    rows = [("prompts", f"{args.prompts}, {wall:.1f} s; overrides: {' '.join(args.override) or 'none'}")]
    rows += [(f"peak RSS, {name}", f"{kib / 1024:.0f} MiB") for name, kib in peaks.items()]
    rows.append(("target", "<= 400 MB"))
    emit(f"Memory, {args.prompts}-prompt API run", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
