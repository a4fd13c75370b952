"""Every bad input: a clear line, a non-zero exit, no traceback, no paid call, no run left FINISHED or
RUNNING, no key written anywhere (issue: "Nothing lost, nothing leaked, every failure said once")."""

import json
import sqlite3

import pytest

from pikeclient.testing.server import FakeLLMServer
from tests.conftest import API_KEY, files_containing, run_py

BAD_JSONL = {
    "invalid_json": ('{"id": "a", "prompt": "ok"}\n{not json\n', "bad.jsonl:2: invalid JSON"),
    "duplicate_id": ('{"id": "a", "prompt": "ok"}\n{"id": "a", "prompt": "again"}\n', "bad.jsonl:2: duplicate id 'a'"),
    "empty_prompt": ('{"id": "a", "prompt": "  "}\n', "bad.jsonl:1: empty prompt"),
    "zero_width_prompt": ('{"id": "a", "prompt": "\\u200b\\u200b\\u2060"}\n', "bad.jsonl:1: empty prompt"),
    "lone_surrogate": ('{"id": "a", "prompt": "hi \\ud800 there"}\n', "bad.jsonl:1: invalid Unicode"),
    "no_prompt_key": ('{"id": "a", "text": "no prompt"}\n', "bad.jsonl:1: needs a 'prompt' string"),
    "prompt_not_string": ('{"id": "a", "prompt": 42}\n', "bad.jsonl:1: needs a 'prompt' string"),
    "array_line": ('["a", "b"]\n', "bad.jsonl:1: expected a JSON object"),
    "messages_not_list": ('{"id": "a", "messages": "hi"}\n', "'messages' must be a non-empty list"),
    "messages_empty": ('{"id": "a", "messages": []}\n', "'messages' must be a non-empty list"),
    "unknown_role": ('{"id": "a", "messages": [{"role": "robot", "content": "hi"}]}\n', "unknown role 'robot'"),
    "message_without_content": ('{"id": "a", "messages": [{"role": "user"}]}\n', "needs a 'role' and a 'content'"),
    "blank_messages": ('{"id": "a", "messages": [{"role": "user", "content": " "}]}\n', "bad.jsonl:1: empty prompt"),
    "empty_file": ("\n\n", "holds no prompts"),
    "expectations_not_object": ('{"id": "a", "prompt": "ok", "expectations": "Paris"}\n',
                                "bad.jsonl:1: 'expectations' must be a JSON object"),
    "expectation_unknown_kind": ('{"id": "a", "prompt": "ok", "expectations": {"contain": "x"}}\n',
                                 "bad.jsonl:1: expectations.contain: unknown kind"),
    "expectation_bad_number": ('{"id": "a", "prompt": "ok"}\n'
                               '{"id": "b", "prompt": "q", "expectations": {"number": "many"}}\n',
                               "bad.jsonl:2: expectations.number: value='many': expected a finite number"),
    "expectation_bad_regex": ('{"id": "a", "prompt": "ok", "expectations": {"regex": "(x"}}\n',
                              "bad.jsonl:1: expectations.regex: invalid pattern '(x'"),
}

