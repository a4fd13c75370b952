"""An opt-in response cache (sqlite under ``runs/``), to develop prompts without paying twice.

It is content-addressed: the key is a hash of what decides the answer (backend, endpoint or
deployment, model, messages and sampling settings, as sorted JSON). Credentials are never part of it
(clients do not describe them). Each answer is committed as it arrives; errors are never cached.
A cached answer is not a measurement: records mark it ``cached`` and statistics leave it out.
Resuming an interrupted run is a different thing (``experiment.resume``, see ``pikeclient.run.resume``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pikeclient.core.errors import ConfigError
from pikeclient.core.types import ChatResult, Message, SamplingParams, Usage

MODES = ("off", "use", "refresh")
# Client fields that name where an answer comes from; others (stream, device) do not change it.
IDENTITY_FIELDS = ("provider", "model", "endpoint", "deployment", "api_version", "api")


def cache_key(client: Mapping[str, Any], messages: Sequence[Message], params: SamplingParams) -> str:
    identity = {k: client[k] for k in IDENTITY_FIELDS if client.get(k) is not None}
    request = {"client": identity, "messages": [dict(m) for m in messages], "sampling": asdict(params)}
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def request_digest(messages: Sequence[Message], params: SamplingParams) -> str:
    """A short digest of a request as sent (messages and sampling, not where it went): records carry it, so
    that a resumed run can tell that an earlier answer answered exactly the request it would send."""
    request = {"messages": [dict(m) for m in messages], "sampling": asdict(params)}
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class ResponseCache:
    """``mode``: ``use`` reads and writes, ``refresh`` only writes (calls everything again), ``off``."""

    def __init__(self, path: str | Path, mode: str = "off") -> None:
        if mode not in MODES:
            raise ValueError(f"cache.mode={mode!r}: allowed {', '.join(MODES)}")
        self.mode = mode
        self.db: sqlite3.Connection | None = None
        if mode != "off":
            try:  # the config's checks (pikeclient.config.checks.check_cache_path) catch the usual cases first
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # Sweep jobs may share the file: wait for a lock rather than fail.
                self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
                self.db.execute("pragma journal_mode=wal")
                self.db.execute("pragma synchronous=normal")  # durable across a process crash, cheap commits
                self.db.execute("create table if not exists answers (key text primary key, result text not null)")
            except (OSError, sqlite3.Error) as error:
                raise ConfigError(f"cache.path={str(path)!r}: cannot use it as the response cache ({error})") from None

    def get(self, key: str) -> ChatResult | None:
        if self.db is None or self.mode != "use":
            return None
        row = self.db.execute("select result from answers where key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        usage = Usage(**{k: v for k, v in data.pop("usage").items() if k != "total_tokens"})
        known = {name for name in ChatResult.__dataclass_fields__}
        return ChatResult(**{**{k: v for k, v in data.items() if k in known}, "usage": usage, "cached": True})

    def put(self, key: str, result: ChatResult) -> None:
        if self.db is not None:
            data = result.to_dict()
            self.db.execute("insert or replace into answers values (?, ?)", (key, json.dumps(data)))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
