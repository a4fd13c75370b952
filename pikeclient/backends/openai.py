"""OpenAI and any OpenAI-compatible server (vLLM, Ollama, llama.cpp server) through the openai SDK."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx2
import openai

from pikeclient.backends._bounds import abounded, attempt_bounds, bounded, check_timeouts
from pikeclient.backends._flavours import check_extra_body, sampling_extras, stream_ended_early
from pikeclient.backends._flavours import flavour as find_flavour
from pikeclient.backends._http import (
    ASYNC_HOOKS,
    SYNC_HOOKS,
    LazyClients,
    aiohttp_transport,
    json_body,
    status_error,
    transport_error,
    wire_clock,
)
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import (
    ConfigError,
    LLMConnectionError,
    LLMError,
    LLMTimeoutError,
    ProtocolError,
    ServerError,
)
from pikeclient.core.tokens import HFTokenizerCounter, TiktokenCounter
from pikeclient.core.types import Completion, Message, SamplingParams, TokenSource, Usage

try:  # several times faster than json for a stream's many small events
    from orjson import loads
except ImportError:  # pragma: no cover - orjson is a dependency; json is the same, slower
    from json import loads

CHAT_PATH = "/chat/completions"
# Sent when a server needs no key (local vLLM, Ollama): the SDK refuses an empty one.
NO_KEY = "no-key"

# Context windows of OpenAI models (prompt + completion tokens), for checks before any call.
CONTEXT_WINDOWS = {
    "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576, "gpt-4o": 128_000, "gpt-4o-mini": 128_000,
    "gpt-4-turbo": 128_000, "gpt-4": 8_192, "gpt-35-turbo": 16_385, "gpt-3.5-turbo": 16_385,
}


def read_api_key(env_var: str | None) -> str:
    """The key from the environment variable the config names; keys never live in config files."""
    if not env_var:
        return NO_KEY
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_var):  # never echo it: it may be the key itself
        raise ConfigError("llm.api_key_env must be the NAME of an environment variable (letters, digits, _); "
                          "put the key itself in that variable")
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise ConfigError(f"environment variable {env_var} is not set (it should hold the API key; see llm.api_key_env)")
    if not key.isascii() or not key.isprintable():  # an HTTP header cannot carry it; never echo it
        raise ConfigError(f"environment variable {env_var} holds characters a key cannot have (non-ASCII or "
                          "control characters): check what was pasted into it")
    return key


class OpenAIClient(BaseLLMClient):
    """Chat completions against OpenAI or an OpenAI-compatible ``base_url``.

    Args:
        model: model name sent to the server.
        base_url: e.g. ``http://localhost:8000/v1`` for vLLM; None for api.openai.com.
        api_key_env: name of the environment variable holding the key (None: server needs no key).
        timeout: seconds the server may stay silent (connecting, each read) in one attempt.
        total_timeout: seconds one attempt may take in all, from its start to the answer's last byte
            (None: ``timeout + 0.25 s x max_tokens``; see :mod:`pikeclient.backends._bounds`).
        stream: stream the answer (gives time to first token).
        max_tokens_field: ``max_tokens`` or ``max_completion_tokens`` (newer OpenAI models).
        tokenizer_model: model name tiktoken should count with, when ``model`` is an alias.
        tokenizer: a Hugging Face tokenizer folder or ``tokenizer.json`` (with its chat template): exact
            counts for an open model behind an OpenAI-compatible server, where the server reports none.
        default_headers: extra HTTP headers for every request.
        flavour: the server's names for parameters the OpenAI API lacks (``openai``, ``vllm``,
            ``llamacpp``, ``ollama``; see :mod:`pikeclient.backends._flavours`).
        extra_body: server-specific parameters added to every request body as they are; never a field
            pikeclient sets (the model, messages, sampling, streaming: ``_flavours.SET_BY_PIKECLIENT``).
    """

    provider = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        organization: str | None = None,
        timeout: float = 60.0,
        total_timeout: float | None = None,
        stream: bool = False,
        max_tokens_field: str = "max_tokens",
        tokenizer_model: str | None = None,
        tokenizer: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        flavour: str = "openai",
        extra_body: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(model=model, **common)
        check_timeouts(timeout, total_timeout)
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(f"llm.max_tokens_field={max_tokens_field!r}: allowed max_tokens, max_completion_tokens")
        self.base_url = check_url(base_url, "llm.base_url") if base_url else None
        self.stream = stream
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.flavour = find_flavour(flavour)
        # A server that reads one name only gets that one (llama.cpp ignores max_completion_tokens).
        self.max_tokens_field = self.flavour.max_tokens_field or max_tokens_field
        self.extra_body = dict(extra_body or {})
        check_extra_body(self.extra_body)
        self._counter: TiktokenCounter | HFTokenizerCounter = (
            HFTokenizerCounter(tokenizer) if tokenizer else TiktokenCounter(tokenizer_model or model))
        if self.context_window is None:
            self.context_window = CONTEXT_WINDOWS.get(tokenizer_model or model)
        self._sdk_args: dict[str, Any] = {
            "api_key": read_api_key(api_key_env),
            "timeout": timeout,
            "max_retries": 0,  # pikeclient's retry policy is the only one
            "default_headers": dict(default_headers or {}) or None,
        }
        if organization:
            self._sdk_args["organization"] = organization
        self._clients: LazyClients[openai.OpenAI, openai.AsyncOpenAI] = LazyClients(self._make_sync, self._make_async)

    # -- SDK clients (created on first use, one pair per client object) ----------------------------

    def _make_sync(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, http_client=sdk_http_client(), **self._sdk_args)

    def _make_async(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, http_client=sdk_http_client(aio=True), **self._sdk_args)

    @property
    def sdk(self) -> openai.OpenAI:
        return self._clients.sync

    @property
    def async_sdk(self) -> openai.AsyncOpenAI:
        return self._clients.aio

    def close(self) -> None:
        self._clients.close()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def prepare(self) -> None:
        """Build the SDK client and import what its first request would (~0.3-0.5 s): otherwise the first
        measured call pays for it, and on the event loop it delays every call in flight with it."""
        super().prepare()
        _ = self.async_sdk.chat.completions.with_raw_response  # the SDK imports its resources lazily
        with contextlib.suppress(ImportError, AttributeError):
            # What the async SDK's first request otherwise finds out in a thread it starts then (~2 ms).
            from openai._base_client import get_platform

            if self.async_sdk._platform is None:
                self.async_sdk._platform = get_platform()
        with contextlib.suppress(ImportError):  # the HTTP transport's asyncio backend, loaded on first request
            importlib.import_module("anyio._backends._asyncio")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "endpoint": str(self._clients.made.base_url), "stream": self.stream}

    @property
    def measures_ttft(self) -> bool:
        return self.stream

    @property
    def request_model(self) -> str:
        """The ``model`` a request names (Azure's OpenAI-compatible API routes on the deployment)."""
        return self.model

    # -- one attempt ------------------------------------------------------------------------------

    # TTFT counts from the moment the request went out (the wire clock), not from before the SDK built
    # it: that client time is the attempt's ``send_delay_s``.

    # The request goes through the SDK's own client (its base URL, headers, auth, error classes) as a
    # plain body, and the answer comes back as the HTTP response, parsed here: the SDK's typed request
    # transform and response models cost more CPU than the rest of a call (a quarter of a streamed
    # call's, model construction per chunk), and the numbers need none of it.

    def _complete(self, messages: list[Message], params: SamplingParams) -> Completion:
        start = time.perf_counter()
        with wire_clock() as clock, bounded(attempt_bounds(self.total_timeout, self.timeout, params.max_tokens)):
            try:
                response = self.sdk.post(CHAT_PATH, cast_to=httpx2.Response, body=self._request(messages, params),
                                         stream=self.stream)
                with contextlib.closing(response):
                    completion = (read_stream(response.iter_bytes(), response, clock.sent or start)
                                  if self.stream else _completion(json_body(response)))
            except Exception as error:  # noqa: BLE001 - translated or re-raised as-is
                raise translate_error(error) from error
        return replace(completion, send_delay_s=clock.send_delay(start), connect_s=clock.connect_s)

    async def _acomplete(self, messages: list[Message], params: SamplingParams) -> Completion:
        start = time.perf_counter()
        with wire_clock() as clock:
            async with abounded(attempt_bounds(self.total_timeout, self.timeout, params.max_tokens)):
                try:
                    response = await self.async_sdk.post(CHAT_PATH, cast_to=httpx2.Response,
                                                         body=self._request(messages, params), stream=self.stream)
                    try:
                        completion = (await aread_stream(response.aiter_bytes(), response, clock.sent or start)
                                      if self.stream else _completion(json_body(response)))
                    finally:
                        await response.aclose()
                except Exception as error:  # noqa: BLE001 - translated or re-raised as-is
                    raise translate_error(error) from error
        return replace(completion, send_delay_s=clock.send_delay(start), connect_s=clock.connect_s)

    def _request(self, messages: list[Message], params: SamplingParams) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.request_model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            self.max_tokens_field: params.max_tokens,
        }
        if params.stop:
            request["stop"] = list(params.stop)
        if params.seed is not None:
            request["seed"] = params.seed
        extra = sampling_extras(self.flavour, params, self.extra_body)
        if extra:  # not OpenAI parameters; each server reads its own names from the body
            request.update(extra)
        if self.stream:
            request["stream"] = True
            request["stream_options"] = {"include_usage": True}
        return request

    # -- token counting -----------------------------------------------------------------------------

    @property
    def count_source(self) -> TokenSource:
        return self._counter.source

    def get_token_count(self, text: str) -> int:
        return self._counter.count(text)

    def count_message_tokens(self, messages: list[Message]) -> int:
        return self._counter.count_messages(messages)

    def check_context(self, messages: Sequence[Message], **sampling: Any) -> None:
        # Most prompts fit by their byte length alone (a tiktoken token is >= 1 byte); only the others are encoded.
        limit = self.sampling.merged(sampling).max_tokens
        if isinstance(self._counter, TiktokenCounter) and self._counter.upper_bound(messages) + limit <= (
                self.context_window or 0):
            return
        super().check_context(messages, **sampling)


