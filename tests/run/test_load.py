"""Load strategies, limits, open-loop honesty, SLOs and goodput, repeats and confidence intervals."""

import asyncio
import itertools
import json
import re
import statistics
import time

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem
from pikeclient.run.load import Concurrency, Constant, MaxDuration, MaxRequests, Poisson, build_limits, build_strategy
from pikeclient.run.runner import run_prompts
from pikeclient.run.stats import RunStats, Slo, bootstrap_ci, percentile
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, mlflow_runs, run_py


def prompts(n):
    return [PromptItem(f"p{i}", ({"role": "user", "content": f"question {i}"},)) for i in range(n)]


def run(client, items, load, **kwargs):
    records = []
    stats = asyncio.run(run_prompts(client, items, load, on_record=lambda r, _: records.append(r), **kwargs))
    return stats, records


def test_constant_and_poisson_schedules():
    assert list(itertools.islice(Constant(rate=4).offsets(), 4)) == [0, 0.25, 0.5, 0.75]
    gaps = [b - a for a, b in itertools.pairwise(itertools.islice(Poisson(rate=10, seed=3).offsets(), 5001))]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.05)  # exponential gaps, mean 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.1)  # an exponential's std equals its mean
    again = list(itertools.islice(Poisson(rate=10, seed=3).offsets(), 10))
    assert again == list(itertools.islice(Poisson(rate=10, seed=3).offsets(), 10))  # seeded


