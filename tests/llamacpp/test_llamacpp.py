"""pikeclient against a real llama.cpp server: calls, streams, a sweep, token counts, server quirks."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ContextWindowError, InterruptedStreamError
from tests.conftest import mlflow_runs, run_py
from tests.llamacpp.conftest import ALIAS, start_llama_server, stop

# A prompt whose greedy answer llama.cpp (Q4_1 arithmetic) and transformers (dequantized, float32) agree on;
# many others differ from the first token on: the two runtimes round differently near ties.
CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]
NO_RETRY_WAIT = {"initial_delay": 0.01, "max_delay": 0.05}


def client(server, **kwargs) -> OpenAIClient:
    kwargs.setdefault("sampling", {"max_tokens": 32})
    kwargs.setdefault("flavour", "llamacpp")
    return OpenAIClient(model=ALIAS, base_url=server.url, api_key_env=None, retry=NO_RETRY_WAIT, **kwargs)


def test_plain_call_answers_for_real(llamacpp):
    result = client(llamacpp).chat(CAPITAL)
    assert "Berlin" in result.text
    assert result.finish_reason == "stop" and result.attempts == 1
    assert result.usage.source == "server" and result.usage.completion_tokens > 0
    assert result.model == ALIAS  # --model_alias: not the file path


def test_streamed_call_gives_the_same_answer_and_a_first_token_time(llamacpp):
    plain = client(llamacpp).chat(CAPITAL)
    streamed = client(llamacpp, stream=True).chat(CAPITAL)
    assert streamed.text == plain.text and streamed.finish_reason == "stop"
    assert 0 < streamed.ttft_s < streamed.latency_s


def test_concurrent_streams_are_all_answered(llamacpp):
    async def main():
        c = client(llamacpp, stream=True, sampling={"max_tokens": 12})
        try:
            prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(4)]
            return await asyncio.gather(*(c.achat(p) for p in prompts))
        finally:
            await c.aclose()

    results = asyncio.run(main())
    assert all(r.text and r.attempts == 1 for r in results)


def test_local_model_counts_completion_tokens_as_the_server_does(llamacpp, smollm2):
    """Same greedy answer, same counts: the end-of-sequence token is not a completion token."""
    from pikeclient.backends.hf_meta_llama import HFLocalClient

    served = client(llamacpp).chat(CAPITAL)
    local = HFLocalClient(model=smollm2, sampling={"max_tokens": 32})
    try:
        ours = local.chat(CAPITAL)
    finally:
        local.close()
    assert served.finish_reason == ours.finish_reason == "stop"
    assert ours.text.strip() == served.text.strip()
    assert ours.usage.completion_tokens == served.usage.completion_tokens
    assert ours.usage.prompt_tokens == served.usage.prompt_tokens


def test_repetition_penalty_reaches_llamacpp_under_its_own_name(llamacpp):
    prompt = [{"role": "user", "content": "Repeat the word 'cat' twenty times."}]
    plain = client(llamacpp, sampling={"max_tokens": 24}).chat(prompt).text
    penalised = client(llamacpp, sampling={"max_tokens": 24, "repetition_penalty": 1.8}).chat(prompt).text
    assert penalised != plain  # llama.cpp read repeat_penalty
    # Sent under vLLM's name, llama.cpp ignores it (and applies its own 1.1): the reason for flavours.
    unmapped = client(llamacpp, flavour="openai", sampling={"max_tokens": 24}).chat(prompt).text
    ignored = client(llamacpp, flavour="openai", sampling={"max_tokens": 24, "repetition_penalty": 1.8})
    assert ignored.chat(prompt).text == unmapped != plain
    # llm.extra_body passes a parameter pikeclient does not set as it is (repeat_penalty it refuses:
    # sampling.repetition_penalty sets it).
    extra = client(llamacpp, flavour="openai", sampling={"max_tokens": 24}, extra_body={"grammar": 'root ::= "meow"'})
    assert extra.chat(prompt).text == "meow"


def test_max_tokens_is_sent_under_the_name_llamacpp_reads(llamacpp):
    c = client(llamacpp, max_tokens_field="max_completion_tokens", sampling={"max_tokens": 4})
    result = c.chat([{"role": "user", "content": "Write a long story about a dragon."}])
    assert result.finish_reason == "length" and result.usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_a_context_window_error_not_retried(llamacpp, stream):
    too_long = [{"role": "user", "content": "word " * 2500}]  # the server runs with --n_ctx 2048
    with pytest.raises(ContextWindowError) as caught:
        client(llamacpp, stream=stream).chat(too_long)
    assert caught.value.attempts == 1


def test_interrupted_streams_are_named_and_not_retried(smollm2_gguf, tmp_path):
    """llama.cpp's default (interrupt_requests on) cuts a running stream when another request waits."""
    server = start_llama_server(smollm2_gguf, tmp_path / "server.log")
    try:
        async def main():
            c = client(server, stream=True, sampling={"max_tokens": 48})
            try:
                prompts = [[{"role": "user", "content": f"Tell a story about the number {i}."}] for i in range(4)]
                return await asyncio.gather(*(c.achat(p) for p in prompts), return_exceptions=True)
            finally:
                await c.aclose()

        outcomes = asyncio.run(main())
    finally:
        stop(server)
    cut = [o for o in outcomes if isinstance(o, InterruptedStreamError)]
    assert cut, outcomes
    assert all("--interrupt_requests False" in str(e) and e.attempts == 1 for e in cut)


NEEDS_TOKENIZER = pytest.mark.skipif(
    "tokenizer" not in inspect.signature(OpenAIClient.__init__).parameters,
    reason="needs llm.tokenizer on the openai backend (the lead's branch adds it)",
)


@NEEDS_TOKENIZER
def test_stream_without_usage_is_counted_exactly_with_the_model_tokenizer(llamacpp, smollm2):
    served = client(llamacpp).chat(CAPITAL)
    c = client(llamacpp, stream=True, tokenizer=smollm2)
    original = c._request

    def without_usage(messages, params):  # a server that sends no usage in its stream
        request = original(messages, params)
        request.pop("stream_options", None)
        return request

    c._request = without_usage
    streamed = c.chat(CAPITAL)
    assert streamed.text == served.text
    assert streamed.usage.completion_tokens == served.usage.completion_tokens
    assert streamed.usage.prompt_tokens == served.usage.prompt_tokens


def test_sweep_through_run_py(llamacpp, tmp_path):
    done = run_py("-m", "llm=openai", f"llm.base_url={llamacpp.url}", f"llm.model={ALIAS}", "llm.api_key_env=null",
                  "llm.flavour=llamacpp", "llm.stream=false,true", "dataset.limit=3", "sampling.max_tokens=16",
                  "experiment.concurrency=2", cwd=tmp_path, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [r for r in mlflow_runs(tmp_path / "runs") if "pikeclient.job_num" in r["tags"]]
    assert len(runs) == 2 and all(r["status"] == "FINISHED" for r in runs)
    assert all(r["metrics"]["calls/total"] == 3 and r["metrics"]["Errors/count"] == 0 for r in runs)
    records = [json.loads(line) for line in
               sorted((tmp_path / "runs" / "multirun").rglob("records.jsonl"))[0].read_text().splitlines()]
    assert len(records) == 3 and all(r["response"] for r in records)