# (overrides, message): each run against a live loopback server with a valid key, so that nothing but
# the bad input can fail.
CASES = [
    (("sampling.temperature=3",), "sampling.temperature=3.0 is out of range: allowed [0, 2]"),
    (("sampling.temperature=-1",), "sampling.temperature=-1.0 is out of range"),
    (("sampling.top_p=0",), "sampling.top_p=0.0 is out of range: allowed (0, 1]"),
    (("sampling.top_p=1.5",), "sampling.top_p=1.5 is out of range"),
    (("sampling.max_tokens=0",), "sampling.max_tokens=0 is out of range: allowed >= 1"),
    (("sampling.max_tokens=abc",), "Value 'abc' of type 'str' could not be converted to Integer"),
    (("sampling.top_k=0",), "sampling.top_k=0 is out of range"),
    (("+sampling.temprature=0.5",), "sampling.temprature: unknown key"),
    (("sampling.temprature=1",), "Key 'temprature' not in 'SamplingConfig'"),
    (("retry.max_attempts=0",), "retry.max_attempts=0 is out of range"),
    (("retry.initial_delay=-1",), "retry.initial_delay=-1.0 is out of range"),
    (("retry.multiplier=0.5",), "retry.multiplier=0.5 is out of range"),
    (("retry.deadline=0",), "retry.deadline=0.0 is out of range"),
    (("retry.max_retry_after=-1",), "retry.max_retry_after=-1.0 is out of range"),
    (("+retry.max_retries=3",), "retry.max_retries: unknown key"),
    (("rate_limit.requests_per_minute=-5",), "rate_limit.requests_per_minute=-5.0 is out of range"),
    (("cache.mode=sometimes",), "cache.mode='sometimes'"),
    (("+cache.scope=run",), "cache.scope: unknown key"),
    (("experiment.concurrency=0",), "experiment.concurrency=0 is out of range: allowed >= 1"),
    (("experiment.concurrency=many",), "could not be converted to Integer"),
    (("experiment.timeline_interval_s=0",), "experiment.timeline_interval_s=0 is out of range: allowed >= 1"),
    (("experiment.stop_when_saturated=true", "experiment.saturation_window_s=-1"),
     "experiment.saturation_window_s=-1.0 is out of range"),
    (("server_metrics.flavour=triton",), "server_metrics.flavour='triton': allowed auto, vllm"),
    (("experiment.max_error_rate=1.5",), "experiment.max_error_rate=1.5 is out of range"),
    (("experiment.warmup=-1",), "experiment.warmup=-1 is out of range"),
    (("experiment.records_file=.",), "experiment.records_file='.': give a file name"),
    (("experiment.records_file=sub/records.jsonl",), "experiment.records_file='sub/records.jsonl': give a file name"),
    (("experiment.resume=/nonexistent/job",), "experiment.resume='/nonexistent/job': not a job folder"),
    (("experiment.resume=latest",), "experiment.resume=latest: no earlier run of this command"),
    (("experiment.resume=0123456789abcdef0123456789abcdef",), "no job folder under"),
    (("dataset.limit=0",), "dataset.limit=0 is out of range: allowed >= 1"),
    (("dataset.path=missing.jsonl",), "dataset.path: no such file"),
    (("dataset.path=pkg://no_such_package/prompts.jsonl",), "no installed package 'no_such_package'"),
    (("bogus_key=1",), "Could not override 'bogus_key'"),
    (("+bogus_key=1",), "bogus_key: unknown config group or key"),
    (("llm=nope",), "Available options in 'llm'"),
    (("tracking.experiment_name=",), "tracking:"),
    (("tracking.tracking_uri=nosuchscheme://x",), "tracking:"),
    (("tracking.live_cpu=0",), "tracking.live_cpu=0.0 is out of range: allowed > 0 and <= 1"),
    (("llm.timeout=-1",), "llm.timeout=-1 must be > 0 seconds"),
    (("llm.timeout=abc",), "llm.timeout='abc': expected a number"),
    (("llm.base_url=localhost:1234",), "llm.base_url='localhost:1234' is not an http(s) URL"),
    (("llm.base_url=ftp://x/v1",), "is not an http(s) URL"),
    (("llm.stream=maybe",), "llm.stream='maybe': expected true or false"),
    (("llm.context_window=abc",), "llm.context_window='abc': expected an integer or null"),
    (("llm.model=",), "llm.model is empty"),
    (("+llm.bogus=1",), "llm.bogus: unknown argument of OpenAIClient"),
    (("llm.max_tokens_field=wrong",), "llm.max_tokens_field='wrong'"),
    (("llm.api_key_env=NO_SUCH_VARIABLE",), "environment variable NO_SUCH_VARIABLE is not set"),
    (("llm.tokenizer=/nonexistent/tokenizer",), "llm.tokenizer='/nonexistent/tokenizer': no tokenizer.json"),
    (("llm.organization=123",), "llm.organization=123: expected a string or null"),
    (("+llm.default_headers=3",), "llm.default_headers=3: expected"),
    (("llm._target_=pikeclient.nope.Client",), "llm._target_=pikeclient.nope.Client: cannot import it"),
    # issue 19: numbers that are not numbers, prices, llm.extra_body over pikeclient's own fields, totals
    (("dataset=synthetic", "dataset.input_tokens_std=nan"), "dataset.input_tokens_std=nan is not a number"),
    (("dataset=synthetic", "dataset.output_tokens_std=inf"), "dataset.output_tokens_std=inf is out of range"),
    (("dataset=synthetic", "dataset.input_tokens_std=-1"),
     "dataset.input_tokens_std=-1 is out of range: allowed a finite number >= 0"),
    (("retry.initial_delay=nan",), "retry.initial_delay=nan is not a number"),
    (("retry.deadline=inf",), "retry.deadline=inf is out of range"),
    (("llm.timeout=nan",), "llm.timeout=nan is not a number"),
    (("llm.timeout=inf",), "llm.timeout=inf must be > 0 seconds (a finite number)"),
    (("llm.total_timeout=0",), "llm.total_timeout=0 must be > 0 seconds"),
    (("llm.total_timeout=-5",), "llm.total_timeout=-5 must be > 0 seconds"),
    (("pricing.models.gpt-4o-mini.input=-1",), "pricing.models.gpt-4o-mini.input=-1 is out of range"),
    (("pricing.models.gpt-4o-mini.output=nan",), "pricing.models.gpt-4o-mini.output=nan is not a number"),
    (("pricing.models.gpt-4o-mini.output=inf",), "pricing.models.gpt-4o-mini.output=inf is out of range"),
    (("+pricing.models.mine={input: 1}",), "pricing.models.mine.output is missing"),
    (("pricing.endpoints=[{url:'',input:0.1,output:0.4}]",), "pricing.endpoints[0].url='': give the endpoint's"),
    (("pricing.endpoints=[{url:'gpu-box:8000',input:0.1,output:0.4}]",), "pricing.endpoints[0].url='gpu-box:8000'"),
    (("pricing.endpoints=[{url:'http://gpu-box/v1',input:-1,output:0.4}]",), "pricing.endpoints[0].input=-1.0 is out"),
    (("pricing.endpoints=[{url:'http://gpu-box/v1',input:1,output:inf}]",), "pricing.endpoints[0].output=inf is out"),
    (("pricing.deployments={prod: gpt-5}",), "pricing.deployments.prod='gpt-5': no such model in pricing.models"),
    (("pricing.currency='US D'",), "pricing.currency='US D': a currency code"),
    (("pricing.models.gpt-4o.input=abc",), "pricing.models.gpt-4o.input='abc': expected a number"),
    (("+pricing.models.mine={input: 1, output: 2, cached: 1}",), "pricing.models.mine.cached: unknown key"),
    (("pricing.deployments=[prod]",), "pricing.deployments=['prod']: a mapping of Azure deployment names"),
    (("llm.extra_body={model: evil, messages: []}",), "llm.extra_body.model: pikeclient sets this field itself; use "
                                                      "llm.model instead"),
    (("llm.extra_body={temperature: 7, max_tokens: 999999}",), "llm.extra_body.temperature: pikeclient sets this "
                                                               "field itself; use sampling.temperature instead"),
    (("++llm.extra_body.max_tokens=999999",), "llm.extra_body.max_tokens: pikeclient sets this field itself"),
    (("llm.extra_body={stream: true}",), "use llm.stream instead"),
]
# issue 19: settings a run would ignore, objectives no call could meet, sizes no model takes
CASES += [
    (("slo.ttft_s=0.5",), "slo.ttft_s=0.5: openai calls report no time to first token without streaming"),
    (("slo.tpot_s=0.05",), "set llm.stream=true"),
    (("load=synchronous", "load.concurrency=4"), "load.concurrency=4 is not used by load=synchronous"),
    (("load.rate=5",), "load.rate=5.0 is not used by load=concurrency; it applies to load=constant, poisson"),
    (("load=constant", "load.rate=inf"), "load.rate=inf is out of range: load=constant needs a finite rate"),
    (("load=poisson", "load.rate=0"), "load.rate=0.0 is out of range"),
    (("dataset=synthetic", "dataset.input_tokens=10000000"),
     "dataset.input_tokens=10000000 + output_tokens=128 exceeds the 128000-token context window of gpt-4o-mini"),
    (("experiment.resume_grown=maybe",), "Value 'maybe' is not a valid bool"),
    (("llm=openai", "base_url=localhost:1234"), "llm.base_url='localhost:1234' is not an http(s) URL"),
    (("eval=basic", "eval.concurrency=0"), "eval.concurrency=0 is out of range: allowed >= 1"),
    (("+eval.bogus=1",), "eval.bogus: unknown key"),
    (("eval=basic", "+eval.scorers.mine=3"), "eval.scorers.mine: give a _target_"),
    (("eval=judge", "eval.judge_sampling.temperature=5"), "eval.judge_sampling.temperature=5 is out of range"),
    (("eval=judge", "eval.judge._target_=null"), "eval.judge must name a backend with _target_"),
    (("eval=none", "slo.require_correct=true"), "slo.require_correct=true needs scorers to tell right answers"),
    (("dataset=synthetic", "dataset.count=3", "slo.require_correct=true"),
     "slo.require_correct=true: no line of the dataset says what a right answer is"),
    (("slo.require_correct=maybe",), "Value 'maybe' is not a valid bool"),
    (("experiment.records_file=scores.jsonl",), "experiment.records_file='scores.jsonl': the job's folder keeps"),
    (("+eval.scorers.Latency={_target_:pikeclient.eval.scorers.contains}",),
     "scorer name 'Latency' is one of the run's own metric groups"),
    (("+eval.scorers.mine={_target_:no_such_module.scorer}",), "eval.scorers.mine._target_=no_such_module.scorer"),
]
# issue 21: datasets and arrival shapes
PROMPTS = "pkg://pikeclient/data/prompts.jsonl"
CASES += [
    (("dataset=sharegpt",), "dataset.path is not set: name a ShareGPT JSON or JSONL file"),
    (("dataset=sharegpt", "dataset.path=missing.json"), "dataset.path: no such file"),
    (("dataset=sharegpt", "dataset.path=x.json", "dataset.output_tokens=0"), "dataset.output_tokens=0 is out of range"),
    (("+dataset.bogus=1",), "dataset.bogus: unknown argument of JsonlDataset"),
    (("dataset.sample=0",), "dataset.sample=0 is out of range: allowed >= 1"),
    (("dataset.sample=some",), "dataset.sample='some': expected an integer or null"),
    (("dataset.min_input_tokens=10", "dataset.max_input_tokens=5"), "dataset.min_input_tokens=10 > dataset.max_input"),
    (("dataset._target_=pikeclient.nope.Reader",), "dataset._target_=pikeclient.nope.Reader: cannot import it"),
    (("dataset=hf", f"dataset.path={PROMPTS}"), "dataset.path='pkg://pikeclient/data/prompts.jsonl': datasets cannot"),
    (("dataset=synthetic", "dataset.prefix_tokens=300"), "dataset.prefix_tokens=300 is out of range"),
    (("dataset.conversations=true",), "dataset.conversations=true needs load=sessions"),
    (("load=poisson", "load.burstiness=0"), "load.burstiness=0.0 is out of range"),
    (("load=constant", "load.ramp_up=10", "load.ramp_shape=exponential"), "needs load.ramp_start_rate > 0"),
    (("load=constant", "load.ramp_up=10", "load.ramp_shape=cubic"), "load.ramp_shape='cubic': allowed linear"),
    (("load=replay",), "load.trace is not set"),
    (("load=replay", "load.trace=missing.csv"), "load.trace: no such file"),
    (("load=replay", f"load.trace={PROMPTS}"), "not a trace pikeclient reads (its first request has expectations, id"),
    (("load=replay", "load.trace=x.csv", "load.time_scale=0"), "load.time_scale=0.0 is out of range"),
    (("load=sessions", "load.users=2", "load.rate=1"), "load.users=2 and load.rate=1.0: give one"),
    (("load=sessions", "load.think_time_dist=pareto"), "load.think_time_dist='pareto': allowed fixed"),
    (("load=sessions", "load.think_time_s=-1"), "load.think_time_s=-1.0 is out of range"),
]
BAD_TRACES = {
    "bad_count.csv": ("time,input_tokens,output_tokens\n0,10,2\n1,many,3\n", "bad_count.csv:3: input_tokens='many' "
                                                                          "is not a token count"),
    "bad_time.csv": ("time,input_tokens,output_tokens\n-5,10,2\n", "bad_time.csv:2: time='-5' is not a time >= 0"),
    "no_columns.csv": ("when,size\n0,10\n", "not a trace pikeclient reads (its first request has size, when)"),
    "bad_hash.jsonl": ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [-1]}\n',
                       "bad_hash.jsonl:1: hash_ids[]=-1 is not a token count >= 0"),
    "bad_json.jsonl": ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{oops\n',
                       "bad_json.jsonl:2: invalid JSON"),
    "empty.csv": ("time,input_tokens,output_tokens\n", "holds no requests"),
}
AZURE = ("llm=azure_openai", "llm.deployment=d1")
CASES += [
    ((*AZURE, "llm.api_version="), "llm.api_version is empty"),
    (("llm=azure_openai", "llm.deployment="), "llm.deployment is empty"),
    ((*AZURE, "llm.azure_endpoint=not-a-url"), "llm.azure_endpoint='not-a-url' is not an http(s) URL"),
    ((*AZURE, "llm.use_entra_id=perhaps"), "llm.use_entra_id='perhaps': expected true or false"),
    (("llm=azure_meta_llama", "llm.api=bogus"), "llm.api='bogus'"),
    (("llm=azure_meta_llama", "llm.auth=bogus"), "llm.auth='bogus'"),
    (("llm=azure_meta_llama", "llm.route=bogus"), "llm.route='bogus'"),
    (("llm=hf_meta_llama", "llm.model=/nonexistent/model"), "/nonexistent/model"),
    (("llm=hf_meta_llama", "llm.batch_size=0"), "llm.batch_size=0 is out of range"),
    ((*AZURE, "llm.extra_body={model: other}"), "llm.extra_body.model: pikeclient sets this field itself"),
    (("llm=azure_meta_llama", "llm.total_timeout=nan"), "llm.total_timeout=nan is not a number"),
]


