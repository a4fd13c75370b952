"""Whole runs (run.py as a subprocess, a sqlite MLflow store) against a loopback server that misbehaves:
an answer that never ends, usage that is not a count, HTTP 200 that is no answer; and llm.extra_body as
README writes it."""

import json

import pytest

from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, mlflow_runs, run_py

ENV = {"OPENAI_API_KEY": API_KEY}


def openai_args(server, *extra):
    return ("llm=openai", f"llm.base_url={server.url}/v1", "retry.initial_delay=0.01", "dataset.limit=4",
            "experiment.concurrency=1", *extra)


def records_of(tmp_path):
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(180)  # before llm.total_timeout, the endless answer held the run until killed
def test_an_endless_stream_ends_its_call_as_a_timeout_and_the_run_goes_on(tmp_path, server):
    server.faults = FaultPlan(script=["endless"])
    proc = run_py(*openai_args(server, "llm.stream=true", "llm.timeout=5", "llm.total_timeout=1",
                               "retry.max_attempts=1"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    records = records_of(tmp_path)
    [failed] = [r for r in records if r["error"] is not None]
    assert failed["error_kind"] == "timeout" and "within llm.total_timeout=1 s" in failed["error"]
    assert sum(r["error"] is None for r in records) == 3
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["metrics"]["Errors/timeout"] == 1


@pytest.mark.parametrize("usage", [{"prompt_tokens": -150, "completion_tokens": -21, "total_tokens": -171},
                                   {"prompt_tokens": 10**15, "completion_tokens": 10**15},
                                   {"prompt_tokens": "many", "completion_tokens": "few"}],
                         ids=["negative", "absurd", "strings"])
def test_server_usage_that_is_not_a_count_is_recorded_and_never_summed(usage, tmp_path):
    with FakeLLMServer(api_key=API_KEY, usage=usage) as server:
        price = f"pricing.endpoints=[{{url:'{server.url}/v1',input:1.0,output:2.0}}]"
        proc = run_py(*openai_args(server, price), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "never summed" in proc.stderr
    records = records_of(tmp_path)
    assert all(r["response"].startswith("You said:") for r in records)  # the answers are kept
    assert all("usage is not" in r["usage"]["server_error"] and r["usage"]["source"] == "tokenizer" for r in records)
    [run] = mlflow_runs(tmp_path / "runs")
    metrics = run["metrics"]
    assert run["status"] == "FINISHED" and metrics["tokens/source_tokenizer"] == 4
    assert metrics["tokens/server_usage_errors"] == 4 and "4 server counts refused" in proc.stdout
    assert metrics["tokens/prompt_total"] == sum(r["usage"]["prompt_tokens"] for r in records) > 0
    assert 0 < metrics["Cost/usd"] < 0.01 and metrics["Throughput/output_tokens_per_s"] > 0
    assert run["tags"]["pikeclient.token_basis"] == "tokenizer"


def test_a_200_that_is_no_answer_is_a_protocol_error_of_the_endpoint(tmp_path):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={"html": 1.0})) as server:
        proc = run_py(*openai_args(server), cwd=tmp_path, env=ENV)
        requests = len(server.log)
    assert proc.returncode == 1 and "every call failed (protocol=4)" in proc.stderr, proc.stderr
    assert requests == 8  # each call retried once, not three times
    assert all(r["error_kind"] == "protocol" and r["attempts"] == 2 for r in records_of(tmp_path))
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED" and run["metrics"]["Errors/protocol"] == 4


def test_readmes_extra_body_example_runs_as_written(tmp_path, server):
    proc = run_py(*openai_args(server, "llm.extra_body={min_p: 0.1}"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert [r.body["min_p"] for r in server.log] == [0.1] * 4
    assert all(r.body["model"] == "gpt-4o-mini" for r in server.log)


def test_a_cache_file_that_cannot_be_opened_is_a_config_error_naming_it(tmp_path):
    from pikeclient.core.errors import ConfigError
    from pikeclient.run.cache import ResponseCache

    (tmp_path / "notes.db").write_bytes(b"\x00" * 4096)  # no sqlite database (the config check says so first)
    with pytest.raises(ConfigError, match=r"cache.path='.*notes.db': cannot use it as the response cache"):
        ResponseCache(tmp_path / "notes.db", "use")
