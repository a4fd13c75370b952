"""A real HTTP server on loopback that speaks the OpenAI and Azure chat wire protocols.

It answers deterministically (an echo of the last user message, or a canned answer chosen by the
prompt, cut at ``max_tokens`` words and at stop strings), streams SSE with a usage chunk, and injects
faults on request: 429 with Retry-After, 500/503, dropped connections, hangs, malformed JSON, streams
cut in the middle, answers that never end, and (``usage=``) usage figures that are not counts. Tests,
``bench/``
and users (an offline dry run of ``run.py``) start it the same way::

    python -m pikeclient.testing.server --port 8000 --latency 0.1

Routes: ``/v1/chat/completions`` (OpenAI, ``Authorization: Bearer``),
``/openai/deployments/{deployment}/chat/completions?api-version=...`` (Azure OpenAI, ``api-key``),
``/chat/completions`` and ``/models/chat/completions`` (Azure AI model inference), and ``/score``
(Azure ML managed online endpoint: ``input_data`` in, ``{"output": ...}`` back, no usage). For checks made
on the server's side: ``GET /_timings`` (each stream's own clock readings) and ``GET /_received`` (when
each request arrived, by prompt). ``GET /metrics``: a Prometheus endpoint in vLLM's metric names
(requests served and waiting, token counters), as ``server_metrics.url`` scrapes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pikeclient.testing.answers import COUNTS, Answer, prompt_of, route_of


def free_port() -> int:
    """A port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# interrupt: a stream ended cleanly ([DONE]) halfway, with no finish reason (llama.cpp's interrupt_requests);
# empty_stream: HTTP 200 and an event stream with nothing but [DONE] (llama.cpp on a context overflow);
# html, empty_choices, null_content: answers with status 200 that carry no answer;
# endless: HTTP 200 and an answer that never ends (streamed: a text chunk every FaultPlan.endless_s, forever;
# not streamed: a JSON body that keeps growing), until the client goes away.
FAULTS = ("400", "404", "429", "500", "503", "drop", "hang", "malformed", "cut_stream", "interrupt", "empty_stream",
          "html", "empty_choices", "null_content", "endless")


@dataclass
class FaultPlan:
    """Which faults to inject. ``script`` faults are used first, in order, one per request."""

    rates: dict[str, float] = field(default_factory=dict)
    retry_after: float | None = 1.0
    retry_after_header: str = "retry-after"
    hang_s: float = 30.0
    endless_s: float = 0.01  # the gap between an endless answer's pieces (0: as fast as the client reads)
    endless_piece: str = " more"  # what each piece of an endless answer adds
    script: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s): {sorted(unknown)}; known: {FAULTS}")
        self._rng = random.Random(self.seed)

    def draw(self) -> str | None:
        if self.script:
            fault = self.script.pop(0)
            return fault if fault != "ok" else None
        roll = self._rng.random()
        for name, rate in self.rates.items():
            if roll < rate:
                return name
            roll -= rate
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received, for assertions made on the server's side."""

    time: float
    path: str
    route: str
    prompt: str
    fault: str | None
    status: int
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)  # the request's JSON, to check what reached the server


