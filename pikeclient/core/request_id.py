"""A call's request id, sent with each of its HTTP requests (``X-Request-Id``, which vLLM, SGLang, TGI and
most gateways log and echo), so that a call in the records or in MLflow can be found in the server's logs.

The runner names the call (:func:`request_id`); the HTTP backends' request hook adds the header
(``pikeclient.backends._http``). A context variable carries it between the two, as the wire clock's does:
each call is its own asyncio task, so calls in flight together never see each other's id, and a call's
retries send the same id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

HEADER = "X-Request-Id"
_CURRENT: ContextVar[str | None] = ContextVar("pikeclient_request_id", default=None)


@contextlib.contextmanager
def request_id(value: str) -> Iterator[str]:
    """Within it, requests sent from this task carry ``value``."""
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)


def current_request_id() -> str | None:
    return _CURRENT.get()