def _env(server):
    return {"OPENAI_API_KEY": API_KEY, "AZURE_OPENAI_API_KEY": API_KEY, "AZURE_LLAMA_API_KEY": API_KEY,
            "AZURE_OPENAI_ENDPOINT": server.url, "AZURE_LLAMA_ENDPOINT": server.url}


def assert_failed_cleanly(proc, message, tmp_path, server, code=None):
    output = proc.stderr + proc.stdout
    assert proc.returncode != 0 if code is None else proc.returncode == code, output
    assert message in output, output
    assert "Traceback" not in output
    ours = [line for line in proc.stderr.splitlines() if "][ERROR] - " in line or line.startswith("error:")]
    assert len(ours) <= 1, output  # one line of ours (Hydra's own parse errors keep Hydra's format)
    assert server.log == [], "a call was made before the bad input was noticed"
    store = tmp_path / "runs" / "mlflow.db"
    if store.exists():
        db = sqlite3.connect(store)
        statuses = [s for (s,) in db.execute("select status from runs")]
        db.close()
        assert not {"FINISHED", "RUNNING"} & set(statuses), statuses
    assert not list(tmp_path.rglob("records.jsonl"))
    if (tmp_path / "runs").exists():
        assert files_containing(tmp_path / "runs", API_KEY) == []


