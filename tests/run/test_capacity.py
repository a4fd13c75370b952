"""The capacity search (hydra/sweeper=capacity) against the loopback server with a known capacity."""

import json

import pytest

from pikeclient.core.errors import ConfigError
from pikeclient.run.capacity import CapacitySearch, CapacitySettings, Probe
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, mlflow_runs, run_py

ENV = {"OPENAI_API_KEY": API_KEY}


def probe(kind, rate, p50, p90=None, rps=None, saturated=None):
    return Probe(kind, rate, {"Latency/p50": p50, "Latency/from_schedule_p90": p90 or p50,
                              "Throughput/requests_per_s": rps if rps is not None else (rate or 1 / p50)}, saturated)


def test_the_search_brackets_a_knee_and_stops_within_its_tolerance():
    truth = 40.0  # a server that keeps up below 40/s and queues above
    search = CapacitySearch(CapacitySettings(max_probes=12, tolerance=0.03), slo_active=False)
    while (step := search.next_probe()) is not None:
        kind, rate = step
        if kind == "synchronous":
            search.add(probe(kind, None, 0.1))
        elif kind == "throughput":
            search.add(probe(kind, None, 0.2, rps=39.0))
        else:
            search.add(probe(kind, rate, 0.1 if rate <= truth else 0.4, rps=min(rate, truth)))
    answer = search.result(1.0)
    assert answer.rate <= truth <= answer.ci_high and answer.ci_high / answer.rate - 1 <= 0.03
    assert answer.probes <= 12 and answer.metrics()["capacity/rate"] == answer.rate


def test_no_rate_keeps_up_when_one_request_at_a_time_misses_the_slo():
    search = CapacitySearch(CapacitySettings(), slo_active=True)
    search.add(Probe("synchronous", None, {"Latency/p50": 5.0, "SLO/attainment": 0.0}))
    assert search.next_probe() is None
    assert search.result(1.0).rate is None and "not even one request at a time" in search.result(1.0).describe()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_probes", 0, "hydra.sweeper.max_probes=0 is out of range"),
    ("tolerance", 2.0, "hydra.sweeper.tolerance=2.0 is out of range"),
    ("arrivals", "bursts", "hydra.sweeper.arrivals='bursts'"),
])
def test_bad_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        CapacitySettings(**{key: value}).check()


def test_one_command_finds_the_capacity_within_10_percent(tmp_path):
    # 4 requests served at once, 0.1 s each: 40 requests/s, and a queue above that.
    with FakeLLMServer(api_key=API_KEY, latency=0.1, capacity=4, keep_log=False) as server:
        proc = run_py("-m", "hydra/sweeper=capacity", "llm=openai", f"llm.base_url={server.url}/v1",
                      "hydra.sweeper.probe_s=2.5", "hydra.sweeper.max_probes=8", "tracking.traces=false",
                      cwd=tmp_path, env=ENV, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "capacity of openai: " in proc.stdout
    runs = mlflow_runs(tmp_path / "runs")
    [parent] = [r for r in runs if r["tags"].get("pikeclient.role") == "sweep"]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["id"]]
    m = parent["metrics"]
    assert m["capacity/rate"] == pytest.approx(40, rel=0.10), m
    assert m["capacity/rate_ci_low"] <= m["capacity/rate"] <= m["capacity/rate_ci_high"]
    assert m["capacity/probes"] <= 8 and len(children) == m["capacity/probes"]
    assert "capacity/goodput" in m and parent["status"] == "FINISHED"
    assert "requests/s" in parent["tags"]["pikeclient.capacity"]
    [table] = (tmp_path / "runs").rglob("mlartifacts/**/capacity_probes.json")
    rows = json.loads(table.read_text())
    assert len(rows["data"]) == m["capacity/probes"] and "kept_up" in rows["columns"]
    assert list((tmp_path / "runs").rglob("mlartifacts/**/capacity.png"))


@pytest.mark.parametrize(("override", "message"), [
    ("hydra.sweeper.max_probes=0", "error: hydra.sweeper.max_probes=0 is out of range: allowed >= 3"),
    ("slo.latency_s=-1", "error: slo.latency_s=-1"),
])
def test_bad_search_input_is_one_line(tmp_path, override, message):
    proc = run_py("-m", "hydra/sweeper=capacity", "llm=openai", "llm.base_url=http://127.0.0.1:9/v1", override,
                  "tracking=none", cwd=tmp_path, env=ENV, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_budget_ends_the_search():
    search = CapacitySearch(CapacitySettings(max_probes=3), slo_active=False)
    search.add(probe("synchronous", None, 0.1))
    search.add(probe("throughput", None, 0.2, rps=39.0))
    assert search.next_probe() == ("rate", 39.0)
    search.add(probe("rate", 39.0, 0.1))
    assert search.next_probe() is None  # 3 probes spent
    timed = CapacitySearch(CapacitySettings(max_time=10), slo_active=False)
    timed.add(Probe("synchronous", None, {"Latency/p50": 0.1}, seconds=6.0))
    assert timed.next_probe(elapsed=6.0) is None  # another 6 s probe would end after 10 s
