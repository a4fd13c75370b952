"""A private event loop on its own thread, for synchronous callers that run calls from many threads.

Frameworks such as PIKE-RAG call an LLM client synchronously, from worker threads of their own pools
or from code that already runs an event loop (a notebook). ``asyncio.run`` per call would fail inside
a running loop and would make a new loop (and new connections) for every call. Instead every call is
a coroutine submitted to one loop, owned by the client: calls from all threads share its connections,
a local model batches the calls that wait together, and a caller's own loop is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """Runs coroutines on one event loop in a daemon thread, started on first use.

    ``run`` blocks the calling thread (never the loop) until the coroutine is done, and may be called
    from any number of threads at once. If the caller is interrupted (Ctrl-C), its coroutine is cancelled.
    """

    def __init__(self, name: str = "pikeclient-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """The coroutine's result (or its exception), run on the loop."""
        try:
            loop = self._running_loop()
        except RuntimeError:
            coroutine.close()  # never to run: no "never awaited" warning on top of the error
            raise
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupted caller leaves nothing running behind it
            raise

    def close(self, last: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Run ``last`` (releasing what belongs to the loop, e.g. async connections), then stop the loop.
        Safe to call twice, and from any thread but the loop's own."""
        with self._start_lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if last is not None:
            try:
                asyncio.run_coroutine_threadsafe(_awaited(last), loop).result(timeout=30)
            except Exception as error:  # noqa: BLE001 - releasing connections must not stop the shutdown
                log.warning("releasing the client's connections failed: %s", error)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(target=_serve, args=(loop, ready), name=self.name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


async def _awaited(last: Callable[[], Awaitable[Any]]) -> Any:
    return await last()
