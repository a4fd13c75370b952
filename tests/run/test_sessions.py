"""Multi-turn sessions: turn k carries the k-1 earlier real answers, think times, session arrivals, per-turn
and per-session metrics, MLflow session ids, the cache, and a resumed run that plays on from the first
unanswered turn; in one process and in worker processes (``load.workers``)."""

import asyncio
import json
import signal
from pathlib import Path

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.run.datasets.sharegpt import ShareGPTDataset
from pikeclient.run.load import build_strategy
from pikeclient.run.runner import run_prompts
from pikeclient.run.workers import WorkerPlan
from pikeclient.testing.answers import content_text
from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, mlflow_runs, run_py
from tests.test_reliability import _popen, _wait_for

DATA = Path(__file__).resolve().parents[1] / "data" / "workloads"
SHAREGPT = ("dataset=sharegpt", f"dataset.path={DATA / 'sharegpt.json'}", "dataset.conversations=true")


def conversations(client):
    return ShareGPTDataset(path=str(DATA / "sharegpt.json"), conversations=True).read(client)


def play(server, strategy, workers=1, **kwargs):
    llm = {"_target_": "pikeclient.backends.openai.OpenAIClient", "model": "gpt-4o", "base_url": f"{server.url}/v1"}
    client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1")
    items = conversations(client)
    records = []
    arguments = {"sampling": {}, "retry": {}, "rate_limit": {}}
    plan = WorkerPlan(workers, llm=llm, client_arguments=arguments) if workers > 1 else None
    stats = asyncio.run(run_prompts(client, items, strategy, on_record=lambda r, i: records.append((r, i)),
                                    workers=plan, **kwargs))
    return items, stats, records


WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["one process", "2 workers"])


@WORKERS
def test_turn_k_carries_the_earlier_real_answers(api_env, workers):
    with FakeLLMServer(api_key=API_KEY, answers={"France": "Paris, I would say."}) as server:
        items, stats, records = play(server, build_strategy("sessions", users=3), workers)
        bodies = [r.body for r in server.log]
    answers = {(r["session_id"], r["turn"]): r["response"] for r, _ in records}
    assert len(records) == len(items) == 7 and stats.error_count == 0
    for record, sent in records:
        turn, session = record["turn"], record["session_id"]
        [body] = [b for b in bodies if content_text(b["messages"][-1]["content"]) == record["prompt"]]
        said = [m for m in body["messages"] if m["role"] == "assistant"]
        assert [m["content"] for m in said] == [answers[(session, k)] for k in range(1, turn)]  # the k-1 real answers
        mine = [i for i in items if i.session == session]
        asked = [m["content"] for m in body["messages"] if m["role"] == "user"]
        assert asked == [i.prompt for i in mine[:turn]]  # and the k questions, in order
        assert list(sent.messages) == body["messages"]  # what tracking sees is what was sent
        assert record["turns"] == len(mine) and record["id"] == f"{session}#{turn}"
    assert answers[("conv-a", 1)] == "Paris, I would say."  # a real answer of the server, not the recorded one
    m = stats.metrics()
    assert m["sessions/count"] == 4 and m["sessions/completed"] == 4 and m["sessions/turns_mean"] == 7 / 4
    series = stats.series()
    assert series["turns/calls"] == {1: 4, 2: 2, 3: 1}
    assert series["turns/prompt_tokens_mean"][2] > series["turns/prompt_tokens_mean"][1]  # the history grows
    assert set(series["turns/latency_p50"]) == {1, 2, 3}


def test_think_time_passes_between_an_answer_and_the_next_turn(api_env):
    with FakeLLMServer(api_key=API_KEY) as server:
        _, _, records = play(server, build_strategy("sessions", users=4, think_time_s=0.3))
    by = {(r["session_id"], r["turn"]): r for r, _ in records}
    for (session, turn), record in by.items():
        if turn > 1:
            assert record["start_time"] - by[(session, turn - 1)]["end_time"] >= 0.3 - 0.005


@WORKERS
def test_a_limit_on_requests_counts_turns_not_conversations(api_env, workers):
    # 7 turns in 4 conversations; at most 4 requests go out, whichever worker plays them, and the turns past
    # the limit are not counted as sent.
    from pikeclient.run.load import MaxRequests

    with FakeLLMServer(api_key=API_KEY, latency=0.02) as server:
        _, stats, records = play(server, build_strategy("sessions", users=4), workers, limits=[MaxRequests(4)])
        sent = len(server.log)
    assert len(records) == sent == 4 and stats.error_count == 0
    assert stats.metrics()["sessions/turns_not_sent"] == 0


@WORKERS
def test_sessions_arrive_at_a_rate(api_env, workers):
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        _, stats, records = play(server, build_strategy("sessions", rate=50, max_in_flight=2), workers)
    assert len(records) == 7 and stats.metrics()["sessions/completed"] == 4
    assert stats.requested_rate is None  # sessions per second are no request rate


@WORKERS
def test_a_failed_turn_ends_its_session(api_env, workers):
    from pikeclient.testing.server import FaultPlan

    # One user, in order: conv-a's two turns and conv-b's one answered, conv-c's first turn fails (400, not
    # retried): its two later turns are never sent; conv-e is played after it. (One user is one worker's.)
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(script=["ok", "ok", "ok", "400"])) as server:
        _, stats, records = play(server, build_strategy("sessions", users=1), workers)
    assert [(r["session_id"], r["turn"], r["error_kind"]) for r, _ in records] == [
        ("conv-a", 1, None), ("conv-a", 2, None), ("conv-b", 1, None), ("conv-c", 1, "bad_request"),
        ("conv-e", 1, None)]
    m = stats.metrics()
    assert m["sessions/failed"] == 1 and m["sessions/turns_not_sent"] == 2 and m["sessions/completed"] == 3


