"""Using pikeclient from Python: compose the shipped configs from any folder; the documented snippet runs (docs/backends.md)."""

import os
import re
import subprocess
import sys

import pytest

from pikeclient import compose, create_client
from pikeclient.core.errors import ConfigError
from tests.conftest import API_KEY, REPO


def test_compose_works_from_any_folder(tmp_path, monkeypatch, server, api_env):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["llm=openai", f"llm.base_url={server.url}/v1", "sampling.max_tokens=3"])
    assert cfg.llm.model == "gpt-4o-mini" and cfg.paths.runs_dir == "runs" and "hydra" not in cfg
    assert create_client(cfg).generate("a b c d") == "You said: a"


def test_default_config_is_smollm2():
    assert compose().llm._target_ == "pikeclient.backends.smollm2.smollm2_client"


def test_compose_with_a_bad_override_is_one_config_error():
    with pytest.raises(ConfigError, match="llm=nope"):
        compose(["llm=nope"])
    with pytest.raises(ConfigError, match="sampling.tempratur"):
        compose(["sampling.tempratur=1"])


def test_readme_python_snippet_runs_offline_against_the_loopback_server(tmp_path, server):
    readme = (REPO / "docs" / "backends.md").read_text()
    section = readme[readme.index("## From Python"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in snippet  # the port README starts the server on
    snippet = snippet.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1")
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "You said: Say hi" in done.stdout


@pytest.mark.parametrize("override", ["llm.extra_body={min_p: 0.1}", "++llm.extra_body.min_p=0.1",
                                      "+llm.extra_body.min_p=0.1"])
@pytest.mark.parametrize("llm", ["openai", "azure_openai"])
def test_extra_body_is_set_as_readme_writes_it(llm, override):
    # `llm.extra_body={...}` failed with "Key 'min_p' is not in struct" while the default was {}.
    assert compose([f"llm={llm}", override]).llm.extra_body == {"min_p": 0.1}


def test_prices_and_deployments_are_added_from_the_command_line():
    cfg = compose(["pricing.deployments={prod-chat: gpt-4o}", "+pricing.models.mine={input: 0.1, output: 0.4}"])
    assert cfg.pricing.deployments == {"prod-chat": "gpt-4o"}
    assert cfg.pricing.models.mine == {"input": 0.1, "output": 0.4}