@pytest.mark.parametrize(("kind", "kwargs", "message"), [
    ("bursty", {}, "load.kind='bursty'"),
    ("constant", {}, "load.rate=None is out of range"),
    ("poisson", {"rate": 0}, "load.rate=0 is out of range"),
    ("concurrency", {"concurrency": 0}, "load.concurrency=0 is out of range"),
    ("constant", {"rate": 5, "max_in_flight": 0}, "load.max_in_flight=0 is out of range"),
    ("constant", {"rate": float("inf")}, "load.rate=inf is out of range: load=constant needs a finite rate"),
    ("synchronous", {"concurrency": 4}, "load.concurrency=4 is not used by load=synchronous; it applies to "
                                        "load=concurrency"),
    ("concurrency", {"rate": 5.0}, "load.rate=5.0 is not used by load=concurrency; it applies to load=constant, "
                                   "poisson"),
    ("constant", {"rate": 5, "seed": 1}, "load.seed=1 is not used by load=constant; it applies to load=poisson"),
])
def test_bad_strategies(kind, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_strategy(kind, **kwargs)


def test_limits():
    assert build_limits(None, None) == []
    assert build_limits(5, 2.5) == [MaxRequests(5), MaxDuration(2.5)]
    with pytest.raises(ConfigError, match="experiment.max_requests=0"):
        build_limits(0, None)
    with pytest.raises(ConfigError, match="experiment.max_duration=0"):
        build_limits(None, 0)


def test_open_loop_sends_on_schedule_whether_or_not_calls_returned(api_env):
    with FakeLLMServer(api_key=API_KEY, latency=0.3) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        stats, records = run(client, prompts(20), Constant(rate=40))
        sends = sorted(r.time for r in server.log)
    # At 40/s with 0.3 s answers, about 12 requests are in flight at once: none waited for another.
    assert len(records) == 20 and all(r["error"] is None for r in records)
    assert sends[-1] - sends[0] < 0.3 * 20 / 2  # a closed loop of one would need 6 s
    assert all(r["dispatch_delay_s"] >= 0 for r in records)
    m = stats.metrics()
    assert m["Throughput/achieved_rate"] > 10 and "client/dispatch_delay_p99" in m and "client/loop_lag_p50" in m


def test_a_capped_open_loop_records_how_late_requests_went(api_env, caplog):
    with FakeLLMServer(api_key=API_KEY, latency=0.2) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        stats, records = run(client, prompts(10), Constant(rate=100, max_in_flight=2))
        stats.requested_rate, stats.max_in_flight = 100, 2
        stats.warn_about_the_client()
    delays = sorted(r["dispatch_delay_s"] for r in records)
    assert delays[-1] >= 0.2 * 3  # the 9th and 10th waited for earlier calls to return
    m = stats.metrics()
    assert m["Throughput/achieved_rate"] < 50
    # The server held them back (the in-flight cap filled because calls were slow), not the client:
    assert "the server held the schedule back" in caplog.text and "max_in_flight=2" in caplog.text
    assert "the client limited" not in caplog.text and stats.tags()["pikeclient.client_limited"] == "false"
    # What a user arriving on schedule waited: from when the request was due to its answer.
    for r in records:
        assert r["latency_from_schedule_s"] >= r["dispatch_delay_s"] + r["latency_s"]
        assert r["slot_wait_s"] <= r["dispatch_delay_s"]
    assert m["Latency/from_schedule_p99"] > 3 * m["Latency/p99"]


def test_an_open_loop_behind_because_of_the_client_says_so(api_env, caplog):
    async def busy_loop(stop: asyncio.Event) -> None:  # work of the client's own: the loop cannot send in time
        while not stop.is_set():
            time.sleep(0.03)
            await asyncio.sleep(0)

    async def both(client):
        stop = asyncio.Event()
        hog = asyncio.create_task(busy_loop(stop))
        try:
            return await run_prompts(client, prompts(40), Constant(rate=200))
        finally:
            stop.set()
            await hog

    with FakeLLMServer(api_key=API_KEY) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        stats = asyncio.run(both(client))
    stats.requested_rate, stats.max_in_flight = 200, 1024
    stats.warn_about_the_client()
    assert "the client limited this run" in caplog.text and "its event loop lagged" in caplog.text
    assert stats.tags()["pikeclient.client_limited"] == "true" and stats.client_limits


def test_closed_loop_limits_stop_the_sending(api_env):
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        stats, records = run(client, prompts(50), Concurrency(2), limits=[MaxRequests(5)])
        assert len(records) == 5 and len(server.log) == 5
        stats, records = run(client, prompts(500), Concurrency(2), limits=[MaxDuration(0.3)])
    # Sending stopped (a loaded machine may start only one worker's call within 0.3 s); the calls in
    # flight at the limit still finished and were recorded.
    assert 1 <= len(records) < 500 and all(r["error"] is None for r in records)


def test_slo_attainment_and_goodput_arithmetic():
    slo = Slo(ttft_s=0.1, latency_s=1.0)
    stats = RunStats(slo=slo)
    base = {"attempts": 1, "error": None, "error_kind": None, "response": "x", "start_time": 0.0, "end_time": 1.0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "source": "server"}}
    calls = [{"ttft_s": 0.05, "latency_s": 0.5}, {"ttft_s": 0.2, "latency_s": 0.5}, {"ttft_s": 0.05, "latency_s": 2},
             {"ttft_s": None, "latency_s": 0.5}]
    for call in calls:
        record = {**base, **call}
        stats.slo_verdict(record)
        stats.add(record)
    stats.add({**base, "error": "boom", "error_kind": "server", "latency_s": None})
    stats.wall_s = 2.0
    m = stats.metrics()
    assert m["SLO/attainment"] == pytest.approx(1 / 5)  # only the first meets both; the failed call counts
    assert m["SLO/goodput"] == pytest.approx(1 / 2.0)
    assert "SLO/attainment" not in RunStats().metrics()


def test_bootstrap_intervals_on_known_samples():
    assert bootstrap_ci([2.0] * 30, lambda s: percentile(s, 50)) == (2.0, 2.0)
    values = [float(v) for v in range(1, 101)]
    low, high = bootstrap_ci(values, lambda s: percentile(s, 50))
    assert low < 50.5 < high and high - low < 25
    assert bootstrap_ci(values, lambda s: percentile(s, 50)) == (low, high)  # seeded
    few = bootstrap_ci(values[::10], lambda s: percentile(s, 50))  # 10 samples of the same spread: wider
    assert few[1] - few[0] > high - low


