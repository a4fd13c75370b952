"""Keys never leave the process: every secret the process holds is scrubbed, by value, from what it writes.

Names catch only the keys that sit where a key is expected. A key also travels in a header override
(``Authorization: Bearer ...``), in a URL's ``user:key@`` part, pasted into ``api_key_env`` instead of
a variable's name, or echoed by a server in a 401 body. So the secrets' *values* are collected once,
from the config and the environment it names, and every record, log line, MLflow param, tag, trace
and ``.hydra`` file is scrubbed of them, whatever path a value took.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
MIN_SECRET = 6  # shorter values would mask ordinary words
AUTH_HEADERS = ("authorization", "api-key", "x-api-key", "ocp-apim-subscription-key", "proxy-authorization")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secrets_in(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values a run's config holds or names: keys in the variables ``*api_key_env`` names,
    credential header values, URL userinfo, and a key pasted where a variable's name belongs."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for path, key, value in _walk(config):
        if not isinstance(value, str) or not value:
            continue
        name = key.lower()
        if name.endswith("api_key_env"):
            if _ENV_NAME.match(value):
                found.add(environ.get(value, ""))
            else:
                found.add(value)  # not a variable name: the key itself, pasted in by mistake
        elif name in AUTH_HEADERS and any(part.endswith("headers") for part in path):
            found.add(value)
            found.update(value.split())  # "Bearer <key>": the key alone too
        elif "://" in value:
            parts = urlsplit(value)
            if parts.password:
                found.add(parts.password)
                # HTTP clients send user:key@ as "Authorization: Basic base64(user:key)"; a server
                # echoing that header would otherwise leak the key in another spelling.
                basic = f"{unquote(parts.username or '')}:{unquote(parts.password)}"
                found.add(base64.b64encode(basic.encode()).decode())
            if parts.username and parts.password is None and len(parts.username) >= MIN_SECRET:
                found.add(parts.username)  # https://<token>@host
    return sorted((s for s in found if len(s) >= MIN_SECRET and s.lower() != "bearer"), key=len, reverse=True)


def _walk(node: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value, path)
    elif path:
        yield path[:-1], path[-1], node


class Redactor:
    """Replaces each secret value with ``***`` in text, nested data and files."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def data(self, value: Any) -> Any:
        """A copy of ``value`` (dicts, lists, strings) with every secret masked."""
        if not self.secrets:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)) if isinstance(k, str) else k: self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.data(v) for v in value)
        return value

    def files(self, folder: Path) -> None:
        """Scrub the text files under ``folder`` in place (Hydra's ``.hydra`` copies of the config)."""
        if not self.secrets or not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="surrogateescape")
                scrubbed = self.text(text)
                if scrubbed != text:
                    path.write_text(scrubbed, encoding="utf-8", errors="surrogateescape")

    def install(self) -> None:
        """Scrub every log record this process emits, through any handler (console, Hydra's job log)."""
        if not self.secrets:
            return
        log_filter = _RedactingFilter(self)
        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter)


class _RedactingFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self.redactor.text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True
