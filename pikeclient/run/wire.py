"""Frames between a run and its workers (``pikeclient.run.workers`` and ``pikeclient.run.worker``): a
4-byte length, then a pickle, over a socket pair or, for Ray actors, TCP."""

from __future__ import annotations

import asyncio
import pickle
import struct

HEADER = struct.Struct("!I")


def frame(message: tuple) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


async def send(writer: asyncio.StreamWriter, message: tuple) -> None:
    """One frame; waits only when the peer reads slower than this side writes."""
    writer.write(frame(message))
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> tuple | None:
    """The next frame, or None when the peer has closed the connection."""
    try:
        header = await reader.readexactly(HEADER.size)
        return pickle.loads(await reader.readexactly(HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
