"""Azure OpenAI backend: deployment route, api-version and the api-key header."""

import importlib.util

import pytest

from pikeclient.backends.azure_openai import AzureOpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.testing.server import FaultPlan


def azure(server, **kwargs) -> AzureOpenAIClient:
    return AzureOpenAIClient(azure_endpoint=server.url, deployment="my-gpt4o", api_version="2024-10-21",
                             model="gpt-4o", retry={"initial_delay": 0.001}, **kwargs)


def test_deployment_route_with_api_version_and_key_header(server, api_env):
    result = azure(server).chat([{"role": "user", "content": "hello azure"}])
    assert result.text == "You said: hello azure"
    request = server.log[0]
    assert request.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert request.headers["api-key"] == server.api_key


def test_azure_retry_after_ms_is_honoured(server, api_env):
    server.faults = FaultPlan(script=["429"], retry_after=0.2, retry_after_header="x-ms-retry-after-ms")
    result = azure(server).chat([{"role": "user", "content": "hi"}])
    assert result.attempts == 2 and server.log[1].time - server.log[0].time >= 0.2


def test_streaming(server, api_env):
    result = azure(server, stream=True).chat([{"role": "user", "content": "a b"}])
    assert result.text == "You said: a b" and result.ttft_s is not None and result.send_delay_s is not None


def test_missing_key(server, monkeypatch):
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        azure(server)


@pytest.mark.skipif(importlib.util.find_spec("azure") is not None, reason="azure-identity is installed")
def test_entra_id_without_azure_identity_is_a_clear_error(server):
    with pytest.raises(ConfigError, match="azure-identity"):
        azure(server, use_entra_id=True)
