"""From PIKE-RAG's llm_client block to pikeclient's settings; needs no PIKE-RAG checkout."""

from __future__ import annotations

import logging

import pytest

from pikeclient.core.errors import ConfigError
from pikeclient.integrations.pikerag_config import default_output_dir, pikerag_config, sampling_from_llm_config


@pytest.mark.parametrize("llm_config, sampling", [
    ({"model": "gpt-4", "temperature": 0}, {"temperature": 0}),
    ({"max_new_tokens": 64, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1},
     {"max_tokens": 64, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}),
    ({"max_completion_tokens": 32, "max_tokens": 32, "stop": ["\n\n", "END"]},
     {"max_tokens": 32, "stop": ("\n\n", "END")}),
    ({"do_sample": False, "temperature": 0.7}, {"temperature": 0.0}),  # transformers: greedy, temperature unused
    ({"do_sample": True}, {"temperature": 1.0}),  # transformers' default temperature
    ({"do_sample": True, "temperature": 0.3, "min_new_tokens": 5, "seed": 1, "n": 1},
     {"temperature": 0.3, "min_tokens": 5, "seed": 1}),
])
def test_llm_config_to_sampling(llm_config, sampling):
    assert sampling_from_llm_config(llm_config) == sampling


@pytest.mark.parametrize("llm_config, message", [
    ({"presence_penalty": 0.2}, "llm_config.presence_penalty: not a sampling setting pikeclient sends"),
    ({"max_tokens": 10, "max_new_tokens": 20}, "contradicts another name for max_tokens"),
    ({"n": 2}, "llm_config.n=2: PIKE-RAG reads one answer a call"),
])
def test_llm_config_that_pikeclient_would_not_send_fails(llm_config, message):
    with pytest.raises(ConfigError, match=message):
        sampling_from_llm_config(llm_config)


def test_a_named_config_takes_pikerags_model_unless_an_override_names_one():
    assert pikerag_config("openai", llm_config={"model": "gpt-4o"}).llm.model == "gpt-4o"
    cfg = pikerag_config("openai", ["llm.model=qwen2.5:7b"], {"model": "gpt-4o"})
    assert cfg.llm.model == "qwen2.5:7b"
    assert "model" not in pikerag_config("smollm2", llm_config={"model": "gpt-4"}).llm  # the model is the file


def test_a_target_block_with_the_groups_run_py_composes():
    block = {"_target_": "pikeclient.backends.openai.OpenAIClient", "model": "m", "base_url": "http://h:1/v1"}
    cfg = pikerag_config(block, ["retry=patient", "sampling.max_tokens=99"], max_attempt=3)
    assert (cfg.llm.model, cfg.retry.max_attempts, cfg.retry.initial_delay, cfg.sampling.max_tokens) == ("m", 3, 2.0,
                                                                                                           99)
    assert cfg.tracking.enabled is False  # tracking is opt-in
    with pytest.raises(ConfigError, match="give the backend's settings inside the block"):
        pikerag_config(block, ["llm.base_url=http://other/v1"])


def test_tracking_is_opt_in_and_takes_the_tracking_groups_keys():
    assert pikerag_config("openai").tracking.enabled is False
    assert pikerag_config("openai", tracking=True).tracking.enabled is True
    cfg = pikerag_config("openai", tracking={"experiment_name": "rag", "traces": False})
    assert (cfg.tracking.enabled, cfg.tracking.experiment_name, cfg.tracking.traces) == (True, "rag", False)
    with pytest.raises(ConfigError, match="args.tracking='yes'"):
        pikerag_config("openai", tracking="yes")
    with pytest.raises(ConfigError, match="both given"):
        pikerag_config("openai", ["retry.max_attempts=2"], max_attempt=3)


def test_records_go_beside_pikerags_log_in_a_folder_of_their_own(tmp_path):
    (tmp_path / "logs").mkdir()
    logger = logging.getLogger("pikerag-test-client")  # as PIKE-RAG's client Logger: a file in the log dir
    handler = logging.FileHandler(tmp_path / "logs" / "client.log", delay=True)
    logger.addHandler(handler)
    try:
        first, second = default_output_dir(logger, "runs"), default_output_dir(logger, "runs")
    finally:
        logger.removeHandler(handler)
    assert first.parent == second.parent == tmp_path / "logs" / "pikeclient" and first != second
    assert first.is_dir() and second.is_dir()
    assert default_output_dir(None, str(tmp_path / "runs")).parent == tmp_path / "runs" / "pikerag"