class FakeLLMServer:
    """The server, run on its own event loop in a background thread (or in the foreground by ``main``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        api_key: str | None = None,
        faults: FaultPlan | None = None,
        token_delay: float = 0.0,
        keep_log: bool = True,
        report_usage: bool = True,
        filter_chunk: bool = False,
        echo_key: bool = False,
        capacity: int | None = None,
        keep_timings: bool = False,
        usage: Any = None,
        count: str = "words",
        answers: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.token_delay = token_delay
        self.api_key = api_key
        self.faults = faults or FaultPlan()
        self.keep_log = keep_log
        # report_usage=False: no usage anywhere, as llama.cpp's streams (which ignore include_usage);
        # filter_chunk=True: Azure's first stream chunk, empty choices with prompt_filter_results.
        self.report_usage = report_usage
        self.filter_chunk = filter_chunk
        self.echo_key = echo_key  # a 401 body that repeats the credential it got, as some servers do
        self.capacity = capacity  # requests served at once (None: unlimited): a server that saturates
        self.usage = usage  # not None: reported instead of the true usage (negative, absurd, strings...)
        if count not in COUNTS:
            raise ValueError(f"count={count!r}: allowed {', '.join(COUNTS)}")
        self.count = count  # how usage is counted: words (tests predict it) or tiktoken (as OpenAI counts)
        # keep_timings=True: the server's own clock readings for every stream, served at GET /_timings
        # (the truth a client's TTFT and ITL are compared with in bench/bench_streaming.py)
        self.keep_timings = keep_timings
        self.timings: list[StreamTiming] = []
        # Canned answers: the first key found in the last user message picks the answer (instead of the
        # echo), so a test can serve known right and wrong answers, or a judge's verdicts.
        self.answers = dict(answers or {})
        self._semaphore: asyncio.Semaphore | None = None
        self.log: list[RequestRecord] = []
        self.request_count = 0
        # What GET /metrics reports, in vLLM's names: requests being served and waiting for a slot, tokens.
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name="fake-llm-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake LLM server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def serve_forever(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        print(f"fake LLM server listening on {self.url}", flush=True)
        async with self._server:
            await self._server.serve_forever()

    # -- HTTP -------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                received = time.perf_counter()
                if request is None:
                    break
                if not await self._respond(writer, *request, received=received):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, method: str, target: str, headers: dict, body: bytes,
                       received: float) -> bool:
        """Answer one request; False closes the connection."""
        self.request_count += 1
        url = urlsplit(target)
        if method == "GET" and url.path == "/_timings":  # and forgets them
            timings, self.timings = self.timings, []
            return await self._send_json(writer, 200, [asdict(t) for t in timings])
        if method == "GET" and url.path == "/_received":  # when each logged request arrived (epoch s), and forgets
            log, self.log = self.log, []
            return await self._send_json(writer, 200, [{"time": r.time, "prompt": r.prompt} for r in log])
        if method == "GET" and url.path == "/metrics":
            return await self._send_raw(writer, 200, self.prometheus_text().encode(), "text/plain; version=0.0.4")
        route = route_of(method, url.path)
        if route is None:
            return await self._send_json(writer, 404, {"error": {"message": f"no route {method} {url.path}"}})
        self.running += 1
        try:
            return await self._answer(writer, route, url, headers, body, received)
        finally:
            self.running -= 1

    def prometheus_text(self) -> str:
        """The server's state as a Prometheus endpoint shows it, in vLLM's metric names (so a client's
        scraper is tested on the names it meets): requests served and waiting, KV-cache usage (requests
        served over capacity), token counters, prefix-cache queries and hits (none: this server has no cache)."""
        cache = (self.running - self.waiting) / self.capacity if self.capacity else 0.0
        lines = []
        for name, kind, value, what in (
                ("vllm:num_requests_running", "gauge", self.running - self.waiting, "requests being served"),
                ("vllm:num_requests_waiting", "gauge", self.waiting, "requests waiting for a slot"),
                ("vllm:kv_cache_usage_perc", "gauge", cache, "share of the slots in use"),
                ("vllm:prompt_tokens_total", "counter", self.prompt_tokens, "prompt tokens of the answers"),
                ("vllm:generation_tokens_total", "counter", self.generation_tokens, "tokens generated"),
                ("vllm:prefix_cache_queries_total", "counter", self.prompt_tokens, "prompt tokens looked up"),
                ("vllm:prefix_cache_hits_total", "counter", 0, "prompt tokens found in the prefix cache")):
            lines += [f"# HELP {name} {what} (loopback test server)", f"# TYPE {name} {kind}",
                      f'{name}{{model_name="fake-model"}} {float(value)}']
        return "\n".join(lines) + "\n"

    async def _answer(self, writer: asyncio.StreamWriter, route: str, url: Any, headers: dict, body: bytes,
                      received: float) -> bool:
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return await self._send_json(writer, 400, {"error": {"message": "body is not JSON"}})
        fault = self.faults.draw()
        status = self._status_for(route, url.query, headers, fault)
        if self.keep_log:
            prompt = prompt_of(route, payload)
            self.log.append(RequestRecord(time.time(), url.path, route, prompt, fault, status, headers,
                                          payload if isinstance(payload, dict) else {}))
        if self.latency:
            if self.capacity:  # a server that works on `capacity` requests at once queues the rest
                self.waiting += 1
                queued = True
                try:
                    async with self._slots():
                        self.waiting, queued = self.waiting - 1, False
                        await asyncio.sleep(self.latency)
                finally:
                    if queued:  # the client went away while it waited
                        self.waiting -= 1
            else:  # from the request's arrival, whatever parsing it took
                await _sleep_until(received + self.latency)
        if fault == "drop":
            return False
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
            return False
        if status != 200:
            presented = headers.get("api-key") or headers.get("authorization", "")
            return await self._send_error(writer, status, presented if self.echo_key else None)
        if fault == "malformed":
            return await self._send_raw(writer, 200, b'{"id": "x", "choices": [', "application/json")
        if fault == "endless":
            return await self._send_endless(writer, route, bool(payload.get("stream")))
        if fault == "html":  # a proxy's login or error page, served with 200
            return await self._send_raw(writer, 200, b"<html><body>Sign in</body></html>", "text/html")
        if fault in ("empty_choices", "null_content"):
            body = Answer.build(route, payload, self.count, self.answers).completion()
            if fault == "empty_choices":
                body["choices"] = []
            else:
                body["choices"][0]["message"]["content"] = None
            return await self._send_json(writer, 200, body)
        answer = Answer.build(route, payload, self.count, self.answers)
        self.prompt_tokens += answer.prompt_tokens
        self.generation_tokens += answer.completion_tokens
        if route == "aml_score":
            return await self._send_json(writer, 200, {"output": answer.text})
        if payload.get("stream"):
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage")) and self.report_usage
            return await self._send_stream(writer, answer, include_usage, cut=fault == "cut_stream",
                                           end_after={"interrupt": 0.5, "empty_stream": 0.0}.get(fault or ""),
                                           timing=StreamTiming(prompt_of(route, payload), received))
        body = answer.completion()
        if not self.report_usage:
            body.pop("usage")
        elif self.usage is not None:
            body["usage"] = self.usage
        return await self._send_json(writer, 200, body)

    def _status_for(self, route: str, query: str, headers: dict[str, str], fault: str | None) -> int:
        if not self._authorized(route, headers):
            return 401
        if route == "azure_openai" and "api-version" not in parse_qs(query):
            return 404
        if fault in ("400", "404", "429", "500", "503"):
            return int(fault)
        return 200

    def _authorized(self, route: str, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        # Either header on every route: Azure's endpoints take both, and an Azure backend pointed at
        # /v1 with llm.base_url keeps its api-key header.
        return headers.get("api-key") == self.api_key or headers.get("authorization", "") == f"Bearer {self.api_key}"

    def _slots(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # created on the server's own loop
            self._semaphore = asyncio.Semaphore(self.capacity or 1)
        return self._semaphore

    async def _send_error(self, writer: asyncio.StreamWriter, status: int, echo: str | None = None) -> bool:
        extra = {}
        if status == 429 and self.faults.retry_after is not None:
            value = self.faults.retry_after
            name = self.faults.retry_after_header
            extra[name] = str(int(value * 1000)) if name.endswith("-ms") else f"{value:g}"
        messages = {400: "Invalid request: unsupported parameter", 401: "Incorrect API key provided",
                    429: "Rate limit reached", 404: "Resource not found"}
        message = messages.get(status, "The server had an error")
        if echo and status == 401:
            message += f": {echo}"
        body = {"error": {"message": message, "code": str(status)}}
        return await self._send_json(writer, status, body, extra)

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, body: Any, headers: dict | None = None) -> bool:
        return await self._send_raw(writer, status, json.dumps(body).encode(), "application/json", headers)

    async def _send_raw(self, writer, status: int, data: bytes, ctype: str, headers: dict | None = None) -> bool:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"content-type: {ctype}"]
        lines += [f"content-length: {len(data)}", "connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return True

    async def _send_stream(self, writer, answer: Answer, include_usage: bool, cut: bool,
                           end_after: float | None = None, timing: StreamTiming | None = None) -> bool:
        """Chunk k goes at k * token_delay after the first (a schedule, so sleeps' overshoots do not add up)."""
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        chunks = list(answer.stream_chunks(include_usage))
        if include_usage and self.usage is not None:
            chunks[-1]["usage"] = self.usage
        if self.filter_chunk:
            chunks.insert(0, {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                              "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
        if end_after is not None:  # a clean end, [DONE] included, before the finish reason
            chunks = chunks[: int(len(chunks) * end_after)]
        start = time.perf_counter()
        for index, chunk in enumerate(chunks):
            if cut and index == len(chunks) // 2:
                await writer.drain()
                return False  # close mid-stream, without the terminating chunk
            _write_chunk(writer, f"data: {json.dumps(chunk)}\n\n".encode())
            if timing is not None and _has_text(chunk):
                timing.wrote(time.perf_counter())
            if self.token_delay:
                await writer.drain()
                await _sleep_until(start + (index + 1) * self.token_delay)
        if timing is not None and self.keep_timings:  # kept before the client can have the whole answer
            self.timings.append(timing)
        _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


    async def _send_endless(self, writer: asyncio.StreamWriter, route: str, stream: bool) -> bool:
        """An answer that never ends, sent until the client goes away (its write then fails)."""
        ctype = "text/event-stream" if stream else "application/json"
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
        head = {"id": "chatcmpl-endless", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": "fake-model"}
        if stream:
            role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            _write_chunk(writer, f"data: {json.dumps(role)}\n\n".encode())
        else:  # the opening of a JSON answer whose text never closes
            opening = '{"output": "' if route == "aml_score" else (
                '{"id": "chatcmpl-endless", "object": "chat.completion", "model": "fake-model", '
                '"choices": [{"index": 0, "message": {"role": "assistant", "content": "')
            _write_chunk(writer, opening.encode())
        piece = self.faults.endless_piece
        data = (f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
                if stream else piece).encode()
        while not writer.is_closing():
            _write_chunk(writer, data)
            await writer.drain()
            await asyncio.sleep(self.faults.endless_s)
        return False


@dataclass
class StreamTiming:
    """One stream as the server's clock saw it (``time.perf_counter``, which on Linux is CLOCK_MONOTONIC,
    shared with the client's process): when the request had been read, when each text chunk was written."""

    prompt: str
    received: float
    first: float | None = None
    last: float | None = None
    text_chunks: int = 0

    def wrote(self, now: float) -> None:
        self.first = self.first if self.first is not None else now
        self.last = now
        self.text_chunks += 1


def _has_text(chunk: dict) -> bool:
    return any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or ())


async def _sleep_until(due: float) -> None:
    await asyncio.sleep(max(0.0, due - time.perf_counter()))


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return method, target, headers, body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI/Azure-compatible fake chat server on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="require this key (Bearer or api-key header)")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds after each streamed chunk")
    parser.add_argument("--no-usage", action="store_true", help="report no usage (as llama.cpp's streams)")
    parser.add_argument("--capacity", type=int, default=None, help="requests served at once; the rest queue")
    parser.add_argument("--no-log", action="store_true", help="keep no request log (long benchmarks)")
    parser.add_argument("--count", choices=COUNTS, default="tiktoken",
                        help="usage in tokens as OpenAI counts them (default), or one word a token")
    parser.add_argument("--timings", action="store_true", help="keep each stream's send times, at GET /_timings")
    parser.add_argument("--usage", type=json.loads, default=None,
                        help='report this JSON as usage, e.g. \'{"prompt_tokens": -150, "completion_tokens": "21"}\'')
    parser.add_argument("--endless-s", type=float, default=0.01, help="gap between an endless answer's pieces")
    parser.add_argument("--answers", type=argparse.FileType(encoding="utf-8"), default=None,
                        help="a JSON object: the first key found in a prompt picks its answer (else the echo)")
    for name in FAULTS:
        parser.add_argument(f"--rate-{name.replace('_', '-')}", type=float, default=0.0, dest=f"rate_{name}")
    args = parser.parse_args(argv)
    rates = {name: getattr(args, f"rate_{name}") for name in FAULTS if getattr(args, f"rate_{name}")}
    server = FakeLLMServer(host=args.host, port=args.port, latency=args.latency, api_key=args.api_key,
                           faults=FaultPlan(rates=rates, endless_s=args.endless_s), keep_log=not args.no_log,
                           token_delay=args.token_delay,
                           report_usage=not args.no_usage, capacity=args.capacity,
                           keep_timings=args.timings, usage=args.usage, count=args.count,
                           answers=json.load(args.answers) if args.answers else None)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
