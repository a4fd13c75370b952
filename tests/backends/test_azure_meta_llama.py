"""Llama hosted on Azure: the model-inference chat format and the Azure ML scoring format."""

import asyncio

import pytest

from pikeclient.backends.azure_meta_llama import AzureMetaLlamaClient
from pikeclient.core.errors import AuthError, ConfigError, RateLimitError
from pikeclient.core.tokens import HFTokenizerCounter
from pikeclient.testing.server import FaultPlan

FAST = {"initial_delay": 0.001}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three"}]


@pytest.fixture
def llama_env(monkeypatch):
    from tests.conftest import API_KEY

    monkeypatch.setenv("AZURE_LLAMA_API_KEY", API_KEY)


def serverless(server, **kwargs):
    return AzureMetaLlamaClient(endpoint=server.url, **{"retry": FAST, **kwargs})


def aml(server, **kwargs):
    return AzureMetaLlamaClient(endpoint=f"{server.url}/score", api="aml_score", deployment="llama-blue",
                                retry=FAST, **kwargs)


@pytest.mark.parametrize("route", ["chat/completions", "models/chat/completions"])
@pytest.mark.parametrize("auth", ["api-key", "bearer"])
def test_serverless_chat_completions(server, llama_env, route, auth):
    result = serverless(server, route=route, auth=auth).chat(MESSAGES)
    assert result.text == "You said: one two three"
    assert result.usage.source == "server" and result.usage.prompt_tokens == 5
    request = server.log[0]
    assert request.path == f"/{route}"
    assert ("api-key" in request.headers) == (auth == "api-key")


def test_aml_score_format_and_headers(server, llama_env):
    result = aml(server).chat(MESSAGES, max_tokens=3)
    assert result.text == "You said: one"
    request = server.log[0]
    assert request.route == "aml_score"
    assert request.headers["authorization"].startswith("Bearer ")
    assert request.headers["azureml-model-deployment"] == "llama-blue"


def test_aml_without_tokenizer_says_tokens_were_not_counted(server, llama_env):
    usage = aml(server).chat(MESSAGES).usage
    assert usage.source == "none" and usage.total_tokens is None


def test_aml_with_llama_tokenizer_counts_locally(server, llama_env, tiny_model):
    client = aml(server, tokenizer=tiny_model)
    result = client.chat(MESSAGES)
    counter = HFTokenizerCounter(tiny_model)
    assert result.usage.source == "tokenizer"
    assert result.usage.prompt_tokens == counter.count_messages(MESSAGES)
    assert result.usage.completion_tokens == counter.count(result.text)


def test_exact_prompt_count_matches_transformers(tiny_model):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert HFTokenizerCounter(tiny_model).count_messages(MESSAGES) == len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("make", [serverless, aml])
def test_429_and_5xx_are_retried(server, llama_env, make):
    server.faults = FaultPlan(script=["429", "503", "drop"], retry_after=0.1)
    result = make(server).chat(MESSAGES)
    assert result.attempts == 4 and server.log[1].time - server.log[0].time >= 0.1


def test_rate_limit_gives_up_with_class(server, llama_env):
    server.faults = FaultPlan(rates={"429": 1.0}, retry_after=0.01)
    with pytest.raises(RateLimitError) as caught:
        serverless(server, retry={"max_attempts": 2, "initial_delay": 0.001}).chat(MESSAGES)
    assert caught.value.attempts == 2 and caught.value.status == 429


def test_bad_key_not_retried(server, monkeypatch):
    monkeypatch.setenv("AZURE_LLAMA_API_KEY", "wrong")
    with pytest.raises(AuthError):
        aml(server).chat(MESSAGES)
    assert len(server.log) == 1


def test_async(server, llama_env):
    async def main():
        client = aml(server)
        try:
            return await asyncio.gather(*(client.achat([{"role": "user", "content": str(i)}]) for i in range(4)))
        finally:
            await client.aclose()

    assert [r.text for r in asyncio.run(main())] == [f"You said: {i}" for i in range(4)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"api": "grpc"}, "llm.api='grpc'"), ({"auth": "basic"}, "llm.auth"), ({"route": "v2/chat"}, "llm.route"),
     ({"tokenizer": "/nonexistent"}, "no tokenizer.json")],
)
def test_bad_config(server, llama_env, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        serverless(server, **kwargs)


def test_missing_key(server, monkeypatch):
    monkeypatch.delenv("AZURE_LLAMA_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="AZURE_LLAMA_API_KEY"):
        serverless(server)


def test_the_client_time_before_the_send_is_reported_apart(server, llama_env):
    server.latency = 0.02
    result = serverless(server).chat(MESSAGES)
    assert result.send_delay_s is not None and result.send_delay_s >= 0 and result.latency_s >= 0.02
    result = asyncio.run(aml(server).achat(MESSAGES))
    assert result.send_delay_s is not None and result.send_delay_s >= 0 and result.latency_s >= 0.02
