"""Arrival shapes: gamma gaps (burstiness), ramps, trace replay (Mooncake, timed CSV/JSONL, an earlier run's
records) checked against what the loopback server received."""

import asyncio
import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import content_text
from pikeclient.run.dataset import Repeated
from pikeclient.run.load import Constant, Poisson, build_strategy, offered_rate
from pikeclient.run.runner import run_prompts
from pikeclient.run.shapes.ramp import Ramp
from pikeclient.run.shapes.replay import Replay
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, run_py

DATA = Path(__file__).resolve().parents[1] / "data" / "workloads"


def gaps(strategy, n):
    return [b - a for a, b in itertools.pairwise(itertools.islice(strategy.offsets(), n + 1))]


@pytest.mark.parametrize("shape", [0.25, 0.5, 1.0, 4.0])
def test_gamma_gaps_have_the_coefficient_of_variation_of_their_shape(shape):
    sample = gaps(Poisson(rate=20, seed=11, burstiness=shape), 40_000)
    assert statistics.fmean(sample) == pytest.approx(1 / 20, rel=0.03)  # the rate is kept whatever the shape
    assert statistics.stdev(sample) / statistics.fmean(sample) == pytest.approx(1 / math.sqrt(shape), rel=0.05)
    assert gaps(Poisson(rate=20, seed=11, burstiness=shape), 50) == sample[:50]  # seeded


def arrivals_by(offsets, t):
    return sum(1 for _ in itertools.takewhile(lambda due: due <= t, offsets))


@pytest.mark.parametrize("shape", ["linear", "exponential"])
def test_a_ramp_reaches_the_target_rate_after_its_seconds(shape):
    ramp = Ramp(seconds=10, start_rate=2, shape=shape)
    even = Constant(rate=50, ramp=ramp)
    during = (2 + 50) * 10 / 2 if shape == "linear" else 2 * 10 * (50 / 2 - 1) / math.log(50 / 2)  # ∫ rate dt
    assert arrivals_by(even.offsets(), 10) == pytest.approx(during, abs=1.01)
    after = list(itertools.islice(even.offsets(), int(during) + 2, int(during) + 50))
    assert all(b - a == pytest.approx(1 / 50) for a, b in itertools.pairwise(after))  # the target rate after it
    first = list(itertools.islice(even.offsets(), 3))
    assert 1 / (first[2] - first[1]) < 5  # near the start rate at first (2/s; 4.3/s at 0.5 s)
    bursty = Poisson(rate=50, seed=3, ramp=ramp)
    assert arrivals_by(bursty.offsets(), 10) == pytest.approx(during, rel=0.2)
    assert statistics.fmean(gaps(Poisson(rate=50, seed=3, ramp=ramp), 20_000)[2000:]) == pytest.approx(1 / 50, rel=0.05)


