"""Azure OpenAI: a deployment on ``https://<resource>.openai.azure.com``."""

from __future__ import annotations

from typing import Any

import openai

from pikeclient.backends.openai import OpenAIClient, check_url, sdk_http_client
from pikeclient.core.errors import ConfigError

ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"


class AzureOpenAIClient(OpenAIClient):
    """Chat completions on an Azure OpenAI deployment.

    Args:
        azure_endpoint: ``https://<resource>.openai.azure.com``.
        deployment: the deployment name (what Azure routes on).
        api_version: e.g. ``2024-10-21``.
        model: the model behind the deployment (``gpt-4o``); used for token counting and cost.
        api_key_env: environment variable holding the key; ignored with ``use_entra_id``.
        use_entra_id: authenticate with Microsoft Entra ID (needs ``azure-identity``).
        base_url: an OpenAI-compatible base URL to send to instead (``https://<resource>.openai.azure.com/
            openai/v1``, Azure's v1 API; or any server, a loopback test server say): requests go to
            ``{base_url}/chat/completions`` naming the deployment as the model, and ``azure_endpoint`` and
            ``api_version`` are not used. The same override points an OpenAI job of a sweep there too.
    """

    provider = "azure_openai"

    def __init__(
        self,
        *,
        azure_endpoint: str,
        deployment: str,
        api_version: str,
        model: str,
        api_key_env: str | None = "AZURE_OPENAI_API_KEY",
        use_entra_id: bool = False,
        **kwargs: Any,
    ) -> None:
        self.azure_endpoint = azure_endpoint if kwargs.get("base_url") else check_url(azure_endpoint,
                                                                                       "llm.azure_endpoint")
        self.deployment = deployment
        self.api_version = api_version
        self.use_entra_id = use_entra_id
        self._token_provider = _entra_token_provider() if use_entra_id else None
        if not deployment:
            raise ConfigError("llm.deployment is empty: name the Azure deployment to call")
        if not str(api_version).strip():
            raise ConfigError("llm.api_version is empty: give the Azure OpenAI API version, e.g. 2024-10-21")
        # With Entra ID there is no key to read; OpenAIClient reads none when api_key_env is None.
        super().__init__(model=model, api_key_env=None if use_entra_id else api_key_env, **kwargs)

    def _azure_args(self) -> dict[str, Any]:
        args = {k: v for k, v in self._sdk_args.items() if k != "api_key"}
        args.update(azure_endpoint=self.azure_endpoint, azure_deployment=self.deployment, api_version=self.api_version)
        if self.use_entra_id:
            args["azure_ad_token_provider"] = self._token_provider
        else:
            args["api_key"] = self._sdk_args["api_key"]
        return args

    def _make_sync(self) -> openai.OpenAI:
        if self.base_url:  # an OpenAI-compatible endpoint: the plain SDK, the key as its bearer token
            return super()._make_sync()
        return openai.AzureOpenAI(http_client=sdk_http_client(), **self._azure_args())

    def _make_async(self) -> openai.AsyncOpenAI:
        if self.base_url:
            return super()._make_async()
        return openai.AsyncAzureOpenAI(http_client=sdk_http_client(aio=True), **self._azure_args())

    @property
    def request_model(self) -> str:
        return self.deployment if self.base_url else self.model

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "endpoint": self.base_url or self.azure_endpoint,
            "deployment": self.deployment,
            "api_version": None if self.base_url else self.api_version,
            "stream": self.stream,
        }


def _entra_token_provider() -> Any:
    try:
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider
    except ImportError as error:
        raise ConfigError("llm.use_entra_id=true needs azure-identity: pip install 'pikeclient[azure]'") from error
    return get_bearer_token_provider(DefaultAzureCredential(), ENTRA_SCOPE)