@pytest.fixture(scope="module")
def live_server():
    with FakeLLMServer(api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def quiet_server(live_server):
    live_server.log.clear()
    return live_server


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config(args, message, tmp_path, quiet_server):
    base = ("llm=openai", f"llm.base_url={quiet_server.url}/v1")
    overrides = [*args] if args[0].startswith("llm=") else [*base, *args]  # Azure endpoints: from _env
    proc = run_py(*overrides, cwd=tmp_path, env=_env(quiet_server))
    assert_failed_cleanly(proc, message, tmp_path, quiet_server)


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_dataset(case, tmp_path, quiet_server):
    content, message = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", "dataset.path=bad.jsonl", cwd=tmp_path,
                  env=_env(quiet_server))
    assert_failed_cleanly(proc, message, tmp_path, quiet_server)


@pytest.mark.parametrize("name", sorted(BAD_TRACES))
def test_bad_trace(name, tmp_path, quiet_server):
    content, message = BAD_TRACES[name]
    (tmp_path / name).write_text(content, encoding="utf-8")
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", "load=replay", f"load.trace={name}",
                  cwd=tmp_path, env=_env(quiet_server))
    assert_failed_cleanly(proc, message, tmp_path, quiet_server)


def test_non_utf8_dataset(tmp_path, quiet_server):
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", "dataset.path=bad.jsonl", cwd=tmp_path,
                  env=_env(quiet_server))
    assert_failed_cleanly(proc, "bad.jsonl:2: not UTF-8", tmp_path, quiet_server)


