"""Meta Llama models hosted on Azure, in either of Azure's two wire formats.

``api: chat_completions``: Azure AI serverless / Foundry model endpoints. POST
``{endpoint}/chat/completions?api-version=...`` (or ``{endpoint}/models/chat/completions``), key as
``api-key`` or ``Authorization: Bearer``; the answer carries usage.

``api: aml_score``: Azure ML managed online endpoints. POST the scoring URL with ``Authorization:
Bearer`` and ``azureml-model-deployment``; body ``{"input_data": {"input_string": [messages],
"parameters": {...}}}``; answer ``{"output": "..."}`` without usage, so tokens are counted locally with
the Llama tokenizer named in ``tokenizer`` (never a GPT encoding), or reported as not counted.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import httpx2

from pikeclient.backends._bounds import abounded, attempt_bounds, bounded, check_timeouts
from pikeclient.backends._http import (
    ASYNC_HOOKS,
    SYNC_HOOKS,
    LazyClients,
    json_body,
    status_error,
    transport_error,
    wire_clock,
)
from pikeclient.backends.openai import check_url, read_api_key
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, ProtocolError
from pikeclient.core.tokens import HFTokenizerCounter
from pikeclient.core.types import Completion, Message, SamplingParams, TokenSource, Usage

APIS = ("chat_completions", "aml_score")


class AzureMetaLlamaClient(BaseLLMClient):
    """Llama on Azure AI model inference or an Azure ML managed online endpoint.

    Args:
        endpoint: the serverless endpoint base (``https://x.models.ai.azure.com``) or the full AML
            scoring URL (``https://x.<region>.inference.ml.azure.com/score``).
        api: ``chat_completions`` or ``aml_score``.
        model: the model name (sent as ``model`` on model-inference endpoints that host several).
        api_version: query parameter for ``chat_completions`` (None: not sent).
        route: ``chat/completions`` or ``models/chat/completions``.
        deployment: AML deployment (``azureml-model-deployment`` header); None lets AML route.
        auth: ``api-key`` or ``bearer`` (AML always uses bearer).
        tokenizer: a Llama tokenizer folder or ``tokenizer.json`` for local counts.
        timeout: seconds the server may stay silent (connecting, each read) in one attempt.
        total_timeout: seconds one attempt may take in all (None: ``timeout + 0.25 s x max_tokens``).
        base_url: an OpenAI-compatible base URL to send to instead of ``endpoint`` (``chat_completions``
            only): ``{base_url}/chat/completions``, as ``llm.base_url`` does for the OpenAI backends.
    """

    provider = "azure_meta_llama"

    def __init__(
        self,
        *,
        endpoint: str,
        api: str = "chat_completions",
        model: str = "Meta-Llama-3.1-8B-Instruct",
        api_version: str | None = "2024-05-01-preview",
        route: str = "chat/completions",
        deployment: str | None = None,
        auth: str = "api-key",
        api_key_env: str = "AZURE_LLAMA_API_KEY",
        tokenizer: str | None = None,
        timeout: float = 60.0,
        total_timeout: float | None = None,
        base_url: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(model=model, **common)
        if base_url:
            if api != "chat_completions":
                raise ConfigError("llm.base_url is for OpenAI-compatible endpoints: it needs llm.api=chat_completions")
            endpoint, route, api_version = base_url, "chat/completions", None
        if api not in APIS:
            raise ConfigError(f"llm.api={api!r}: allowed {', '.join(APIS)}")
        if auth not in ("api-key", "bearer"):
            raise ConfigError(f"llm.auth={auth!r}: allowed api-key, bearer")
        check_timeouts(timeout, total_timeout)
        self.api = api
        self.url = self._url(check_url(endpoint, "llm.endpoint"), api, route)
        self.params = {"api-version": api_version} if api == "chat_completions" and api_version else {}
        self.deployment = deployment
        self.timeout = timeout
        self.total_timeout = total_timeout
        self._headers = self._auth_headers(read_api_key(api_key_env), auth, api, deployment)
        self._counter = HFTokenizerCounter(tokenizer) if tokenizer else None
        self._clients: LazyClients[httpx2.Client, httpx2.AsyncClient] = LazyClients(
            lambda: httpx2.Client(timeout=self.timeout, headers=self._headers, event_hooks=SYNC_HOOKS),
            lambda: httpx2.AsyncClient(timeout=self.timeout, headers=self._headers, event_hooks=ASYNC_HOOKS),
        )

    @staticmethod
    def _url(endpoint: str, api: str, route: str) -> str:
        if api == "aml_score":
            return endpoint  # the scoring URL as Azure ML shows it
        if route not in ("chat/completions", "models/chat/completions"):
            raise ConfigError(f"llm.route={route!r}: allowed chat/completions, models/chat/completions")
        return f"{endpoint.rstrip('/')}/{route}"

    @staticmethod
    def _auth_headers(key: str, auth: str, api: str, deployment: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if api == "aml_score" or auth == "bearer":
            headers["authorization"] = f"Bearer {key}"
        else:
            headers["api-key"] = key
        if api == "aml_score" and deployment:
            headers["azureml-model-deployment"] = deployment
        return headers

    @property
    def count_source(self) -> TokenSource:
        return "tokenizer" if self._counter is not None else "none"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "endpoint": self.url, "api": self.api, "deployment": self.deployment}

    def close(self) -> None:
        self._clients.close()

    async def aclose(self) -> None:
        await self._clients.aclose()

    # -- one attempt ----------------------------------------------------------------------------

    def _complete(self, messages: list[Message], params: SamplingParams) -> Completion:
        start = time.perf_counter()
        with wire_clock() as clock, bounded(attempt_bounds(self.total_timeout, self.timeout, params.max_tokens)):
            try:
                response = self._clients.sync.post(self.url, params=self.params, json=self._body(messages, params))
                completion = self._parse(response)
            except Exception as error:  # noqa: BLE001 - translated or re-raised as-is
                raise transport_error(error) or error from error
        return replace(completion, send_delay_s=clock.send_delay(start), connect_s=clock.connect_s)

    async def _acomplete(self, messages: list[Message], params: SamplingParams) -> Completion:
        start = time.perf_counter()
        with wire_clock() as clock:
            async with abounded(attempt_bounds(self.total_timeout, self.timeout, params.max_tokens)):
                try:
                    response = await self._clients.aio.post(self.url, params=self.params,
                                                            json=self._body(messages, params))
                    completion = self._parse(response)
                except Exception as error:  # noqa: BLE001 - translated or re-raised as-is
                    raise transport_error(error) or error from error
        return replace(completion, send_delay_s=clock.send_delay(start), connect_s=clock.connect_s)

    def _body(self, messages: list[Message], params: SamplingParams) -> dict[str, Any]:
        if self.api == "aml_score":
            parameters: dict[str, Any] = {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_new_tokens": params.max_tokens,
                "do_sample": params.temperature > 0,
            }
            if params.stop:
                parameters["stop"] = list(params.stop)
            if params.repetition_penalty is not None:
                parameters["repetition_penalty"] = params.repetition_penalty
            return {"input_data": {"input_string": messages, "parameters": parameters}}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _parse(self, response: httpx2.Response) -> Completion:
        body = json_body(response)
        if response.status_code >= 400:
            raise status_error(response.status_code, response.headers, body, response.reason_phrase)
        if self.api == "aml_score":
            return _aml_completion(body)
        return _chat_completion(body)

    # -- token counting ---------------------------------------------------------------------------

    def get_token_count(self, text: str) -> int | None:
        return self._counter.count(text) if self._counter else None

    def count_message_tokens(self, messages: list[Message]) -> int | None:
        return self._counter.count_messages(messages) if self._counter else None


def _aml_completion(body: Any) -> Completion:
    output = body.get("output") if isinstance(body, dict) else None
    if isinstance(output, list) and output:  # some Llama deployments wrap the answer in a list
        output = output[0]
    if isinstance(output, dict):
        output = output.get("content")
    if not isinstance(output, str):
        raise ProtocolError("the server answered without 'output' text: not an Azure ML scoring answer")
    return Completion(text=output, finish_reason=None)


def _chat_completion(body: Any) -> Completion:
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ProtocolError("the server answered without choices: not a chat completion") from error
    if not isinstance(text, str):  # not an empty answer: no content at all (a filtered or broken response)
        raise ProtocolError(f"the server answered without message content (finish_reason="
                            f"{choice.get('finish_reason')!r})")
    return Completion(text=text, finish_reason=choice.get("finish_reason"), usage=Usage.from_server(body.get("usage")),
                      model=body.get("model"))