def test_poisson_run_with_repeats_and_slos_end_to_end(server, tmp_path):
    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "load=poisson", "load.rate=50", "dataset.limit=5",
                  "experiment.repeats=4", "slo.latency_s=5", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == 20
    assert "rate achieved / asked" in proc.stdout and "SLO met / goodput" in proc.stdout
    [run] = mlflow_runs(tmp_path / "runs")
    m = run["metrics"]
    assert m["calls/total"] == 20 and m["Throughput/requested_rate"] == 50 and m["SLO/attainment"] == 1.0
    for key in ("Latency/p50_ci_low", "Latency/p50_ci_high", "client/dispatch_delay_p99", "Throughput/achieved_rate",
                "SLO/goodput", "client/loop_lag_p99", "Latency/from_schedule_p99", "client/slot_wait_p99"):
        assert key in m, key
    assert m["Latency/p50_ci_low"] <= m["Latency/p50"] <= m["Latency/p50_ci_high"]
    # 20 calls support no interval for p95 (5 calls beyond it needs 100) nor for the rate (50 calls).
    assert "Latency/p95_ci_low" not in m and "Throughput/requests_per_s_ci_low" not in m
    assert run["params"]["load.kind"] == "poisson"


def test_experiment_concurrency_still_works_as_a_deprecated_alias(server, tmp_path):
    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "dataset.limit=3", "experiment.concurrency=2",
                  "tracking=none", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert "experiment.concurrency is deprecated" in proc.stderr


def test_synthetic_prompts_have_the_sizes_asked_for_with_a_real_tokenizer(api_env, tiny_model):
    from pikeclient.run.synthetic import sizes, synthetic_prompts

    client = OpenAIClient(model="my-llama", base_url="http://127.0.0.1:9/v1", tokenizer=tiny_model)
    items = synthetic_prompts(client, count=20, input_tokens=64, output_tokens=32, seed=1)
    counted = sizes(items, client)
    assert all(64 <= n <= 64 + 8 for n in counted)  # the shortest prompt of at least 64 tokens (+ part of a word)
    assert all(item.max_tokens == 32 for item in items) and len({i.messages[0]["content"] for i in items}) == 20
    again = synthetic_prompts(client, count=20, input_tokens=64, output_tokens=32, seed=1)
    assert [i.messages for i in again] == [i.messages for i in items]  # seeded
    spread = synthetic_prompts(client, count=200, input_tokens=100, output_tokens=50, input_std=20, output_std=10)
    assert 90 < statistics.fmean(sizes(spread, client)) < 110
    assert 45 < statistics.fmean(i.max_tokens for i in spread) < 55


def test_synthetic_run_records_requested_and_actual_output_tokens(server, tmp_path):
    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=gpt-4o", "dataset=synthetic",
                  "dataset.count=4", "dataset.input_tokens=40", "dataset.output_tokens=5", "tracking=none",
                  cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    [records] = [[__import__("json").loads(line) for line in f.read_text().splitlines()]
                 for f in (tmp_path / "runs" / "outputs").rglob("records.jsonl")]
    assert all(r["requested_output_tokens"] == 5 and r["usage"]["completion_tokens"] == 5 for r in records)
    assert all(r["usage"]["prompt_tokens"] >= 30 for r in records)  # the loopback server counts words


def test_synthetic_output_length_is_enforced_where_the_server_can(api_env):
    # vLLM and llama.cpp read min_tokens: with min = max the answer has exactly the length asked for;
    # api.openai.com rejects the field, so the openai flavour never sends it.
    from pikeclient.run.synthetic import synthetic_prompts

    for flavour, sent in (("vllm", 7), ("llamacpp", 7), ("openai", None)):
        with FakeLLMServer(api_key=API_KEY) as server:
            client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", flavour=flavour)
            items = synthetic_prompts(client, count=2, input_tokens=20, output_tokens=7)
            stats, records = run(client, items, Concurrency(2))
            bodies = [r.body for r in server.log]
        assert [b.get("min_tokens") for b in bodies] == [sent, sent], flavour
        assert all(r["requested_output_tokens"] == 7 for r in records)


def _record(start, latency, session=0.0):
    return {"index": 0, "id": "p", "error": None, "error_kind": None, "response": "x", "attempts": 1,
            "latency_s": latency, "start_time": start, "end_time": start + latency, "session": session,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "source": "server"}}


def test_intervals_only_where_the_sample_supports_them():
    short = RunStats()
    for i in range(20):  # 20 calls ending in a burst within 0.2 s: no rate worth an interval
        short.add(_record(i * 0.01, 0.05))
    short.wall_s = 0.25
    m = short.metrics()
    assert "Throughput/requests_per_s_ci_low" not in m and "Latency/p95_ci_low" not in m
    assert "Latency/p50_ci_low" in m
    steady = RunStats()
    for i in range(200):  # 10 calls a second for 20 s
        steady.add(_record(i * 0.1, 0.1))
    steady.wall_s = 20.0
    m = steady.metrics()
    assert m["Throughput/requests_per_s_ci_low"] <= m["Throughput/requests_per_s"] <= m["Throughput/requests_per_s_ci_high"]