def test_unusable_runs_dir(tmp_path, quiet_server):
    (tmp_path / "a_file").write_text("not a folder")
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", f"paths.runs_dir={tmp_path / 'a_file'}",
                  cwd=tmp_path, env=_env(quiet_server))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "paths.runs_dir=" in proc.stderr and "cannot hold the outputs" in proc.stderr
    assert quiet_server.log == []


def test_a_key_with_non_ascii_characters(tmp_path, quiet_server):
    env = {**_env(quiet_server), "OPENAI_API_KEY": "sk-caf\u00e9-\u20ac-key-0123456789"}
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", cwd=tmp_path, env=env)
    assert_failed_cleanly(proc, "environment variable OPENAI_API_KEY holds characters a key cannot have",
                          tmp_path, quiet_server)
    assert "caf\u00e9" not in proc.stderr


@pytest.mark.parametrize(
    "override",
    ["llm.api_key=sk-abcdefghijklmnopqrstuvwx", "+llm.azure_ad_token=xyz", "llm.model=sk-abcdefghijklmnopqrstuvwx",
     f"llm.organization={API_KEY}", f"+llm.default_headers.Authorization=Bearer {API_KEY}",
     "+llm.default_headers.api-key=abcdef123456", "llm.base_url=http://user:hunter2secret@127.0.0.1:9/v1",
     f"llm.api_key_env={API_KEY}"],
)
def test_credentials_on_the_command_line_are_refused_before_anything_is_written(override, tmp_path, quiet_server):
    proc = run_py("llm=openai", override, cwd=tmp_path, env=_env(quiet_server))
    assert proc.returncode == 2 and "must not be passed on the command line" in proc.stderr
    assert not (tmp_path / "runs").exists()
    assert quiet_server.log == []


