"""Config composition: every llm group instantiates; sampling and retry reach the client."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pikeclient import create_client
from pikeclient.config.schema import register_configs
from pikeclient.core.errors import ConfigError

CONF = str(Path(__file__).resolve().parents[2] / "pikeclient" / "conf")
LLM_GROUPS = sorted(p.stem for p in Path(CONF, "llm").glob("*.yaml"))


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.runs_dir = "/tmp/pikeclient-test-runs"
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("group", LLM_GROUPS)
def test_every_llm_group_instantiates(group, api_env, tiny_model, server, request):
    overrides = [f"llm={group}"]
    if group == "hf_meta_llama":
        overrides.append(f"llm.model={tiny_model}")
    if group == "smoke_llama":
        overrides.append(f"llm.path={tiny_model}")
    if group == "smollm2":
        overrides.append(f"llm.models_dir={Path(request.getfixturevalue('smollm2')).parent}")
    if group in ("openai",):
        overrides.append(f"llm.base_url={server.url}/v1")
    if group == "azure_openai":
        overrides.append(f"llm.azure_endpoint={server.url}")
    if group == "azure_meta_llama":
        overrides += [f"llm.endpoint={server.url}", f"llm.tokenizer={tiny_model}"]
    client = create_client(compose_cfg(*overrides, "sampling.max_tokens=5"))
    result = client.chat([{"role": "user", "content": "hello"}])
    assert result.usage.source in ("server", "tokenizer") and result.usage.completion_tokens <= 5
    client.close()


def test_sampling_and_retry_reach_the_client(api_env):
    client = create_client(compose_cfg("llm=openai", "sampling=creative", "retry=patient"))
    assert client.sampling.temperature == 0.7 and client.retry.max_attempts == 8


def test_out_of_range_names_the_key(api_env):
    with pytest.raises(ConfigError, match=r"sampling.temperature=2.5 is out of range: allowed \[0, 2\]"):
        create_client(compose_cfg("llm=openai", "sampling.temperature=2.5"))
    with pytest.raises(ConfigError, match="retry.max_attempts=0"):
        create_client(compose_cfg("llm=openai", "retry.max_attempts=0"))


@pytest.mark.parametrize("share", ["0", "-0.5", "1.5"])
def test_a_live_cpu_share_out_of_range_names_the_key(share):
    from pikeclient.config.schema import validate

    with pytest.raises(ConfigError, match=rf"tracking.live_cpu={float(share)} is out of range: allowed > 0 and <= 1"):
        validate(compose_cfg(f"tracking.live_cpu={share}"))


def test_negative_reconnect_timeout_names_the_key():
    from pikeclient.config.schema import validate

    with pytest.raises(ConfigError, match=r"tracking.reconnect_timeout=-1.0 is out of range: allowed >= 0"):
        validate(compose_cfg("tracking.reconnect_timeout=-1"))
