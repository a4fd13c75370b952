"""TTFT and ITL as pikeclient, GuideLLM and AIPerf read them, on GuideLLM's mock server whose delays are set.

    python bench/bench_ttft_peers.py [--requests 256] [--concurrencies 8,64] [--repeats 3] [--no-append]

As root with tcpdump installed (apt-get install tcpdump), each run is also captured on loopback (bench/_wire.py)
and every tool's TTFT is compared with the same request's on the wire (matched by request id, or by time
for GuideLLM, which names none): the reading's own error, apart from what the load did to the server.
Each connection's first request is reported apart (a tool's send stamp there comes before the connect).

The server is ``guidellm mock-server --ttft-ms 100 --itl-ms 10 --output-tokens 50`` (GuideLLM 0.8.1, in
its own virtual environment; started here and stopped by its process id): every streamed answer's first
token comes 100 ms after the request, then 49 more 10 ms apart. Those are the set values each reading is
compared with; the mock server itself runs on this machine too (an asyncio sleep per token), so what it
delivers can be a little later than set. Run in one sitting, contenders interleaved, --requests streamed
requests at each concurrency:

- pikeclient, its defaults (tracking with traces; ``load.workers`` chosen by pikeclient: one process at
  these concurrencies): ``run.py llm=openai llm.stream=true load.concurrency=C`` (records' ``ttft_s``,
  ``itl_s``);
- GuideLLM 0.8.1: ``--profile kind=concurrent,streams=C``, streamed (``time_to_first_token_ms``,
  ``inter_token_latency_ms`` per request);
- AIPerf 0.13: ``--streaming --concurrency C``, with the server's token counts (``time_to_first_token``,
  ``inter_token_latency`` per request);
- raw ``AsyncOpenAI`` + a semaphore (bench/_raw_sdk.py: stamps around ``create()`` and each text chunk):
  a reference for what the server and the machine deliver, no contender.

Figures: the median over requests of TTFT and of ITL, their error against 100 ms and 10 ms, with
sub-millisecond precision; median of --repeats. Issue 24's bar, per concurrency: pikeclient's TTFT p50
error at most the best peer's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, write_prompts  # noqa: E402
from bench._nginx import free_port  # noqa: E402
from bench._peers import (Call, aiperf_command, aiperf_prompts, guidellm_command, peer_binary,  # noqa: E402
                          read_aiperf, read_guidellm, read_raw, read_records, tiny_tokenizer)
from bench._proctree import CommandFailed, run_tree  # noqa: E402
from bench._wire import available as wire_available  # noqa: E402
from bench._wire import capture, match, streams  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

TTFT_MS, ITL_MS, OUTPUT_TOKENS = 100, 10, 50
RAW_SDK = Path(__file__).with_name("_raw_sdk.py")
PEERS = ("GuideLLM 0.8.1", "AIPerf 0.13")


@contextlib.contextmanager
def mock_server(log: Path) -> Iterator[str]:
    """GuideLLM's mock server on a free loopback port, stopped by its process id; yields its root URL."""
    port = free_port()
    command = [str(peer_binary("guidellm")), "mock-server", "--host", "127.0.0.1", "--port", str(port),
               "--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS), "--output-tokens", str(OUTPUT_TOKENS)]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own group: Sanic runs its worker in a child
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mock server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()  # Sanic stops its worker on SIGTERM
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group of the server we started
            process.wait()


Run = Callable[[int, int], list[Call]]  # (concurrency, requests) -> the calls


def contenders(url: str, folder: Path) -> dict[str, Run]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OPENAI_API_KEY"] = "sk-bench"

    def fresh(name: str) -> Path:
        out = folder / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    def pikeclient(concurrency: int, n: int) -> list[Call]:
        runs = fresh("runs")
        run_tree([sys.executable, str(REPO / "run.py"), "llm=openai", f"llm.base_url={url}/v1", "llm.stream=true",
                  f"dataset.path={write_prompts(folder / 'prompts.jsonl', n)}", f"load.concurrency={concurrency}",
                  "experiment.warmup=0", f"paths.runs_dir={runs}"], env, folder)
        return read_records(runs)

    def peer(name: str, command: Callable[..., list[str]], read: Callable[[Path], list[Call]]) -> Run:
        def run(concurrency: int, n: int) -> list[Call]:
            out = fresh(name)
            prompts = (aiperf_prompts(folder / "aiperf-prompts.jsonl", n) if name == "aiperf"
                       else write_prompts(folder / "prompts.jsonl", n))
            run_tree(command(url, "", stream=True, prompts=prompts, out=out, requests=n, concurrency=concurrency,
                             tokenizer=tiny_tokenizer(folder / "tokenizer")), env, folder)
            return read(out)
        return run

    def raw(concurrency: int, n: int) -> list[Call]:
        out = fresh("raw") / "calls.jsonl"
        run_tree([sys.executable, str(RAW_SDK), f"{url}/v1", str(n), str(out), "--concurrency", str(concurrency),
                  "--stream"], env, folder)
        return read_raw(out)

    return {"pikeclient default tracking": pikeclient,
            PEERS[0]: peer("guidellm", guidellm_command, read_guidellm),
            PEERS[1]: peer("aiperf", aiperf_command, read_aiperf),
            "raw AsyncOpenAI + semaphore (reference)": raw}


Sample = tuple[float, ...]  # TTFT p50, ITL p50 (s), mean in flight, nearest other send p50 (s)[, wire figures]


def on_the_wire(sample: Sample, calls: list[Call], capture: Path | None, port: int) -> Sample:
    """``sample`` and, from the run's packet capture, the same requests' TTFT p50 and ITL p50 on the wire,
    then the reading's own error request by request (bench._wire.match: the tool's TTFT minus the same
    request's on the wire): p50 over all requests, over those sent on a connection already open, and over
    each connection's first request (whose reading may hold the connect), with how many those were."""
    if capture is None:
        return sample
    wire = streams(capture, port)
    itls = [w.itl_s for w in wire if w.itl_s is not None]
    if not wire or not itls:
        raise CommandFailed(f"the capture holds {len(wire)} streamed requests")
    pairs = match(calls, wire)
    if len(pairs) < len(calls) * 0.9:
        raise CommandFailed(f"only {len(pairs)} of {len(calls)} calls matched to the capture")
    errors = [(call.ttft_s - stream.ttft_s, stream.reused) for call, stream in pairs]
    later = [error for error, reused in errors if reused]
    first = [error for error, reused in errors if not reused]
    return (*sample, statistics.median(w.ttft_s for w in wire), statistics.median(itls),
            statistics.median(error for error, _ in errors), median_or_nan(later), median_or_nan(first), len(first))


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def medians(calls: list[Call], n: int) -> Sample:
    """TTFT p50 and ITL p50 in seconds over the calls (the run fails if fewer than ``n`` carry both), and
    the load as the server got it: requests in flight on average (the calls' summed durations over their
    span), and the median gap from a send to the nearest other send. Sends that bunch together (a closed
    loop whose streams start and end together stays that way) make a Python server answer each of them
    later: a truly later first token, not a reading error, which these two figures tell apart."""
    ttfts = [c.ttft_s for c in calls if c.ttft_s is not None]
    itls = [c.itl_s for c in calls if c.itl_s is not None]
    if min(len(ttfts), len(itls)) < n:
        raise CommandFailed(f"{len(ttfts)} TTFT and {len(itls)} ITL readings of {n} requests")
    starts = sorted(c.start for c in calls)
    span = max(c.end for c in calls) - starts[0]
    in_flight = sum(c.end - c.start for c in calls) / span if span > 0 else float("nan")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    nearest = [min(pair) for pair in zip([float("inf"), *gaps], [*gaps, float("inf")])] if gaps else [float("nan")]
    return statistics.median(ttfts), statistics.median(itls), in_flight, statistics.median(nearest)


def describe(ttft: float, itl: float, in_flight: float, nearest: float, *wire: float) -> str:
    text = (f"TTFT p50 {ttft * 1000:.2f} ms ({ttft * 1000 / TTFT_MS - 1:+.2%}), ITL p50 {itl * 1000:.3f} ms "
            f"({itl * 1000 / ITL_MS - 1:+.2%}); {in_flight:.1f} in flight, sends {nearest * 1000:.2f} ms from the "
            "nearest other (p50)")
    if wire:
        text += (f"; on the wire TTFT p50 {wire[0] * 1000:.2f} ms, ITL p50 {wire[1] * 1000:.3f} ms (read "
                 f"{(itl - wire[1]) * 1000:+.3f} ms); TTFT read minus the wire, request by request: p50 "
                 f"{wire[2] * 1000:+.2f} ms ({wire[3] * 1000:+.2f} ms on open connections, {wire[4] * 1000:+.2f} ms "
                 f"on the {wire[5]:.0f} connections' first requests)")
    return text


def bars(concurrency: int, errors: dict[str, float], wire_errors: dict[str, float]) -> list[tuple[str, str]]:
    """Issue 24's bar, pikeclient's TTFT p50 error at most the best peer's: against the server's set delay
    (as the issue measured it) and, where captured, against the wire (the reading's own error, request by
    request)."""
    rows = []
    mine = "pikeclient default tracking"
    for against, table, unit in (("the set 100 ms", errors, "%"), ("the wire", wire_errors, " ms")):
        peers = [table[p] for p in PEERS if p in table]
        if mine in table and peers:
            ours, best = table[mine], min(peers)
            shown = (f"{ours:.2%} vs {best:.2%}" if unit == "%" else f"{ours * 1000:.2f} ms vs {best * 1000:.2f} ms")
            rows.append((f"issue 24 bar at concurrency {concurrency}, TTFT p50 error against {against}: "
                         "pikeclient's at most the best peer's", f"{'met' if ours <= best else 'not met'}: {shown}"))
    return rows


def main() -> None:
    args = command_line(__doc__, requests=256, concurrencies="8,64", repeats=3).parse_args()
    rows = [("server", f"guidellm mock-server --ttft-ms {TTFT_MS} --itl-ms {ITL_MS} --output-tokens "
                       f"{OUTPUT_TOKENS} (GuideLLM 0.8.1)"),
            ("each run", f"{args.requests} streamed requests; median over requests, median of {args.repeats}")]
    no_capture = wire_available()
    if no_capture:
        rows.append(("on the wire", f"not measured: {no_capture}"))
    with tempfile.TemporaryDirectory() as tmp, mock_server(Path(tmp) / "mock.log") as url:
        runs = contenders(url, Path(tmp))
        port = int(url.rsplit(":", 1)[1])
        for concurrency in (int(c) for c in args.concurrencies.split(",")):
            samples: dict[str, list[Sample]] = {name: [] for name in runs}
            failed: dict[str, str] = {}
            for round_number in range(args.repeats):
                order = [item for item in runs.items() if item[0] not in failed]
                for name, run in order[::-1] if round_number % 2 else order:
                    print(f"concurrency {concurrency}, round {round_number + 1}: {name}", flush=True)
                    try:
                        with (contextlib.nullcontext() if no_capture else capture(port, Path(tmp) / "run.pcap")) as pcap:
                            calls = run(concurrency, args.requests)
                        samples[name].append(on_the_wire(medians(calls, args.requests), calls, pcap, port))
                    except CommandFailed as error:
                        failed[name] = str(error)
                    else:
                        print(f"  {describe(*samples[name][-1])}", flush=True)
            errors, wire_errors = {}, {}
            for name, values in samples.items():
                if name in failed:
                    rows.append((f"concurrency {concurrency}: {name}", f"could not be run: {failed[name][-300:]}"))
                    continue
                median = [statistics.median(sample[k] for sample in values) for k in range(len(values[0]))]
                errors[name] = abs(median[0] * 1000 / TTFT_MS - 1)
                if len(median) > 4:  # the reading's own error: each request against itself on the wire
                    wire_errors[name] = abs(median[6])  # over all requests: a first one's connect is the tool's
                rows.append((f"concurrency {concurrency}: {name}", describe(*median)))
            rows += bars(concurrency, errors, wire_errors)
    emit("TTFT and ITL on GuideLLM's mock server: pikeclient, GuideLLM, AIPerf", rows,
         to_results=not args.no_append)


if __name__ == "__main__":
    main()