def test_a_key_in_api_key_env_is_never_echoed(tmp_path, quiet_server):
    # Set in a config file rather than on the command line: refused at start, and never printed.
    (tmp_path / "conf" / "llm").mkdir(parents=True)
    (tmp_path / "conf" / "llm" / "mine.yaml").write_text(
        "defaults: [openai]\napi_key_env: " + json.dumps(API_KEY) + "\n")
    proc = run_py("--config-dir", str(tmp_path / "conf"), "llm=mine", f"llm.base_url={quiet_server.url}/v1",
                  cwd=tmp_path, env=_env(quiet_server))
    assert_failed_cleanly(proc, "llm.api_key_env must be the NAME of an environment variable", tmp_path, quiet_server)


def _folder(tmp_path):
    (tmp_path / "a_folder").mkdir()
    return tmp_path / "a_folder", "is a folder: name the cache's file in it"


def _under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "cache.db", "cannot make it, "


def _other_data(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes, not a cache")
    return tmp_path / "notes.txt", "holds something else than a sqlite cache"


def _unwritable(tmp_path):  # /proc takes no new files, for root too
    return "/proc/pikeclient/cache.db", "cannot write in /proc"


@pytest.mark.parametrize("case", [_folder, _under_a_file, _other_data, _unwritable], ids=lambda f: f.__name__[1:])
def test_an_unusable_cache_path_fails_before_anything(case, tmp_path, quiet_server):
    path, message = case(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = run_py("llm=openai", f"llm.base_url={quiet_server.url}/v1", "cache.mode=use", f"cache.path={path}",
                  cwd=tmp_path, env=_env(quiet_server))
    assert_failed_cleanly(proc, message, tmp_path, quiet_server, code=1)
    assert "cache.path=" in proc.stderr
    left = [p for p in sorted(tmp_path.rglob("*")) if p.name not in before and "runs" not in p.parts]
    assert left == [] and not list(tmp_path.rglob("mlflow.db"))  # no cache file made, no store touched
