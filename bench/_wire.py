"""What the wire saw: a packet capture on loopback (tcpdump), read back as each streamed request's TTFT and ITL.

A tool's TTFT is its own reading: when it stamped the send, and when it saw the first token. The wire's
is the same two moments as the kernel saw the packets: the request's first byte leaving, and the first
packet carrying a token coming back. A server on the same machine answers later when its load bunches up
(every tool's reading grows with it), so a tool's error against the server's set delay mixes what the
tool did to the server with how it reads; its error against the wire, on the same requests, is the
reading's alone.

    with capture(port, folder / "run.pcap"):
        ...  # the tool's run
    wire = streams(folder / "run.pcap", port)  # [Stream(sent, first, last, tokens, request_id, reused), ...]
    pairs = match(calls, wire)  # each call (bench._peers.Call) with its request on the wire

tcpdump (Debian's ``tcpdump``) needs root or CAP_NET_RAW; :func:`available` says whether it can run.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_TOKEN = re.compile(rb'"content":\s*"(?:[^"\\]|\\.)')  # a delta that carries text (not a role-only one)
_REQUEST_ID = re.compile(rb"(?i)\r\nx-request-id:\s*([!-~]+)")  # pikeclient names each request (core.request_id)
_LINK_HEADER = {0: 4, 1: 14, 113: 16, 276: 20}  # null/loopback, Ethernet (Linux lo), Linux SLL, SLL2


@dataclass(frozen=True)
class Stream:
    """One streamed request on the wire (epoch seconds): its first byte out, the first and last packets
    back that carried tokens, how many tokens (events with text) came, and the request's id."""

    sent: float
    first: float
    last: float
    tokens: int
    request_id: str | None = None  # its X-Request-Id header, where the client sent one
    reused: bool = False  # a later request on its connection: the tool's send stamp came after the connect

    @property
    def ttft_s(self) -> float:
        return self.first - self.sent

    @property
    def itl_s(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


def available() -> str | None:
    """None where a capture can run here, else why not (one line)."""
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (apt-get install tcpdump)"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "capturing packets needs root (or CAP_NET_RAW on tcpdump)"
    return None


@contextlib.contextmanager
def capture(port: int, path: Path) -> Iterator[Path]:
    """tcpdump on loopback for TCP ``port`` into ``path`` (nanosecond stamps), stopped by its PID on exit."""
    command = ["tcpdump", "-i", "lo", "-w", str(path), "-U", "-B", "65536", "-s", "0", "-n",
               "--time-stamp-precision=nano", "-Z", "root", f"tcp port {port}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # tcpdump says "listening on lo" once the capture is open: nothing before that is missed.
        line = process.stderr.readline() if process.stderr else b""
        if b"listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line.decode(errors='replace').strip()}")
        yield path
    finally:
        time.sleep(0.2)  # let the last packets reach the capture buffer (an ACK's worth)
        process.send_signal(signal.SIGINT)  # tcpdump writes what it holds and exits
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def packets(path: Path) -> Iterator[tuple[float, int, int, bytes]]:
    """(epoch seconds, source port, destination port, TCP payload) of each IPv4 TCP packet with a payload."""
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<",
              b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise ValueError(f"{path} is not a pcap file")
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    link = struct.unpack(endian + "I", data[20:24])[0]
    skip = _LINK_HEADER.get(link)
    if skip is None:
        raise ValueError(f"link type {link} is not read here")
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, kept, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + kept]
        offset += 16 + kept
        ip = frame[skip:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[(ip[0] & 0x0F) * 4:total]
        if len(tcp) < 20:
            continue
        source, destination = struct.unpack(">HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            yield seconds + fraction * scale, source, destination, payload


def streams(path: Path, port: int) -> list[Stream]:
    """The streamed requests to ``port`` in a capture, each with its timings on the wire.

    Per connection (the client's port), a request begins with the packet that starts ``POST``; each
    packet back counts the token events it holds (``"content": "…"``, non-empty), stamped with its
    arrival. Connections carry requests one after another (HTTP/1.1 keep-alive), so the packets back
    between two requests belong to the first.
    """
    open_: dict[int, list] = {}  # client port -> [sent, first, last, tokens, request id, reused] of its request now
    done: list[Stream] = []

    def close(state: list) -> None:
        if state[1] is not None:
            done.append(Stream(*state))

    for stamp, source, destination, payload in packets(path):
        if destination == port and payload.startswith(b"POST "):
            reused = source in open_
            if reused:
                close(open_[source])
            named = _REQUEST_ID.search(payload)
            open_[source] = [stamp, None, None, 0, named.group(1).decode() if named else None, reused]
        elif source == port and destination in open_:
            tokens = len(_TOKEN.findall(payload))
            if tokens:
                state = open_[destination]
                if state[1] is None:
                    state[1] = stamp
                state[2] = stamp
                state[3] += tokens
    for state in open_.values():
        close(state)
    return done


def match(calls: list, wire: list[Stream]) -> list[tuple]:
    """Each call (``bench._peers.Call``: ``start``, ``ttft_s``, ``request_id``) with its request on the
    wire: by request id where both carry one (pikeclient's ``X-Request-Id``, AIPerf's ``X-Request-ID``),
    else the stream whose send and first token lie nearest the call's (GuideLLM names no request),
    nearest pairs first. Calls without a TTFT or without a stream left are not in the result."""
    by_id = {stream.request_id: stream for stream in wire if stream.request_id}
    pairs, left = [], []
    for call in calls:
        if call.ttft_s is None:
            continue
        stream = by_id.pop(call.request_id, None) if call.request_id else None
        if stream is not None:
            pairs.append((call, stream))
        else:
            left.append(call)
    if not left:
        return pairs
    named = {id(stream) for _, stream in pairs}
    free = sorted((stream for stream in wire if id(stream) not in named), key=lambda stream: stream.sent)
    sends = [stream.sent for stream in free]
    window = 128  # sends within a few ms of each other at most a concurrency apart
    candidates = []
    for i, call in enumerate(left):
        at = bisect.bisect_left(sends, call.start)
        for j in range(max(0, at - window), min(len(free), at + window)):
            stream = free[j]
            cost = abs(stream.sent - call.start) + abs(stream.first - (call.start + call.ttft_s))
            candidates.append((cost, i, j))
    candidates.sort()
    taken_calls, taken_streams = set(), set()
    for _, i, j in candidates:
        if i not in taken_calls and j not in taken_streams:
            taken_calls.add(i)
            taken_streams.add(j)
            pairs.append((left[i], free[j]))
    return pairs
