"""The over-saturation stop and the run over time, against the loopback server with a known capacity."""

import asyncio

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem
from pikeclient.run.load import Constant, MaxDuration
from pikeclient.run.runner import run_prompts
from pikeclient.run.saturation import OverSaturation, build_over_saturation, grows, slope_interval
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY


def prompts(n):
    return [PromptItem(f"p{i}", ({"role": "user", "content": f"question {i}"},)) for i in range(n)]


def run(server, rate, seconds, stop):
    client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
    records = []
    stats = asyncio.run(run_prompts(client, prompts(int(rate * seconds) + 10), Constant(rate=rate),
                                    on_record=lambda r, _: records.append(r),
                                    limits=[MaxDuration(seconds), stop]))
    return stats, records


def test_slope_test():
    assert slope_interval([(0, 1), (1, 1)]) is None  # too few points
    assert grows([(x, 2 * x + (0.1 if x % 2 else -0.1)) for x in range(10)])
    assert not grows([(x, 1 + (0.1 if x % 2 else -0.1)) for x in range(10)])  # flat, noisy
    with pytest.raises(ConfigError, match="experiment.saturation_window_s=0 is out of range"):
        build_over_saturation(True, 5.0, 1.0, 0, 10)
    assert build_over_saturation(False, 5.0, 1.0, 1.0, 10) is None


def test_an_overloaded_run_stops_early_and_is_marked_saturated(api_env):
    # Capacity 2 requests at once, 0.1 s each: 20 requests/s at most; asked for 60/s, a queue builds.
    with FakeLLMServer(api_key=API_KEY, latency=0.1, capacity=2) as server:
        stop = OverSaturation(60.0, min_seconds=1.0, window_s=1.5, min_calls=10)
        stats, records = run(server, 60, 20, stop)
    assert stats.saturated and "over-saturated" in stats.saturated
    sent = [r["start_time"] for r in records]
    assert max(sent) - min(sent) < 10  # stopped well before the 20 s it was given
    assert stats.metrics()["run/saturated"] == 1 and stats.tags()["pikeclient.saturated"] == "true"


def test_a_normal_run_is_left_alone_and_has_a_timeline(api_env):
    with FakeLLMServer(api_key=API_KEY, latency=0.05, capacity=4) as server:  # 80/s capacity, asked for 10/s
        stop = OverSaturation(10.0, min_seconds=0.5, window_s=1.0, min_calls=5)
        stats, records = run(server, 10, 3, stop)
    assert stats.saturated is None and stats.tags()["pikeclient.saturated"] == "false"
    assert 25 <= len(records) <= 32
    series = stats.series()
    steps = sorted(series["timeline/sent"])
    assert steps == list(range(len(steps))) and 3 <= len(steps) <= 5  # one point a second since the start
    assert sum(series["timeline/sent"].values()) == len(records)
    assert sum(series["timeline/completed"].values()) == len(records)
    assert series["timeline/achieved_rate"][1] == pytest.approx(10, abs=3)
    assert 0.04 < series["timeline/latency_p50"][1] < 0.5 and "timeline/latency_p99" in series
    assert series["timeline/errors"][1] == 0 and series["timeline/retries"][1] == 0
    assert series["timeline/in_flight"][0] == 0 and max(series["timeline/in_flight"].values()) <= 3