def check_url(url: str, key: str) -> str:
    """Fail at construction, not at the first request, on a URL without scheme or host."""
    parsed = httpx2.URL(url) if "://" in url else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{key}={url!r} is not an http(s) URL")
    return url


def sdk_http_client(aio: bool = False) -> Any:
    """The SDK's own default HTTP client (its timeouts and connection limits), reading the wire clock; the
    async one over aiohttp where it is installed (``_http.AioHTTPTransport``: half the CPU per request)."""
    if aio:
        return openai.DefaultAsyncHttpxClient(event_hooks=ASYNC_HOOKS,
                                              transport=aiohttp_transport(openai.DEFAULT_CONNECTION_LIMITS))
    return openai.DefaultHttpxClient(event_hooks=SYNC_HOOKS)


def _completion(response: Any) -> Completion:
    """A chat completion's JSON (``json_body`` has refused what is not JSON) as a Completion."""
    if isinstance(response, str) or response is None:
        raise ProtocolError("the server answered HTTP 200 without JSON (an HTML page or a proxy's answer?)")
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ProtocolError("the server answered HTTP 200 without choices: not a chat completion")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict) or (message.get("content") is None and not message.get("tool_calls")):
        # Not an empty answer: the server sent no content at all (a filtered or broken response).
        raise ProtocolError(f"the server answered without message content (finish_reason="
                            f"{choice.get('finish_reason')!r})")
    return Completion(
        text=message.get("content") or "",
        finish_reason=choice.get("finish_reason"),
        usage=Usage.from_server(response.get("usage")),
        model=response.get("model"),
    )


