"""A zero-cost server for client benchmarks: Debian's nginx answering every POST with a fixed chat
completion (``/v1``) or a fixed event stream (``/stream/v1``), at almost no CPU, so that a benchmark
measures the client, not a Python test server.

nginx serves a file for GET only; ``error_page 405 =200 $uri`` turns a POST's 405 into that file with 200.
Its worker runs as www-data: the folder and the files are made readable by it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHUNKS = 12  # output chunks of the streamed answer (one word each)
ANSWER = "The quick brown fox jumps over the lazy dog and runs far away."


def completion() -> dict:
    return {"id": "chatcmpl-nginx", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}}


def event_stream() -> str:
    base = {"id": "chatcmpl-nginx", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    words = ANSWER.split(" ")[:CHUNKS]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
               for i, w in enumerate(words)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": CHUNKS,
                                                    "total_tokens": 12 + CHUNKS}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


CONFIG = """
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            alias {root}/answer.json;
            error_page 405 =200 $uri;
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            alias {root}/answer.sse;
            error_page 405 =200 $uri;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx_server(cpus: set[int] | None = None) -> Iterator[str]:
    """nginx on a free loopback port, stopped (by PID) on exit; yields ``http://127.0.0.1:PORT``."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise RuntimeError("nginx is not installed: apt-get install nginx")
    root = Path(tempfile.mkdtemp(prefix="pike-nginx-"))
    root.chmod(0o755)  # the worker (www-data) reads the answers from here
    (root / "answer.json").write_text(json.dumps(completion()))
    (root / "answer.sse").write_text(event_stream())
    for file in root.iterdir():
        file.chmod(0o644)
    port = free_port()
    (root / "nginx.conf").write_text(CONFIG.format(root=root, port=port))
    process = subprocess.Popen([binary, "-c", str(root / "nginx.conf"), "-p", str(root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if cpus:
            os.sched_setaffinity(process.pid, cpus)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text(errors='replace')}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()  # the master stops its workers
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)
