"""A persistent response cache (sqlite under ``runs/``): paid-for answers survive a crash or Ctrl-C.

The key is a hash of what decides the answer: backend, endpoint or deployment, model, messages and
sampling settings, as sorted JSON. Credentials are never part of it (clients do not describe them).
Each answer is committed as it arrives; errors are never cached.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pikeclient.types import ChatResult, Message, SamplingParams, Usage

MODES = ("use", "refresh", "off")
# Client fields that name where an answer comes from; others (stream, device) do not change it.
IDENTITY_FIELDS = ("provider", "model", "endpoint", "deployment", "api_version", "api")


def cache_key(client: Mapping[str, Any], messages: Sequence[Message], params: SamplingParams,
              scope: str | None = None) -> str:
    """``scope`` salts the key (see ``scope_of``); None shares answers across experiments."""
    identity = {k: client[k] for k in IDENTITY_FIELDS if client.get(k) is not None}
    request = {"client": identity, "messages": [dict(m) for m in messages], "sampling": asdict(params), "scope": scope}
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def scope_of(settings: Mapping[str, Any]) -> str:
    """A hash of the settings that shape a measurement (backend options, retry, rate limit, concurrency).

    With it, answers are reused only by a re-run of the same experiment: a sweep over ``stream`` or
    ``concurrency`` still measures every job instead of reading the first job's answers back.
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResponseCache:
    """``mode``: ``use`` reads and writes, ``refresh`` only writes (calls everything again), ``off``."""

    def __init__(self, path: str | Path, mode: str = "use") -> None:
        if mode not in MODES:
            raise ValueError(f"cache.mode={mode!r}: allowed {', '.join(MODES)}")
        self.mode = mode
        self.db: sqlite3.Connection | None = None
        if mode != "off":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Sweep jobs may share the file: wait for a lock rather than fail.
            self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
            self.db.execute("pragma journal_mode=wal")
            self.db.execute("pragma synchronous=normal")  # durable across a process crash, cheap commits
            self.db.execute("create table if not exists answers (key text primary key, result text not null)")

    def get(self, key: str) -> ChatResult | None:
        if self.db is None or self.mode != "use":
            return None
        row = self.db.execute("select result from answers where key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        usage = Usage(**{k: v for k, v in data.pop("usage").items() if k != "total_tokens"})
        return ChatResult(**{**data, "usage": usage, "cached": True})

    def put(self, key: str, result: ChatResult) -> None:
        if self.db is not None:
            data = result.to_dict()
            self.db.execute("insert or replace into answers values (?, ?)", (key, json.dumps(data)))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