class _StreamState:
    """Accumulates a streamed answer from its server-sent events; shared by the sync and async readers.

    Only chunks that carry output text are timed: Azure's first chunk may have empty ``choices``
    (prompt filter results) and most servers send a role-only delta first; neither is a token.
    """

    def __init__(self, start: float, response: httpx2.Response) -> None:
        self.start = start
        self.parts: list[str] = []
        self.first: float | None = None  # perf_counter of the first and the last output chunk
        self.last: float | None = None
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.model: str | None = None
        self.chunks = 0
        self.done = False
        self.content_type = response.headers.get("content-type", "")
        self.pending = b""

    def feed(self, data: bytes) -> None:
        """Bytes as they arrive: every complete event (``data: {...}`` up to a blank line) is read now."""
        now = time.perf_counter()
        events = (self.pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
        self.pending = events.pop()
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and not self.done:
                    self.add(line[5:].strip(), now)

    def add(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = loads(payload)
        except ValueError:
            raise ProtocolError(f"the server sent an event that is not JSON: {payload[:120]!r}") from None
        if not isinstance(chunk, dict):
            raise ProtocolError(f"the server sent an event that is not a chat completion chunk: {payload[:120]!r}")
        if isinstance(chunk.get("error"), dict):  # an error reported inside the stream (vLLM, proxies)
            raise ServerError(f"the server reported an error in the stream: {chunk['error'].get('message')}")
        self.chunks += 1
        self.model = chunk.get("model") or self.model
        if chunk.get("usage") is not None:
            self.usage = Usage.from_server(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                if self.first is None:
                    self.first = now
                self.last = now
                self.parts.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def result(self) -> Completion:
        end = time.perf_counter()
        if self.pending.strip():  # a last event without its blank line
            for line in self.pending.split(b"\n"):
                if line.startswith(b"data:"):
                    self.add(line[5:].strip(), end)
        if self.finish_reason is None:
            # The server ended the stream cleanly before saying it was done (a dropped connection
            # raises while reading instead): an empty stream or a cut answer, each named.
            raise stream_ended_early(self.chunks, sum(map(len, self.parts)), self.content_type)
        if self.first is None:
            return Completion("", self.finish_reason, self.usage, None, self.model)
        gaps = len(self.parts) - 1
        itl = (self.last - self.first) / gaps if gaps > 0 else None
        return Completion("".join(self.parts), self.finish_reason, self.usage, ttft_s=self.first - self.start,
                          model=self.model, itl_s=itl, decode_s=end - self.first)


def read_stream(data: Iterable[bytes], response: httpx2.Response, start: float) -> Completion:
    state = _StreamState(start, response)
    for piece in data:
        state.feed(piece)
        if state.done:  # [DONE]: what follows is no answer (a server may close without ending the body)
            break
    return state.result()


async def aread_stream(data: AsyncIterable[bytes], response: httpx2.Response, start: float) -> Completion:
    state = _StreamState(start, response)
    async for piece in data:
        state.feed(piece)
        if state.done:  # [DONE]: what follows is no answer (a server may close without ending the body)
            break
    return state.result()


def translate_error(error: Exception) -> Exception:
    """Map an openai SDK or transport exception to pikeclient's error classes."""
    if isinstance(error, LLMError):
        return error
    if isinstance(error, openai.APITimeoutError):
        return LLMTimeoutError(f"timed out: {error}")
    if isinstance(error, openai.APIStatusError):
        return status_error(error.status_code, error.response.headers, error.body, error.message)
    if isinstance(error, openai.APIConnectionError):
        request = getattr(error, "request", None)
        where = f" to {request.url}" if request is not None else ""
        cause = error.__cause__ or error.__context__
        return LLMConnectionError(f"connection{where} failed: {cause or error}")
    if isinstance(error, openai.APIResponseValidationError):
        return ServerError(f"malformed response: {error}")
    return transport_error(error) or error
