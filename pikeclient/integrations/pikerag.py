"""PIKE-RAG's workflows on any pikeclient backend: ``PikeClientLLM``, a client class PIKE-RAG's YAML can name.

::

    llm_client:
      module_path: pikeclient.integrations.pikerag
      class_name: PikeClientLLM
      args:
        llm: openai                      # a shipped llm= config, or a block with _target_
        overrides: [llm.base_url=http://127.0.0.1:8000/v1, sampling.max_tokens=512]
        tracking: true                   # opt-in: the workflow's calls become one MLflow run
      llm_config: {model: qwen2.5:7b, temperature: 0}
      cache_config: {location_prefix: null, auto_dump: true}

PIKE-RAG's workflows check ``issubclass(client_class, BaseLLMClient)`` against their own base class, so
this module imports PIKE-RAG (its checkout on ``PYTHONPATH``, as PIKE-RAG is used). Its base class keeps
its role: the answer cache (pickledb, keyed by messages and ``llm_config``), the round switch
(``update_cache_location``) and ``generate_content_with_messages``. pikeclient makes the calls: its retry
policy (PIKE-RAG's own loops are not used), timing, token counts and tracking. A call that still fails
after its retries gives PIKE-RAG what its own clients give, an empty answer, but never silently: it is
logged as an error (Python logging and PIKE-RAG's client log), counted (``stats``, the MLflow run) and
never cached; ``on_error: raise`` raises it instead.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pikeclient.config.factory import build_client
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, LLMError
from pikeclient.core.types import ChatResult, Message
from pikeclient.integrations.loop import LoopThread
from pikeclient.integrations.pikerag_config import (
    check_args,
    default_output_dir,
    log_dir_of,
    pikerag_config,
    sampling_from_llm_config,
)
from pikeclient.integrations.recorder import CallRecorder, exit_status
from pikeclient.run.cache import IDENTITY_FIELDS
from pikeclient.run.cost import find_price
from pikeclient.run.experiment import start_tracking
from pikeclient.run.redact import Redactor, secrets_in
from pikeclient.run.runner import record_answer, record_error
from pikeclient.run.settings import RunSettings
from pikeclient.run.stats import RunStats
from pikeclient.tracking.sidecar import TrackingSidecar

try:
    from pickledb import PickleDB
    from pikerag.llm_client.base import BaseLLMClient as PikeRagClient
    from pikerag.utils.logger import Logger as PikeRagLogger
except ImportError as error:
    raise ImportError(
        "pikeclient.integrations.pikerag needs PIKE-RAG on the path (its checkout on PYTHONPATH) and what "
        f"pikerag.llm_client imports (langchain-core, pickledb, openai, torch, transformers): {error}"
    ) from error

log = logging.getLogger(__name__)

__all__ = ["PikeClientLLM"]


class PikeClientLLM(PikeRagClient):
    """A PIKE-RAG LLM client whose calls go through a pikeclient backend.

    Built by PIKE-RAG's workflows as ``PikeClientLLM(location=..., auto_dump=..., logger=...,
    llm_config=..., **args)``. ``args``:

    - ``llm``: a shipped ``llm=`` config's name, or a block with ``_target_`` (required);
    - ``overrides``: run.py's command-line overrides (``llm.base_url=...``, ``retry=patient``, ...);
    - ``tracking``: false (default), true, or ``tracking.*`` settings: log the calls to MLflow;
    - ``output_dir``: where a tracked run's records go (default: ``<log_dir>/pikeclient/...``);
    - ``on_error``: ``empty`` (PIKE-RAG's contract: an empty answer, logged and counted) or ``raise``;
    - ``max_attempt``: PIKE-RAG's name for ``retry.max_attempts``.

    One instance may be shared by any number of threads: calls run on one private event loop.
    """

    NAME = "PikeClientLLM"

    def __init__(self, location: str | None = None, auto_dump: bool = True, logger: Any = None,
                 llm_config: Mapping[str, Any] | None = None, *, llm: str | Mapping[str, Any] | None = None,
                 overrides: Sequence[str] = (), tracking: bool | Mapping[str, Any] = False,
                 output_dir: str | None = None, on_error: str = "empty", max_attempt: int | None = None,
                 **unknown: Any) -> None:
        check_args(unknown, on_error)
        llm_config = dict(llm_config or {})
        self.on_error = on_error
        self._default_sampling = sampling_from_llm_config(llm_config)
        self._model_label = llm_config.get("model")
        cfg = pikerag_config(llm, overrides, llm_config, tracking, max_attempt)
        settings = RunSettings.from_config(cfg)
        client = build_client(settings.config.llm, **settings.client_arguments())
        try:
            _check_sampling(client, self._default_sampling)
            client.prepare()
            recorder = _recorder(settings, client, llm_config, logger, output_dir)
        except BaseException:
            client.close()
            raise
        self._session = _Session(client, recorder)
        # Nobody calls close() in PIKE-RAG's workflows: the run ends when the client is collected, or at exit.
        self._finalizer = weakref.finalize(self, self._session.collected)
        self._finalizer.atexit = False  # at exit, _Session.at_exit says how the program ended
        atexit.register(self._session.at_exit)
        self._identity = {k: v for k, v in client.describe().items() if k in IDENTITY_FIELDS and v is not None}
        self._warned_cut = False
        log.info("PIKE-RAG calls go to %s %s (llm_config.model=%s)", client.provider, client.model,
                 self._model_label)
        # PIKE-RAG's own retry settings stay unused: its base class has no loop, and this class none.
        super().__init__(location=location, auto_dump=auto_dump, logger=logger, max_attempt=1)

    # -- what callers may read ----------------------------------------------------------------------

    @property
    def client(self) -> BaseLLMClient:
        """The pikeclient client making the calls."""
        return self._session.client

    @property
    def stats(self) -> RunStats:
        """Calls, errors by kind, cache hits, latencies and tokens so far (tracked or not)."""
        return self._session.recorder.stats

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id once the first call was recorded (None without tracking)."""
        return self._session.recorder.run_id

    def close(self, status: str | None = None) -> None:
        """Save the cache, release the client and end the tracked run (FINISHED, or FAILED when too
        many calls failed; ``status`` overrides). Called when the client is collected if nobody does."""
        self._finalizer.detach()
        self._session.status = status
        self._session.close()

    # -- PIKE-RAG's hooks -----------------------------------------------------------------------------

    def _get_response_with_messages(self, messages: list[dict], **llm_config: Any) -> ChatResult | None:
        """One call under pikeclient's retry policy; None (an empty answer for PIKE-RAG) when it failed."""
        sampling = self._sampling(llm_config)
        session = self._session
        record = session.recorder.start(messages, **session.cache_field())
        try:
            result = session.loop.run(session.client.achat(messages, **sampling))
        except LLMError as error:
            session.recorder.add(record_error(record, error), messages)
            self._report(error, messages)
            if self.on_error == "raise":
                raise
            return None
        session.recorder.add(record_answer(record, result), messages)
        if result.finish_reason == "length" and not self._warned_cut:
            self._warned_cut = True
            log.warning("an answer was cut at max_tokens=%s: raise llm_config.max_tokens for complete answers",
                        session.client.sampling.merged(sampling).max_tokens)
        return result

    def _get_content_from_response(self, response: ChatResult, messages: list[dict] | None = None) -> str:
        return response.text

    def _generate_cache_key(self, messages: list[dict], llm_config: dict) -> str:
        """PIKE-RAG's key (messages and llm_config) with the backend added: an answer cached for one
        backend is never served for another that PIKE-RAG's llm_config would not tell apart."""
        super()._generate_cache_key(messages, llm_config)  # PIKE-RAG's own checks of the messages
        return json.dumps((messages, llm_config, {"pikeclient": self._identity}))

    def _get_cache(self, messages: list[dict], llm_config: dict) -> Any:
        session = self._session
        with session.lock:
            if session.cache is None:
                return False
            value = session.run(session.cache.get(self._generate_cache_key(messages, llm_config)))
        if value is not False and value is not None and value != "":  # what PIKE-RAG serves instead of calling
            session.recorder.cache_hit(messages, value if isinstance(value, str) else str(value),
                                       **session.cache_field())
        return value

    def _save_cache(self, messages: list[dict], llm_config: dict, content: str) -> None:
        if content == "":  # a failed call (or an empty answer), which PIKE-RAG would call again anyway
            return
        session = self._session
        with session.lock:
            if session.cache is not None:
                session.run(session.cache.set(self._generate_cache_key(messages, llm_config), content))
                if self._cache_auto_dump:
                    session.run(session.cache.save())

    def _remove_cache(self, messages: list[dict], llm_config: dict) -> None:
        session = self._session
        with session.lock:
            if session.cache is not None:
                session.run(session.cache.remove(self._generate_cache_key(messages, llm_config)))

    def update_cache_location(self, new_location: str) -> None:
        """Save the current cache and open (reading what it holds) the one at ``new_location``."""
        assert new_location is not None, "A valid cache location must be provided"
        self._session.switch_cache(str(new_location))
        self._cache_location = new_location

    @property
    def _cache(self) -> Any:  # PIKE-RAG's attribute, kept by the session that outlives this object
        return self._session.cache

    @_cache.setter
    def _cache(self, value: Any) -> None:
        self._session.cache = value

    # -- helpers ---------------------------------------------------------------------------------------

    def _sampling(self, llm_config: Mapping[str, Any]) -> dict[str, Any]:
        model = llm_config.get("model")
        if model is not None and self._model_label is not None and model != self._model_label:
            raise ValueError(f"llm_config.model={model!r} in a call, but this client was built for "
                             f"{self._model_label!r}: build one client per model")
        return sampling_from_llm_config(llm_config) if llm_config else self._default_sampling

    def _report(self, error: LLMError, messages: Sequence[Message]) -> None:
        last = str(messages[-1].get("content", ""))[:120] if messages else ""
        text = (f"LLM call failed after {error.attempts} attempt(s), {error.kind}: {error}; "
                f"{'raised' if self.on_error == 'raise' else 'PIKE-RAG gets an empty answer'} (prompt: {last!r})")
        text = self._session.recorder.redactor.text(text)
        log.error("%s", text)
        if isinstance(self.logger, PikeRagLogger):  # PIKE-RAG's client log, where its users look
            self.logger.error(text, tag=self.NAME)


class _Session:
    """What a PikeClientLLM owns and must release, apart from it so that its finalizer can reach it."""

    def __init__(self, client: BaseLLMClient, recorder: CallRecorder) -> None:
        self.client = client
        self.recorder = recorder
        self.loop = LoopThread()
        self.cache: Any = None
        self.lock = threading.RLock()  # the cache: pickledb is not safe across threads
        self.status: str | None = None
        self.closed = False

    def run(self, value: Any) -> Any:
        """pickledb >= 1.4 returns coroutines when the calling thread runs an event loop: run them on ours."""
        return self.loop.run(value) if inspect.iscoroutine(value) else value

    def cache_field(self) -> dict[str, str]:
        """Which cache file (QA round) a record belongs to."""
        location = getattr(self.cache, "location", None)
        return {"pikerag_cache": Path(location).name} if location else {}

    def switch_cache(self, location: str) -> None:
        with self.lock:
            if self.cache is not None:
                self.run(self.cache.save())
            cache = PickleDB(location=location)
            loader = getattr(cache, "load", None)  # pickledb >= 1.4 no longer reads the file when opened
            if callable(loader) and os.path.exists(location):
                self.run(loader())
            self.cache = cache

    def close(self) -> None:
        """Save the cache, stop the loop, release the client, end the run; once."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            atexit.unregister(self.at_exit)
            try:
                if self.cache is not None:
                    self.run(self.cache.save())
            finally:
                self.loop.close(self.client.aclose)
                self.client.close()
                self.recorder.close(self.status)

    def collected(self) -> None:
        """The client was garbage-collected. The collector may run in any thread, also in the loop's or a
        local model's worker, which close() waits for: there the closing goes to a thread of its own."""
        if threading.current_thread() is threading.main_thread():
            self.close()
        else:
            threading.Thread(target=self.close, name="pikeclient-close").start()

    def at_exit(self) -> None:
        self.status = self.status or exit_status()
        self.close()


def _check_sampling(client: BaseLLMClient, sampling: Mapping[str, Any]) -> None:
    """A value out of range fails when the client is built, not in every call."""
    try:
        client.sampling.merged(sampling)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"llm_config.{error}") from None


