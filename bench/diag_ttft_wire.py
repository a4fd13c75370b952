"""Where a TTFT reading's error comes from: pikeclient's send and first-token stamps against a packet capture.

    python bench/diag_ttft_wire.py [CONCURRENCY] [run.py overrides...]     (root, tcpdump installed)

256 streamed requests through ``run.py`` at CONCURRENCY (default 64) against GuideLLM's mock server (as
bench/bench_ttft_peers.py starts it), captured on loopback (bench/_wire.py). Each record is matched to its
request on the wire by its ``X-Request-Id`` header; printed: the send stamp (``start_time`` +
``send_delay_s``) minus the request's first packet, the first-token stamp minus the first packet that carried
a token back, and the TTFT error, each as p50 and p90 in milliseconds. A send stamp well before the wire
means the clock starts before the bytes go out; a first-token stamp well after, a busy loop reading late.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, write_prompts  # noqa: E402
from bench._proctree import run_tree  # noqa: E402
from bench._wire import capture, streams  # noqa: E402
from bench.bench_ttft_peers import mock_server  # noqa: E402

def main() -> None:
    concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    overrides = sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp, mock_server(Path(tmp) / "mock.log") as url:
        folder, port = Path(tmp), int(url.rsplit(":", 1)[1])
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["OPENAI_API_KEY"] = "sk-bench"
        runs = folder / "runs"
        with capture(port, folder / "run.pcap") as pcap:
            run_tree([sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={url}/v1", "llm.stream=true",
                      f"dataset.path={write_prompts(folder / 'prompts.jsonl', 256)}",
                      f"load.concurrency={concurrency}", "experiment.warmup=0", f"paths.runs_dir={runs}", *overrides],
                     env, folder)
        wire = {stream.request_id: stream for stream in streams(pcap, port)}
        [records] = list((runs / "outputs").rglob("records.jsonl"))
        send, first, error = [], [], []
        for line in records.read_text().splitlines():
            record = json.loads(line)
            stream = wire.get(record["request_id"])
            if stream is None or record.get("ttft_s") is None:
                continue
            sent = record["start_time"] + (record.get("send_delay_s") or 0.0)
            send.append((sent - stream.sent) * 1000)
            first.append((sent + record["ttft_s"] - stream.first) * 1000)
            error.append((record["ttft_s"] - stream.ttft_s) * 1000)

    def q(values: list[float]) -> str:
        return f"p50 {statistics.median(values):+.2f}, p90 {sorted(values)[int(len(values) * 0.9)]:+.2f} ms"

    print(f"concurrency {concurrency} {' '.join(overrides)}: {len(send)} requests matched; send stamp - wire: {q(send)}; "
          f"first-token stamp - wire: {q(first)}; TTFT error: {q(error)}")


if __name__ == "__main__":
    main()