@pytest.mark.parametrize(("kind", "given", "message"), [
    ("poisson", {"rate": 5, "burstiness": 0}, "load.burstiness=0 is out of range"),
    ("constant", {"rate": 5, "burstiness": 0.5}, "load.burstiness=0.5 is not used by load=constant; it applies to "
                                                 "load=poisson"),
    ("constant", {"rate": 5, "ramp_up": -1}, "load.ramp_up=-1 is out of range"),
    ("poisson", {"rate": 5, "ramp_up": 10, "ramp_shape": "cubic"}, "load.ramp_shape='cubic': allowed linear, expo"),
    ("poisson", {"rate": 5, "ramp_up": 10, "ramp_shape": "exponential"}, "needs load.ramp_start_rate > 0"),
    ("constant", {"rate": 5, "ramp_start_rate": 1}, "load.ramp_start_rate and load.ramp_shape need load.ramp_up"),
    ("replay", {}, "load.trace is not set"),
    ("replay", {"trace": "t.csv", "time_scale": 0}, "load.time_scale=0 is out of range"),
    ("replay", {"trace": "t.csv", "rate": 3}, "load.rate=3 is not used by load=replay"),
    ("sessions", {"users": 4, "rate": 2}, "load.users=4 and load.rate=2: give one"),
    ("sessions", {"users": 0}, "load.users=0 is out of range"),
    ("sessions", {"think_time_s": -1}, "load.think_time_s=-1 is out of range"),
    ("sessions", {"think_time_dist": "pareto"}, "load.think_time_dist='pareto': allowed fixed, exponential, uniform"),
    ("sessions", {"users": 2, "max_in_flight": 5}, "load.max_in_flight=5 is not used with load.users"),
    ("concurrency", {"users": 3}, "load.users=3 is not used by load=concurrency; it applies to load=sessions"),
])
def test_bad_shapes(kind, given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_strategy(kind, **given)


def replay(trace, **given):
    strategy = build_strategy("replay", trace=str(trace), **given)
    return strategy, strategy.prompts()


def test_a_csv_trace_is_sent_at_its_times_as_the_server_saw_them(api_env, tmp_path):
    rows = [line.split(",") for line in (DATA / "trace.csv").read_text().splitlines()[1:]]
    times = [float(t) for t, _, _ in rows]
    with FakeLLMServer(api_key=API_KEY, count="tiktoken") as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
        strategy, reader = replay(DATA / "trace.csv", time_scale=0.5)
        items = reader.read(client)
        records = []
        # One warm-up call first: the SDK's first request pays for its own set-up (~0.1 s), not the schedule's.
        stats = asyncio.run(run_prompts(client, items, strategy, on_record=lambda r, _: records.append(r), warmup=1))
        received = sorted(r.time for r in server.log)[1:]
    assert [i.at for i in items] == times and [i.max_tokens for i in items] == [int(o) for _, _, o in rows]
    records.sort(key=lambda r: r["index"])
    assert [r["scheduled_s"] for r in records] == pytest.approx([t * 0.5 for t in times], abs=1e-6)
    assert [r["usage"]["prompt_tokens"] for r in records] == [int(n) for _, n, _ in rows]  # as the trace says
    # The server's own clock: each request arrived when the trace (at half its times) says, after the first.
    errors = [(got - received[0]) - t * 0.5 for got, t in zip(received, times, strict=True)]
    assert statistics.median(abs(e) for e in errors) < 0.03 and max(abs(e) for e in errors) < 0.25, errors
    assert offered_rate(strategy, items) == pytest.approx((len(times) - 1) / (times[-1] * 0.5))
    assert stats.calls == len(times) and stats.error_count == 0


def test_timed_traces_in_jsonl_and_burstgpts_csv(api_env, tmp_path):
    client = OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1")
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text("".join(json.dumps({"timestamp": ms, "input_length": n, "output_length": o}) + "\n"
                             for ms, n, o in ((2500, 30, 4), (1000, 20, 2), (1750, 25, 3))))
    items = replay(jsonl)[1].read(client)
    assert [(i.at, i.max_tokens) for i in items] == [(0.0, 2), (0.75, 3), (1.5, 4)]  # ms, from the first, in order
    assert [client.count_message_tokens(list(i.messages)) for i in items] == pytest.approx([20, 25, 30], abs=2)
    burst = tmp_path / "burstgpt.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,40,12,52,Conversation log\n6.5,GPT-4,25,0,25,Conversation log\n")
    assert [(i.at, i.max_tokens) for i in replay(burst)[1].read(client)] == [(0.0, 12), (1.5, 1)]


def test_mooncake_requests_sharing_hash_ids_share_those_blocks(api_env, tiny_model):
    client = OpenAIClient(model="my-llama", base_url="http://127.0.0.1:9/v1", tokenizer=tiny_model)
    strategy, reader = replay(DATA / "mooncake.jsonl")  # blocks of 512 tokens, as Mooncake's
    items = reader.read(client)
    lines = [json.loads(line) for line in (DATA / "mooncake.jsonl").read_text().splitlines()]
    assert [i.at for i in items] == [line["timestamp"] / 1000 for line in lines]
    assert [i.max_tokens for i in items] == [line["output_length"] for line in lines]
    sizes = [client.count_message_tokens(list(i.messages)) for i in items]
    assert sizes == pytest.approx([line["input_length"] for line in lines], abs=2)  # the model sees the trace's size
    tokenizer = client._counter.tokenizer

    def ids(i):
        return tokenizer.encode(content_text(items[i].messages[0]["content"]), add_special_tokens=False).ids

    def shared(a, b):
        return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(ids(a), ids(b))))

    assert shared(0, 1) >= len(ids(0)) - 1  # hash ids 0, 1 in both: prompt 0 is where prompt 1 starts
    assert shared(4, 1) >= len(ids(1)) - 1  # 0, 1, 2 in both
    assert 512 - 1 <= shared(0, 3) <= 512 + 1  # hash id 0 only: one block
    assert shared(2, 5) >= len(ids(5)) - 1  # hash id 3: the shorter prompt whole
    assert shared(0, 2) <= 1  # nothing in common
    assert items[1] == reader.read(client)[1]  # built when used, the same every time