def _recorder(settings: RunSettings, client: BaseLLMClient, llm_config: Mapping[str, Any], logger: Any,
              output_dir: str | None) -> CallRecorder:
    """Statistics always; with tracking on, the MLflow run (its store checked now, before any call)."""
    c = settings.config
    redactor = Redactor(secrets_in(settings.resolved, os.environ))
    price = find_price(asdict(c.pricing), client.describe())
    if not c.tracking.enabled:
        return CallRecorder(price=price, max_error_rate=c.experiment.max_error_rate, redactor=redactor)
    folder = Path(output_dir) if output_dir else default_output_dir(logger, c.paths.runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = redactor.data({**{k: settings.resolved[k] for k in ("llm", "sampling", "retry", "rate_limit")},
                            "pikerag": {"llm_config": dict(llm_config)}})
    log_dir = log_dir_of(logger)
    info = {"source": "pikerag", "job_name": log_dir.name if log_dir else "pikerag"}
    if log_dir is not None:
        info["pikerag_log_dir"] = str(log_dir.resolve())
    tracking = TrackingSidecar()
    try:
        start_tracking(tracking, settings, config, client, info, folder, redactor=redactor)
        tracking.wait_ready()  # an unusable store or experiment fails here, before any call
    except BaseException:
        tracking.end("FAILED")
        with contextlib.suppress(OSError):  # nothing left behind: the folder goes if nothing was written
            folder.rmdir()
        raise
    return CallRecorder(price=price, max_error_rate=c.experiment.max_error_rate, tracking=tracking,
                        output_dir=folder, records_file=c.experiment.records_file,
                        log_records=c.tracking.log_records, redactor=redactor)