def test_a_resumed_runs_rate_interval_covers_its_estimate():
    stats = RunStats()
    for i in range(100):  # the interrupted process: 10 s; the resuming one, an hour later: 10 s
        stats.add(_record(i * 0.1, 0.1, session=0.0))
        stats.add(_record(3600 + i * 0.1, 0.1, session=3600.0))
    stats.wall_s = 20.0
    m = stats.metrics()
    low, high = m["Throughput/requests_per_s_ci_low"], m["Throughput/requests_per_s_ci_high"]
    assert low <= m["Throughput/requests_per_s"] <= high and high - low < 2  # not stretched over the hour between


def test_synthetic_prompts_arrive_at_the_server_at_the_size_asked_for(tmp_path):
    # The loopback server counting as OpenAI does (its command line's default) sees what was asked for.
    with FakeLLMServer(api_key=API_KEY, count="tiktoken") as server:
        proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "dataset=synthetic", "dataset.count=5",
                      "dataset.input_tokens=512", "dataset.output_tokens=8", "tracking=none", cwd=tmp_path,
                      env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["usage"]["prompt_tokens"] for r in records] == [512] * 5
    assert all(r["usage"]["source"] == "server" for r in records)


def test_the_loopback_server_reads_messages_given_as_parts(api_env):
    with FakeLLMServer(api_key=API_KEY) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
        result = client.chat([{"role": "user", "content": parts}])
    assert result.text == "You said: hello there"


def test_a_run_says_whether_the_client_limited_it(tmp_path):
    (tmp_path / "calm").mkdir()
    (tmp_path / "starved").mkdir()
    # 0.3 s answers: the calm run's verdict holds on a loaded machine (its event loop would have to lag
    # 30 ms, a tenth of the latency, to count), the starved one is limited by its CPU whatever the latency.
    with FakeLLMServer(api_key=API_KEY, latency=0.3, keep_log=False) as server:
        env = {"OPENAI_API_KEY": API_KEY}
        calm = run_py("llm=openai", f"llm.base_url={server.url}/v1", "dataset.limit=10", "load.concurrency=2",
                      cwd=tmp_path / "calm", env=env)
        # Offered far more than one process can send: the client, not the server, sets the pace.
        starved = run_py("llm=openai", f"llm.base_url={server.url}/v1", "experiment.repeats=100000",
                         "experiment.max_duration=3", "load=constant", "load.rate=20000", "tracking=none",
                         cwd=tmp_path / "starved", env=env)
    assert calm.returncode == 0 and starved.returncode == 0, calm.stderr + starved.stderr
    assert re.search(r"client limited\s+no \(it used \d+% of a core\)", calm.stdout)
    assert re.search(r"client limited\s+yes: ", starved.stdout) and "the client limited this run" in starved.stderr
    [run] = mlflow_runs(tmp_path / "calm" / "runs")
    assert run["tags"]["pikeclient.client_limited"] == "false" and "client/cpu_share" in run["metrics"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_hopelessly_behind_its_schedule_stops_early_and_says_why(tmp_path, workers):
    with FakeLLMServer(api_key=API_KEY, keep_log=False) as server:
        # 20,000/s for up to 60 s: far beyond what this machine's client sends, whatever its workers.
        proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "experiment.repeats=100000",
                      "experiment.max_duration=60", "load=constant", "load.rate=20000", f"load.workers={workers}",
                      "tracking.traces=false", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"stopped early\s+the client fell [\d.]+ s behind its schedule", proc.stdout), proc.stdout
    assert "the run stopped sending early: the client fell" in proc.stderr and "load.workers=N" in proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED" and run["tags"]["pikeclient.client_limited"] == "true"
    assert run["metrics"]["run/stopped_behind"] == 1.0
    assert run["metrics"]["run/wall_s"] < 40  # it stopped sending after seconds, not at the 60 s limit
    assert run["tags"]["pikeclient.workers"] == str(workers)