def test_a_sessions_run_logs_turn_series_and_mlflow_sessions(server, tmp_path):
    args = ("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=gpt-4o", "load=sessions", "load.users=2",
            *SHAREGPT)
    proc = run_py(*args, "cache.mode=use", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert "sessions(2 users)" in proc.stderr and "sessions completed" in proc.stdout
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["sessions/completed"] == 4 and run["status"] == "FINISHED"
    import sqlite3

    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    steps = dict(db.execute("select step, value from metrics where key='turns/calls'").fetchall())
    sessions = db.execute("select session_id, count(*) from trace_info group by session_id").fetchall()
    db.close()
    assert steps == {1: 4.0, 2: 2.0, 3: 1.0}
    assert sorted(n for _, n in sessions) == [1, 1, 2, 3] and all(s.startswith(run["id"][:8]) for s, _ in sessions)
    mark = len(server.log)
    again = run_py(*args, "cache.mode=use", cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert again.returncode == 0, again.stderr
    assert len(server.log) == mark  # every turn, history included, answered from the cache
    assert "7 from the response cache" in again.stdout


@WORKERS
def test_an_interrupted_sessions_run_plays_on_from_the_first_unanswered_turn(tmp_path, workers):
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        args = ("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=gpt-4o", "load=sessions", "load.users=4",
                "load.think_time_s=1.5", "tracking.traces=false", f"load.workers={workers}", *SHAREGPT)
        first = _popen(args, tmp_path)
        _wait_for(lambda: answered(tmp_path) >= 4 or first.poll() is not None)  # every first turn, no second yet
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 130, stderr
        [records_file] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
        before = {(r["session_id"], r["turn"]): r["response"] for r in map(json.loads, records_file.read_text()
                                                                             .splitlines()) if r["error"] is None}
        assert ("conv-a", 1) in before and ("conv-a", 2) not in before
        mark = len(server.log)
        again = run_py(*args, f"experiment.resume={records_file.parent}", cwd=tmp_path,
                       env={"OPENAI_API_KEY": API_KEY})
        resumed = [r.body for r in server.log[mark:]]
    assert again.returncode == 0, again.stderr
    asked = [content_text(b["messages"][-1]["content"]) for b in resumed]
    assert "What is the capital of France?" not in asked  # answered before: not asked again
    [second] = [b for b in resumed if content_text(b["messages"][-1]["content"]) == "And how many people live there?"]
    assert [m["content"] for m in second["messages"] if m["role"] == "assistant"] == [before[("conv-a", 1)]]
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert sorted((r["session_id"], r["turn"]) for r in records) == sorted(
        (i.session, i.turn) for i in conversations(OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1",
                                                                api_key_env=None)))


def answered(root):
    paths = list((root / "runs" / "outputs").rglob("records.jsonl"))
    lines = paths[0].read_text().splitlines() if paths else []
    return sum(1 for line in lines if line.endswith("}") and json.loads(line)["error"] is None)


@pytest.mark.parametrize("extra", [(), ("experiment.repeats=2",)])
def test_single_prompts_are_sessions_of_one_turn(server, tmp_path, extra):
    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "load=sessions", "dataset.limit=3",
                  "tracking=none", *extra, cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["turn"] for r in records} == {1} and len({r["session_id"] for r in records}) == len(records)


def test_a_two_backend_multi_turn_sweep(server, tmp_path):
    proc = run_py("-m", "llm=openai,azure_openai", f"base_url={server.url}/v1", "++llm.stream=true", "load=sessions",
                  "load.users=2", *SHAREGPT, cwd=tmp_path,
                  env={"OPENAI_API_KEY": API_KEY, "AZURE_OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    jobs = [r for r in mlflow_runs(tmp_path / "runs") if r["tags"].get("pikeclient.role") != "sweep"]
    assert sorted(r["tags"]["pikeclient.provider"] for r in jobs) == ["azure_openai", "openai"]
    assert all(r["status"] == "FINISHED" and r["metrics"]["sessions/completed"] == 4 for r in jobs)
    assert all(r["metrics"]["turns/ttft_p50"] > 0 for r in jobs)  # the latest step of the TTFT-by-turn series


def test_a_sessions_runs_records_replay_each_turn_with_the_history_it_had(server, tmp_path, api_env):
    from pikeclient.run.shapes.replay import Replay

    proc = run_py("llm=openai", f"llm.base_url={server.url}/v1", "llm.model=gpt-4o", "load=sessions", "load.users=2",
                  "tracking=none", *SHAREGPT, cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    [path] = (tmp_path / "runs" / "outputs").rglob("records.jsonl")
    records = {(r["session_id"], r["turn"]): r for r in map(json.loads, path.read_text().splitlines())}
    items = Replay.build(trace=str(path)).prompts().read(OpenAIClient(model="gpt-4o", base_url="http://127.0.0.1:9/v1"))
    [third] = [i for i in items if i.id == "conv-c#3"]  # sent as it was: the two earlier turns and their answers
    assert [m["content"] for m in third.messages if m["role"] == "assistant"] == [
        records[("conv-c", 1)]["response"], records[("conv-c", 2)]["response"]]
    assert third.messages[-1]["content"] == "Thanks!" and third.session is None
    assert [i.at for i in items] == sorted(i.at for i in items)
