"""The run over time in MLflow, the server's Prometheus metrics beside it, and request ids in the records."""

import json
import sqlite3

import pytest

from pikeclient.core.errors import ConfigError
from pikeclient.testing.server import FakeLLMServer, free_port
from pikeclient.tracking.server_metrics import ServerScraper, detect, parse
from tests.conftest import API_KEY, mlflow_runs, run_py

ENV = {"OPENAI_API_KEY": API_KEY}
LOAD = ("load=constant", "load.rate=20", "experiment.repeats=100000", "experiment.max_duration=3",
        "tracking.traces=false")


def history(runs_dir, run_id, key):
    db = sqlite3.connect(runs_dir / "mlflow.db")
    rows = dict(db.execute("select step, value from metrics where run_uuid=? and key=?", (run_id, key)))
    db.close()
    return rows


def test_the_flavours_are_told_apart_by_their_names():
    page = ('# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{tp_rank="0"} 3\n'
            'sglang:num_running_reqs{tp_rank="1"} 2\n# TYPE sglang:prompt_tokens_total counter\n'
            'sglang:prompt_tokens_total 120\n')
    values = parse(page)
    assert values["sglang:num_running_reqs"] == 5 and detect(values) == "sglang"
    assert detect(parse("vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_running 1\n")) == "vllm"
    with pytest.raises(ConfigError, match="server_metrics.flavour='triton'"):
        ServerScraper("http://127.0.0.1:1/metrics", flavour="triton")


def test_counters_become_rates_and_a_token_mismatch_is_one_warning(caplog):
    scraper = ServerScraper("http://127.0.0.1:1/metrics")
    scraper.scrapes = [(0.0, {"requests_running": 1, "prompt_tokens": 100, "generation_tokens": 10}),
                       (1.0, {"requests_running": 3, "prompt_tokens": 160, "generation_tokens": 40}),
                       (2.0, {"requests_running": 2, "prompt_tokens": 200, "generation_tokens": 70})]
    series = scraper.series()
    assert series["server/requests_running"] == {0: 1, 1: 3, 2: 2}
    assert series["server/prompt_tokens_per_s"] == {1: 60.0, 2: 40.0}
    assert scraper.totals() == {"server/prompt_tokens_total": 100, "server/generation_tokens_total": 60}
    scraper.compare({"tokens/prompt_total": 100, "tokens/completion_total": 60})
    assert not caplog.records
    scraper.compare({"tokens/prompt_total": 80, "tokens/completion_total": 30})
    [warning] = caplog.records
    assert "prompt_tokens 100 by the server, 80 by pikeclient; generation_tokens 60" in warning.getMessage()


def test_timeline_and_server_series_share_the_time_axis(tmp_path):
    with FakeLLMServer(api_key=API_KEY, latency=0.05, capacity=2) as server:  # 40/s at most, asked for 20/s
        proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", f"server_metrics.url={server.url}/metrics",
                      *LOAD, cwd=tmp_path, env=ENV)
        received = [r.headers.get("x-request-id") for r in server.log]
    assert proc.returncode == 0, proc.stderr
    assert "counted other tokens" not in proc.stderr and "cannot be read" not in proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    runs_dir = tmp_path / "runs"
    sent = history(runs_dir, run["id"], "timeline/sent")
    assert sorted(sent) == list(range(len(sent))) and 3 <= len(sent) <= 5  # step = seconds since the start
    assert sum(sent.values()) == run["metrics"]["calls/total"]
    assert history(runs_dir, run["id"], "timeline/achieved_rate")[1] == pytest.approx(20, abs=5)
    assert set(history(runs_dir, run["id"], "timeline/latency_p50")) <= set(sent)
    running = history(runs_dir, run["id"], "server/requests_running")
    assert len(running) >= 3 and set(running) <= set(range(len(sent) + 1))
    assert max(running.values()) <= 2  # the server serves 2 at once
    assert history(runs_dir, run["id"], "server/prompt_tokens_per_s")
    m = run["metrics"]
    assert m["server/prompt_tokens_total"] == m["tokens/prompt_total"]
    assert m["server/generation_tokens_total"] == m["tokens/completion_total"]
    [records] = (runs_dir / "outputs").rglob("records.jsonl")
    ids = [json.loads(line)["request_id"] for line in records.read_text().splitlines()]
    assert len(set(ids)) == len(ids) and sorted(ids) == sorted(received)  # each call findable in the server's log


def test_an_unreachable_metrics_url_is_one_warning(tmp_path):
    with FakeLLMServer(api_key=API_KEY, latency=0.01) as server:
        proc = run_py("llm=openai", f"llm.base_url={server.url}/v1",
                      f"server_metrics.url=http://127.0.0.1:{free_port()}/metrics", *LOAD, "tracking=none",
                      cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "server_metrics.url" in line]
    assert len(warnings) == 1 and "cannot be read" in warnings[0] and "the run goes on" in warnings[0]