def test_an_earlier_runs_records_are_replayed_at_their_send_times(server, tmp_path, api_env):
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text((DATA / "chat.jsonl").read_text())
    first = run_py("llm=openai", f"llm.base_url={server.url}/v1", f"dataset.path={dataset}", "load=poisson",
                   "load.rate=20", "tracking=none", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert first.returncode == 0, first.stderr
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["start_time"])
    client = OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1")
    items = replay(path)[1].read(client)
    originals = {i["id"] if "id" in i else i["custom_id"]: i for i in map(json.loads, dataset.read_text().splitlines())}
    assert [i.id for i in items] == [r["id"] for r in records]
    assert [i.at for i in items] == pytest.approx([r["start_time"] - records[0]["start_time"] for r in records])
    batch = next(i for i in items if i.id == "batch-1")
    assert list(batch.messages) == originals["batch-1"]["body"]["messages"]  # the whole request, system message too
    (path.parent / "run.json").unlink()  # without it, only the records' prompts are known
    assert [i.messages for i in replay(path)[1].read(client)] == [
        ({"role": "user", "content": r["prompt"]},) for r in records]


def test_repeats_of_a_trace_follow_each_other(api_env):
    client = OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1")
    strategy, reader = replay(DATA / "trace.csv")
    items = reader.read(client)
    twice = Repeated(items, 2)
    offsets = [offset for _, offset in strategy.schedule(enumerate(twice))]
    assert offsets[:8] == [i.at for i in items]
    assert offsets[8] == pytest.approx(1.3 + 1.3 / 7) and offsets[8:] == pytest.approx([o + offsets[8] for o in
                                                                                       offsets[:8]])
    resumed = [offset for _, offset in strategy.schedule((i, twice[i]) for i in range(3, 16))]
    assert resumed[0] == 0 and resumed[1] == pytest.approx(0.75 - 0.4)  # from the first request not yet sent


def test_a_replay_run_end_to_end_logs_its_schedule(server, tmp_path):
    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "load=replay",
                  f"load.trace={DATA / 'trace.csv'}", "load.time_scale=0.2", "slo.latency_s=5",
                  cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert "rate achieved / asked" in proc.stdout and "replay(trace.csv x0.2)" in proc.stderr
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 8 and all(r["slo_met"] for r in records)
    assert isinstance(Replay.build(trace="x.csv"), Replay)


def test_an_interrupted_replay_resumes_from_its_first_unsent_request(tmp_path):
    import signal

    from tests.test_reliability import _popen, _wait_for

    trace = tmp_path / "slow.csv"
    trace.write_text("time,input_tokens,output_tokens\n" + "".join(f"{i * 0.4:.1f},20,3\n" for i in range(12)))
    with FakeLLMServer(api_key=API_KEY) as server:
        args = ("llm=openai", f"llm.base_url={server.url}/v1", "load=replay", f"load.trace={trace}",
                "tracking.traces=false")
        first = _popen(args, tmp_path)
        outputs = tmp_path / "runs" / "outputs"

        def written() -> int:  # answered requests already in the records file (a line is flushed whole)
            lines = [line for path in outputs.rglob("records.jsonl") for line in path.read_text().splitlines()]
            return sum(json.loads(line)["error"] is None for line in lines if line.endswith("}"))

        _wait_for(lambda: written() >= 4 or first.poll() is not None)
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
        [path] = outputs.rglob("records.jsonl")
        answered = {json.loads(line)["id"] for line in path.read_text().splitlines()
                    if json.loads(line)["error"] is None}
        mark = len(server.log)
        again = run_py(*args, f"experiment.resume={path.parent}", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
        resent = server.log[mark:]
    assert first.returncode == 130 and again.returncode == 0, again.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"trace-{i}" for i in range(12))  # every request, once
    assert len(resent) == 12 - len(answered) and 4 <= len(answered) < 12
    new = sorted((r for r in records if not r.get("resumed")), key=lambda r: r["index"])
    assert new[0]["scheduled_s"] == 0 and new[1]["scheduled_s"] == pytest.approx(0.4)  # the trace's gaps, from there
