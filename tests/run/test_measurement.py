"""Every number measured, and measured right: one call per dataset line, an opt-in response cache that
is never measured, exact resume, labelled token sources, cost only where it applies, streaming timings
(TTFT, ITL, TPOT), warm-up outside the statistics, and failed runs that do not succeed."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import pytest

from pikeclient.backends.openai import OpenAIClient
from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, REPO, mlflow_runs, run_py

ENV = {"OPENAI_API_KEY": API_KEY}


def write_dataset(path, prompts):
    with path.open("w") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"id": f"q{i}", "prompt": prompt}) + "\n")
    return path


def openai_args(server, *extra):
    return ("llm=openai", f"llm.base_url={server.url}/v1", "retry.initial_delay=0.01", "retry.max_delay=0.05", *extra)


def job_records(root, base="outputs"):
    """Records of every job under runs/<base>, oldest first."""
    files = sorted((root / "runs" / base).rglob("records.jsonl"), key=lambda p: p.stat().st_mtime)
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


def metric_steps(root, run_id, key):
    db = sqlite3.connect(root / "runs" / "mlflow.db")
    steps = [s for (s,) in db.execute("select step from metrics where run_uuid=? and key=?", (run_id, key))]
    db.close()
    return steps


def test_repeated_prompts_are_each_called_and_measured(server, tmp_path):
    dataset = write_dataset(tmp_path / "same.jsonl", ["how long is a piece of string"] * 300)
    proc = run_py(*openai_args(server, f"dataset.path={dataset}", "experiment.concurrency=16",
                               "tracking.traces=false"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == 300
    [records] = job_records(tmp_path)
    assert len([r for r in records if r["latency_s"] is not None and not r["cached"]]) == 300
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["calls/measured"] == 300 and run["metrics"]["calls/cache_hits"] == 0
    assert len(metric_steps(tmp_path, run["id"], "call/latency_s")) == 300


def test_a_sweep_after_an_identical_run_measures_every_job(server, tmp_path):
    args = openai_args(server, "dataset.limit=4")
    assert run_py(*args, "llm.stream=false", cwd=tmp_path, env=ENV).returncode == 0
    before = len(server.log)
    proc = run_py("-m", *args, "llm.stream=true,false", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) - before == 8  # two jobs of 4 prompts, nothing read back
    children = [r for r in mlflow_runs(tmp_path / "runs") if "pikeclient.job_num" in r["tags"]]
    assert len(children) == 2
    for child in children:
        assert child["metrics"]["calls/measured"] == 4 and "Latency/p50" in child["metrics"]


def test_the_response_cache_is_opt_in_and_never_measured(server, tmp_path):
    dataset = write_dataset(tmp_path / "p.jsonl", [f"question {i}" for i in range(5)])
    args = openai_args(server, f"dataset.path={dataset}")
    for mode, requests in (("off", 5), ("use", 5), ("use", 0), ("refresh", 5)):
        before = len(server.log)
        proc = run_py(*args, f"cache.mode={mode}", cwd=tmp_path, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert len(server.log) - before == requests, mode
        assert ("5 from the response cache, not measured" in proc.stdout) == (requests == 0), proc.stdout
    [cached_run] = [r for r in mlflow_runs(tmp_path / "runs") if r["metrics"]["calls/cache_hits"] == 5]
    m = cached_run["metrics"]
    assert m["calls/measured"] == 0 and m["Errors/retries"] == 0 and "Latency/p50" not in m
    assert not [k for k in m if k.startswith(("cost", "output_tokens", "ttft"))]
    assert cached_run["tags"]["pikeclient.traces"] == "0"
    assert metric_steps(tmp_path, cached_run["id"], "call/latency_s") == []
    # Without cache.mode, a second identical run is measured in full (no default cache).
    before = len(server.log)
    assert run_py(*args, cwd=tmp_path, env=ENV).returncode == 0 and len(server.log) - before == 5


def test_sigkill_then_resume_calls_only_missing_prompts_and_reports_all(tmp_path):
    dataset = write_dataset(tmp_path / "prompts.jsonl", [f"question {i} asks something" for i in range(120)])
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MLFLOW_TRACKING_URI"}
    env.update(ENV)
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as server:
        args = openai_args(server, f"dataset.path={dataset}", "experiment.concurrency=4")
        first = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(server.log) < 50 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        [earlier] = job_records(tmp_path)  # the run is completed in place: one job folder
        answered_first = {r.prompt for r in server.log if r.status == 200}
        before = len(server.log)
        proc = run_py(*args, "experiment.resume=latest", cwd=tmp_path, env=ENV)
        second = server.log[before:]
    assert proc.returncode == 0, proc.stderr
    [final] = job_records(tmp_path)
    assert sorted(r["id"] for r in final) == sorted(f"q{i}" for i in range(120))
    resumed = {r["prompt"]: r for r in final if r.get("resumed")}
    called = Counter(request.prompt for request in second)
    assert len(resumed) >= 40 and set(resumed) <= answered_first
    assert set(called) == {r["prompt"] for r in final if not r.get("resumed")}
    assert max(called.values()) == 1  # nothing asked twice
    # Resumed answers keep the measurements they had in the interrupted run.
    first_latency = {r["prompt"]: r["latency_s"] for r in earlier if r["error"] is None}
    assert all(r["latency_s"] == first_latency[p] for p, r in resumed.items())
    # One MLflow run covers every prompt: the interrupted one, completed.
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FINISHED"
    assert run["metrics"]["calls/total"] == 120 and run["metrics"]["calls/measured"] == 120
    assert run["metrics"]["calls/resumed"] == len(resumed)
    steps = metric_steps(tmp_path, run["id"], "call/latency_s")
    assert sorted(steps) == list(range(120))  # every call once in the series, none twice
    assert f"{len(resumed)} resumed" in proc.stdout


def test_resume_refuses_other_settings_and_finds_runs_by_id(server, tmp_path):
    args = openai_args(server, "dataset.limit=3")
    assert run_py(*args, cwd=tmp_path, env=ENV).returncode == 0
    [run] = mlflow_runs(tmp_path / "runs")
    [job_dir] = {p.parent for p in (tmp_path / "runs" / "outputs").rglob("run.json")}
    proc = run_py(*args, "sampling.temperature=0.5", f"experiment.resume={job_dir}", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and "ran with other settings (sampling.temperature)" in proc.stderr
    assert "Traceback" not in proc.stderr
    # latest is the latest run of the same command, never another command's.
    proc = run_py(*args, "sampling.temperature=0.5", "experiment.resume=latest", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and "no earlier run of this command" in proc.stderr
    before = len(server.log)
    proc = run_py(*args, f"experiment.resume={run['id']}", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == before and "already complete" in proc.stderr  # nothing to call
    [again] = mlflow_runs(tmp_path / "runs")  # left as it was: no second, no-op resume counted in it
    assert again["id"] == run["id"] and again["status"] == "FINISHED" and again["metrics"]["calls/resumed"] == 0
    proc = run_py(*args, "experiment.resume=0123456789abcdef0123456789abcdef", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and "no job folder" in proc.stderr


def test_resume_a_sweep_job_by_job(server, tmp_path):
    args = ("-m", *openai_args(server, "dataset.limit=3", "sampling.temperature=0,0.5"))
    assert run_py(*args, cwd=tmp_path, env=ENV).returncode == 0
    before = len(server.log)
    proc = run_py(*args, "experiment.resume=latest", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == before and proc.stderr.count("already complete") == 2
    runs = mlflow_runs(tmp_path / "runs")
    children = [r for r in runs if "pikeclient.job_num" in r["tags"]]
    assert len(children) == 2 and all(c["metrics"]["calls/resumed"] == 0 for c in children)
    [parent] = [r for r in runs if r["tags"].get("pikeclient.role") == "sweep"]  # the same parent, completed
    assert parent["status"] == "FINISHED" and {c["tags"]["mlflow.parentRunId"] for c in children} == {parent["id"]}


def test_streaming_timings_are_taken_at_output_text(api_env):
    latency, delay = 0.05, 0.02
    with FakeLLMServer(api_key=API_KEY, latency=latency, token_delay=delay, filter_chunk=True) as server:
        client = OpenAIClient(model="gpt-4o", base_url=f"{server.url}/v1", stream=True)
        result = asyncio.run(client.achat([{"role": "user", "content": "one two three four five six seven"}]))
    # "You said: one ... seven" is 9 words; a filter chunk and a role chunk precede the first word,
    # each followed by the server's delay: neither is a token.
    assert result.usage.completion_tokens == 9
    assert result.ttft_s >= latency + 2 * delay
    # The server sends on a schedule: a late first word shortens the gaps after it, never their sum by
    # more than its own lateness (a few ms here, over 8 gaps).
    assert result.itl_s >= delay * 0.9
    assert result.tpot_s is not None and result.tpot_s >= result.itl_s * 0.99
    assert result.latency_s >= result.ttft_s + 8 * delay * 0.9


def test_streamed_runs_report_ttft_itl_tpot(server, tmp_path):
    proc = run_py(*openai_args(server, "dataset.limit=4", "llm.stream=true"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    for name in ("TTFT", "ITL", "TPOT"):
        assert f"{name} p50 / p90 / p99" in proc.stdout
    assert "client send delay p50 / p99 (ms)" in proc.stdout
    assert "new connections: set-up p50 (ms)" in proc.stdout
    [run] = mlflow_runs(tmp_path / "runs")
    for key in ("TTFT/p50", "TTFT/p99", "ITL/p50", "ITL/p90", "TPOT/p50", "Throughput/call_output_tokens_per_s_p50",
                "client/send_delay_p50", "client/send_delay_p99", "client/connect_p50"):
        assert key in run["metrics"], key
    [records] = job_records(tmp_path)
    assert all(r["send_delay_s"] >= 0 for r in records)
    # Each connection is opened by one call, which says how long that took; the others went on kept ones.
    opened = [r["connect_s"] for r in records if r["connect_s"] is not None]
    assert 1 <= len(opened) == run["metrics"]["client/connections_opened"] <= len(records)
    assert all(value >= 0 for value in opened)
    table = proc.stdout.split("\n\n")[0]  # the summary table (the first answers follow it)
    assert all(len(line) <= 100 for line in table.splitlines())


@pytest.mark.parametrize(
    ("model", "usage", "source"),
    [("gpt-4o", True, "server"), ("gpt-4o", False, "tokenizer"), ("llama-3.1-8b", False, "estimate")],
)
def test_usage_source_says_where_counts_came_from(model, usage, source, api_env):
    with FakeLLMServer(api_key=API_KEY, report_usage=usage) as server:
        client = OpenAIClient(model=model, base_url=f"{server.url}/v1", stream=True)
        assert client.chat([{"role": "user", "content": "hello there"}]).usage.source == source


def test_a_model_tokenizer_gives_exact_counts(api_env, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "count these words for me"}]
    with FakeLLMServer(api_key=API_KEY, report_usage=False) as server:
        client = OpenAIClient(model="my-llama", base_url=f"{server.url}/v1", tokenizer=tiny_model)
        result = client.chat(messages)
    assert result.usage.source == "tokenizer"
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
    assert result.usage.prompt_tokens == len(expected)
    assert result.usage.completion_tokens == len(tokenizer(result.text, add_special_tokens=False)["input_ids"])


def test_a_run_says_when_token_counts_are_estimates(tmp_path):
    with FakeLLMServer(api_key=API_KEY, report_usage=False) as server:
        proc = run_py(*openai_args(server, "dataset.limit=4", "llm.model=llama-3.1-8b", "llm.stream=true"),
                      cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("token counts are estimates") == 1
    assert "(estimate)" in proc.stdout
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["tokens/source_estimate"] == 4 and run["tags"]["pikeclient.token_basis"] == "estimate"


def test_cost_only_where_a_price_applies(server, tmp_path):
    # A self-hosted server answering to an OpenAI model name is not priced, and that is no warning.
    proc = run_py(*openai_args(server, "dataset.limit=2", "llm.model=gpt-4o-mini"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "no price" not in proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert not [k for k in run["metrics"] if k.startswith("cost")]
    # A price the user names for the endpoint applies.
    price = f"pricing.endpoints=[{{url:'{server.url}/v1',input:1.0,output:2.0}}]"
    (tmp_path / "priced").mkdir()
    proc = run_py(*openai_args(server, "dataset.limit=2"), price, cwd=tmp_path / "priced", env=ENV)
    assert proc.returncode == 0, proc.stderr
    [priced] = mlflow_runs(tmp_path / "priced" / "runs")
    m = priced["metrics"]
    expected = (m["tokens/prompt_total"] * 1.0 + m["tokens/completion_total"] * 2.0) / 1e6
    assert m["Cost/usd"] == pytest.approx(expected) and priced["tags"]["pikeclient.cost_basis"] == "exact"


def test_list_prices_apply_at_the_providers_own_endpoints_only(caplog):
    from omegaconf import OmegaConf

    from pikeclient.config.factory import compose
    from pikeclient.run.cost import find_price

    pricing = OmegaConf.to_container(compose([]).pricing)
    azure = {"provider": "azure_openai", "endpoint": "https://r.openai.azure.com", "deployment": "d1"}
    assert find_price(pricing, {**azure, "model": "gpt-4o"}).model == "gpt-4o"
    assert find_price(pricing, {**azure, "model": "my-model"}) is None
    assert "no price for model 'my-model'" in caplog.text
    assert find_price(pricing, {**azure, "model": "gpt-4o", "endpoint": "http://127.0.0.1:8000"}) is None


def test_one_base_url_points_every_backend_of_a_sweep_at_one_server(server, tmp_path):
    proc = run_py("-m", "llm=azure_openai,openai,azure_meta_llama", f"base_url={server.url}/v1",
                  "dataset.limit=2", cwd=tmp_path,
                  env={**ENV, "AZURE_OPENAI_API_KEY": API_KEY, "AZURE_LLAMA_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr
    assert {r.path for r in server.log} == {"/v1/chat/completions"} and len(server.log) == 6
    assert {r.body["model"] for r in server.log} == {"gpt-4o", "gpt-4o-mini", "Meta-Llama-3.1-8B-Instruct"}
    children = [r for r in mlflow_runs(tmp_path / "runs") if r["tags"].get("pikeclient.role") != "sweep"]
    assert sorted(c["tags"]["pikeclient.provider"] for c in children) == ["azure_meta_llama", "azure_openai", "openai"]
    for child in children:  # a loopback server is no provider's endpoint: nothing is priced
        assert child["status"] == "FINISHED" and not [k for k in child["metrics"] if k.startswith("Cost/")]
        assert child["tags"]["pikeclient.price"] == "none"


def test_warmup_calls_are_made_before_the_measured_span(server, tmp_path):
    proc = run_py(*openai_args(server, "dataset.limit=5", "experiment.warmup=3", "experiment.concurrency=1"),
                  cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == 8
    [records] = job_records(tmp_path)
    assert len(records) == 5
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["calls/warmup"] == 3 and run["metrics"]["calls/total"] == 5
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    [(start_ms, end_ms)] = db.execute("select start_time, end_time from runs").fetchall()
    db.close()
    # The run spans the measured calls: it starts after the warm-up and ends with the last call.
    assert start_ms >= int(server.log[2].time * 1000)  # MLflow keeps whole milliseconds (truncated)
    assert start_ms / 1000 <= min(r["start_time"] for r in records) + 0.001
    assert end_ms / 1000 >= max(r["end_time"] for r in records) - 0.001


def test_a_run_whose_calls_all_fail_exits_1_with_its_metrics_and_a_failed_run(server, tmp_path):
    server.faults = FaultPlan(rates={"500": 1.0})
    proc = run_py(*openai_args(server, "dataset.limit=3", "retry.max_attempts=2"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 1
    assert "every call failed (server=3)" in proc.stderr and "Traceback" not in proc.stderr
    assert "errors" in proc.stdout  # the summary is still printed
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED"
    assert run["metrics"]["Errors/count"] == 3 and run["metrics"]["Errors/retries"] == 3
    [records] = job_records(tmp_path)
    assert all(r["error_kind"] == "server" and r["attempts"] == 2 for r in records)


@pytest.mark.parametrize(("script", "max_rate", "code"), [(["400"] * 2, 0.5, 0), (["400"] * 3, 0.5, 1),
                                                          (["400"] * 3, 0.75, 0)])
def test_max_error_rate(server, tmp_path, script, max_rate, code):
    server.faults = FaultPlan(script=list(script))  # the plan consumes its script
    proc = run_py(*openai_args(server, "dataset.limit=4", "experiment.concurrency=1",
                               f"experiment.max_error_rate={max_rate}"), cwd=tmp_path, env=ENV)
    assert proc.returncode == code, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == ("FINISHED" if code == 0 else "FAILED")
    assert run["metrics"]["Errors/rate"] == pytest.approx(len(script) / 4)


@pytest.mark.parametrize("fault", ["400", "404", "malformed", "html", "empty_choices", "null_content"])
def test_total_failures_never_pass_for_success(fault, tmp_path):
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(rates={fault: 1.0})) as server:
        proc = run_py(*openai_args(server, "dataset.limit=3", "retry.max_attempts=2"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "every call failed" in proc.stderr and "Traceback" not in proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED" and run["metrics"]["Errors/count"] == 3


def test_a_refused_port_fails_the_run_and_names_the_url(tmp_path):
    from pikeclient.testing.server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_py("llm=openai", f"llm.base_url={url}", "dataset.limit=2", "retry.max_attempts=1", cwd=tmp_path,
                  env=ENV)
    assert proc.returncode == 1 and "every call failed (connection=2)" in proc.stderr
    [records] = job_records(tmp_path)
    assert all(url in r["error"] for r in records)
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["status"] == "FAILED"


def test_an_empty_answer_is_counted(tmp_path):
    # max_tokens=0 is refused, so an empty answer comes from a stop string at the very start.
    with FakeLLMServer(api_key=API_KEY) as server:
        proc = run_py(*openai_args(server, "dataset.limit=2", "sampling.stop=[You]"), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run] = mlflow_runs(tmp_path / "runs")
    assert run["metrics"]["calls/empty_answers"] == 2
    assert "empty answers" in proc.stdout
