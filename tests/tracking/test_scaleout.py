"""Team scale: an MLflow server on PostgreSQL with served artifacts, sweeps on joblib, Ray and submitit.

Every service is real and started here, on loopback ports, and stopped here by its PID (or its process
group): PostgreSQL (initdb + postgres as user postgres in a temporary folder), ``mlflow server`` on it,
and a Ray head node. Jobs are ``run.py`` subprocesses against the loopback LLM server.
"""

from __future__ import annotations

import contextlib

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pikeclient.testing.server import FakeLLMServer, free_port
from tests.conftest import API_KEY, REPO, files_containing, run_py

pytest.importorskip("psycopg", reason="PostgreSQL driver missing: pip install -e '.[team]'")
from mlflow.tracking import MlflowClient

ENV = {"OPENAI_API_KEY": API_KEY}


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.3) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started (its group)."""
    if process.poll() is None:
        os.killpg(process.pid, first)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # children may outlive the leader (Ray's raylet, uvicorn workers)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# --- PostgreSQL ------------------------------------------------------------------------------------

def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on a free loopback port, as user postgres; yields the database URI for MLflow."""
    initdb, server = postgres_bin("initdb"), postgres_bin("postgres")
    if initdb is None or server is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres user to run PostgreSQL as (apt-get install -y postgresql creates it)")
    user = "postgres" if as_root else None
    root = Path(tempfile.mkdtemp(prefix="pike-pg-"))
    if as_root:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
                   user=user, check=True, capture_output=True, cwd=root)
    port = free_port()
    process = subprocess.Popen(
        [server, "-D", str(data), "-p", str(port), "-k", str(root), "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=200"],
        user=user, cwd=root, stdout=subprocess.DEVNULL, stderr=(root / "postgres.log").open("w"))
    try:
        import psycopg

        def connect():
            try:
                return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                       autocommit=True, connect_timeout=3)
            except psycopg.OperationalError:
                assert process.poll() is None, (root / "postgres.log").read_text()[-2000:]
                return None

        with wait_for(connect, 60, "PostgreSQL to accept connections") as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(root, ignore_errors=True)


# --- MLflow server ---------------------------------------------------------------------------------

class MlflowServer:
    """``mlflow server`` on a PostgreSQL store, artifacts served by the server (``--serve-artifacts``)."""

    def __init__(self, store: str, artifacts: Path, port: int | None = None, workers: int = 2) -> None:
        self.store, self.artifacts, self.port, self.workers = store, artifacts, port or free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self, timeout: float = 240) -> MlflowServer:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
                   "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log.open("a"),
                                        start_new_session=True)  # its workers share its process group

        def up() -> bool:
            assert self.process.poll() is None, f"mlflow server exited: {self.log.read_text()[-3000:]}"
            return answers_health(self.url)

        wait_for(up, timeout, f"mlflow server on {self.url}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(postgres, tmp_path_factory.mktemp("mlflow") / "artifacts").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name per test: tests share the server, never their runs."""
    return f"scaleout-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def llm_server():
    with FakeLLMServer(api_key=API_KEY) as server:
        yield server


def runs_of(server: MlflowServer, experiment: str) -> tuple[list, list]:
    """(children, parents) of an experiment on the server."""
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not on the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pikeclient.role") == "sweep"]
    return [r for r in runs if r not in parents], parents


def count_traces(client: MlflowClient, run) -> int:
    """A run's traces, page by page (the server answers at most 500 a page)."""
    count, token = 0, None
    while True:
        page = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, max_results=500,
                                    page_token=token)
        count += len(page)
        token = page.token
        if not token:
            return count


def assert_one_parent_per_sweep(children: list, parents: list, jobs_per_sweep: int) -> None:
    for parent in parents:
        mine = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(mine) == jobs_per_sweep, f"parent {parent.info.run_id}: {len(mine)} children"
        assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs"] == jobs_per_sweep
        assert {c.info.status for c in mine} == {"FINISHED"}
        assert sorted(int(c.data.tags["pikeclient.job_num"]) for c in mine) == list(range(jobs_per_sweep))
    assert len(children) == jobs_per_sweep * len(parents)


def job_args(llm_server: FakeLLMServer, server: MlflowServer, experiment: str, *extra: str) -> list[str]:
    return ["llm=openai", f"llm.base_url={llm_server.url}/v1", f"tracking.tracking_uri={server.url}",
            f"tracking.experiment_name={experiment}", "dataset.limit=4", "cache.mode=off", *extra]


# --- one run through the server --------------------------------------------------------------------

def test_single_run_logs_everything_through_the_server(mlflow_server, llm_server, experiment, tmp_path, capsys):
    proc = run_py(*job_args(llm_server, mlflow_server, experiment), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    [run], parents = runs_of(mlflow_server, experiment)
    assert parents == [] and run.info.status == "FINISHED"
    assert run.data.params["llm.model"] and run.data.params["client.provider"] == "openai"
    assert run.data.metrics["calls/total"] == 4 and "Latency/p50" in run.data.metrics
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert len(client.get_metric_history(run.info.run_id, "call/latency_s")) == 4
    traces = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, max_results=10)
    assert len(traces) == 4 and traces[0].data.spans[0].span_type == "LLM"
    # Artifacts went through the server: the run points at it, the files sit in its destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"records.jsonl", "records_table.json", "hydra"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {"hydra/config.yaml"}
    stored = mlflow_server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / "records.jsonl"
    assert len(stored.read_text().splitlines()) == 4
    assert not (tmp_path / "runs" / "mlartifacts").exists()
    assert files_containing(tmp_path, API_KEY) == [] and files_containing(mlflow_server.artifacts, API_KEY) == []

    from pikeclient.tracking.report import main as report_main

    assert report_main(["--tracking-uri", mlflow_server.url, "--experiment", experiment]) == 0
    assert "gpt-4o-mini" in capsys.readouterr().out


# --- unreachable at start --------------------------------------------------------------------------

@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_unreachable_server_fails_before_any_call(sweep, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    with FakeLLMServer(api_key=API_KEY) as llm:
        args = ["llm=openai", f"llm.base_url={llm.url}/v1", f"tracking.tracking_uri={nobody}", "dataset.limit=2"]
        if sweep:
            args = ["-m", *args, "sampling.temperature=0,0.5"]
        proc = run_py(*args, cwd=tmp_path, env=ENV, timeout=120)  # MLflow's own retries would take minutes
        assert llm.log == [] and llm.request_count == 0
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "unreachable" in line]
    assert len(errors) == 1 and f"tracking server at {nobody} is unreachable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("records.jsonl"))


# --- parallel sweeps -------------------------------------------------------------------------------

def test_joblib_sweep_is_one_parent_with_all_children(mlflow_server, llm_server, experiment, tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[team]'")
    proc = run_py("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sampling.temperature=0,0.3,0.6,0.9",
                  *job_args(llm_server, mlflow_server, experiment), cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    children, parents = runs_of(mlflow_server, experiment)
    assert len(parents) == 1
    assert_one_parent_per_sweep(children, parents, 4)
    assert {c.data.params["sampling.temperature"] for c in children} == {"0.0", "0.3", "0.6", "0.9"}
    from pikeclient.tracking.ui_check import main as ui_check_main

    assert ui_check_main(["--tracking-uri", mlflow_server.url, "--experiment", experiment]) == 0
    assert f"served: sweep {parents[0].info.run_id} with 4 child runs" in capsys.readouterr().out


def test_sweep_parent_is_found_through_the_server(mlflow_server, llm_server, experiment, tmp_path, monkeypatch):
    """A job on another machine has no sweep folder: it finds its parent by the sweep's id tag."""
    from pikeclient.tracking.sweep import find_parent, search_parent, sweep_id

    proc = run_py("-m", "sampling.temperature=0,0.5", *job_args(llm_server, mlflow_server, experiment),
                  cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    _, [parent] = runs_of(mlflow_server, experiment)
    sweep_dir = parent.data.tags["pikeclient.sweep_dir"]
    assert parent.data.tags["pikeclient.sweep_id"] == sweep_id(sweep_dir, tmp_path) == str(tmp_path / sweep_dir)
    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the sweep folder's file is not here
    found = search_parent(mlflow_server.url, experiment, sweep_id(sweep_dir, tmp_path))
    assert found == {"run_id": parent.info.run_id, "experiment_id": parent.info.experiment_id,
                     "tracking_uri": mlflow_server.url}
    assert find_parent(sweep_dir, mlflow_server.url, experiment) is None  # launched from elsewhere: another sweep
    assert search_parent(mlflow_server.url, experiment, str(elsewhere / sweep_dir)) is None


@dataclass
class RayNode:
    address: str
    node_dir: Path  # the node's working directory, where its jobs run
    driver_env: dict[str, str]  # what the launching process needs to join it (the token, in token mode)
    log: Path


# Ray keeps the node on loopback only when it believes it is a one-machine cluster: otherwise a driver
# given 127.0.0.1 connects to the host's interface address instead (ray._private.services.
# resolve_ip_for_localhost). The variable is Ray's own switch for that (named after macOS and Windows).
ONE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session", params=["token", "no_token"])
def ray_head(request, tmp_path_factory) -> Iterator[RayNode]:
    """A Ray head for this module's tests (see :func:`ray_head_node`)."""
    with ray_head_node(request.param == "token", tmp_path_factory.mktemp("ray-node")) as node:
        yield node


@contextlib.contextmanager
def ray_head_node(token_mode: bool, node_dir: Path) -> Iterator[RayNode]:
    """A Ray head node on loopback (its own process group, stopped here), started in its own folder.

    Ray 2.5x turns token authentication on for a head whose user has ``~/.ray/auth_token`` (written by
    the first local ``ray.init()``); a driver that joins it by address must then say so. Both kinds of
    cluster are started here, each with a private HOME and temp folder: nothing earlier runs left in
    ``~/.ray`` or ``/tmp/ray`` is read.
    """
    node_dir.mkdir(parents=True, exist_ok=True)
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        pytest.skip("Ray is not installed: pip install -e '.[team]'")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="pip install -e '.[team]'")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head_home, driver_home = temp / "head-home", temp / "driver-home"
    driver_home.mkdir(parents=True)
    driver_env = {**ONE_MACHINE, "HOME": str(driver_home), "RAY_TMPDIR": str(temp)}
    if token_mode:  # as on a machine where Ray ran before; the driver joins as README says
        token = head_home / ".ray" / "auth_token"
        token.parent.mkdir(parents=True)
        token.write_text(secrets.token_hex(32))
        driver_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    else:
        head_home.mkdir()
    log = temp / "head.log"
    # A cluster node carries the team's environment (here the loopback server's key); jobs get nothing else.
    env = {**os.environ, **ENV, **ONE_MACHINE, "HOME": str(head_home), "RAY_TMPDIR": str(temp)}
    for name in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    command = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               "--min-worker-port=0", "--max-worker-port=0"]  # workers: ports the OS picks
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True, cwd=node_dir)
    try:
        def started() -> bool:
            assert process.poll() is None, f"ray start exited: {log.read_text()[-3000:]}"
            return "Ray runtime started" in log.read_text()

        wait_for(started, 180, "the Ray head node")
        yield RayNode(f"127.0.0.1:{port}", node_dir, driver_env, log)
    finally:
        stop_group(process, grace=20)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_sweep_is_one_parent_with_all_children(mlflow_server, llm_server, ray_head, experiment, tmp_path):
    token_auth = "RAY_AUTH_MODE" in ray_head.driver_env
    assert ("Token authentication is enabled" in ray_head.log.read_text()) == token_auth
    proc = run_py("-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head.address}",
                  "+hydra.launcher.ray.init.object_store_memory=null", "sampling.temperature=0,0.3,0.6,0.9",
                  *job_args(llm_server, mlflow_server, experiment), cwd=tmp_path, env={**ENV, **ray_head.driver_env},
                  timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The launching process joined the head on loopback, not through the host's interface address.
    assert f"Connecting to existing Ray cluster at address: {ray_head.address}" in proc.stderr, proc.stderr[-4000:]
    children, parents = runs_of(mlflow_server, experiment)
    assert len(parents) == 1
    assert_one_parent_per_sweep(children, parents, 4)
    # The jobs ran in the node's own folder, as on another machine: the sweep folder's parent file was
    # not there, so they found the parent through the server; their records are in the node's folder.
    assert not list(tmp_path.rglob("records.jsonl"))
    node_records = list(ray_head.node_dir.glob("runs/multirun/*/*/*/records.jsonl"))
    assert len(node_records) == 4 and not list(ray_head.node_dir.rglob("mlflow_parent_run.json"))
    assert {c.data.params["sampling.temperature"] for c in children} == {"0.0", "0.3", "0.6", "0.9"}


def test_submitit_local_sweep_is_one_parent_with_all_children(mlflow_server, llm_server, experiment, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[team]'")
    proc = run_py("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "sampling.temperature=0,0.5",
                  *job_args(llm_server, mlflow_server, experiment), cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    children, parents = runs_of(mlflow_server, experiment)
    assert len(parents) == 1
    assert_one_parent_per_sweep(children, parents, 2)


def test_four_sweeps_of_eight_jobs_at_once(mlflow_server, llm_server, experiment, tmp_path):
    """32 jobs from 4 sweeps, started together against one server: 4 parents, 32 children, nothing lost."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[team]'")
    temperatures = "sampling.temperature=" + ",".join(f"0.{i}" for i in range(8))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MLFLOW_TRACKING_URI"}
    procs = []
    for number in range(4):
        cwd = tmp_path / f"sweep{number}"
        cwd.mkdir()
        args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", temperatures,
                *job_args(llm_server, mlflow_server, experiment)]
        procs.append(subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env={**env, **ENV},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        outputs = [p.communicate(timeout=900)[1] for p in procs]
    finally:
        for p in procs:
            stop_group(p, signal.SIGKILL, grace=0)
    for p, err in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    children, parents = runs_of(mlflow_server, experiment)
    assert len(parents) == 4 and len(children) == 32
    assert_one_parent_per_sweep(children, parents, 8)
    assert sum(c.data.metrics["calls/total"] for c in children) == 32 * 4
    # Each parent is tagged with its own sweep's id, so a lookup through the server never mixes them up.
    assert len({p.data.tags["pikeclient.sweep_id"] for p in parents}) == 4


# --- the server goes away mid-run --------------------------------------------------------------------

CALLS = 800  # 13 messages of 64 long-prompt calls (~500 KB): more than the socket between the processes holds


def start_job(args: list[str], cwd, stderr) -> subprocess.Popen:
    """run.py in its own session (on failure, its tracking process is stopped with it)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env={**env, **ENV},
                            stdout=subprocess.DEVNULL, stderr=stderr.open("w"), text=True, start_new_session=True)


def run_started(client: MlflowClient, experiment: str) -> bool:
    exp = client.get_experiment_by_name(experiment)
    return bool(exp and client.search_runs([exp.experiment_id]))


def test_server_outage_mid_run_loses_nothing(postgres, tmp_path):
    """Calls go on while the server is down (more of them than the pipe to the tracking process holds);
    when it is back, everything is logged and the run is marked."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (json.dumps({"id": f"p{i}", "prompt": f"question {i}: {'why ' * 80}"}) for i in range(CALLS))
    prompts.write_text("\n".join(lines) + "\n")
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    server = MlflowServer(postgres, tmp_path / "artifacts", workers=1).start()
    client = MlflowClient(tracking_uri=server.url)
    stderr = tmp_path / "job.stderr"
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as llm:
        args = ["llm=openai", f"llm.base_url={llm.url}/v1", f"tracking.tracking_uri={server.url}",
                f"tracking.experiment_name={experiment}", f"dataset.path={prompts}", "experiment.concurrency=4",
                "cache.mode=off"]
        job = start_job(args, tmp_path, stderr)
        try:
            wait_for(lambda: run_started(client, experiment), 180, "the run on the server")
            server.stop()
            wait_for(lambda: len(llm.log) == CALLS, 180, "every call answered while the server is down")
            noticed = lambda: "is unreachable; trying again" in stderr.read_text()
            wait_for(noticed, 120, "the tracking process to notice")
            assert job.poll() is None  # waiting for the server, not failed
            server.start()
            job.wait(400)
        finally:
            stop_group(job, signal.SIGKILL, grace=0)
    try:
        log = stderr.read_text()
        assert job.returncode == 0, log[-4000:]
        assert "is back after" in log and "Traceback" not in log
        [run], _ = runs_of(server, experiment)
        assert run.info.status == "FINISHED" and run.data.metrics["calls/total"] == CALLS
        assert float(run.data.tags["pikeclient.tracking_outage_s"]) > 0
        assert len(client.get_metric_history(run.info.run_id, "call/latency_s")) == CALLS
        assert count_traces(client, run) == CALLS
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"records.jsonl", "records_table.json",
                                                                            "hydra"}
    finally:
        server.stop()
    [records_file] = tmp_path.glob("runs/outputs/*/*/records.jsonl")
    assert len(records_file.read_text().splitlines()) == CALLS


def test_server_gone_for_good_fails_the_job_with_its_records_on_disk(postgres, tmp_path):
    """Past ``tracking.reconnect_timeout`` the job still makes every call, then exits 1 with one line."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(300)))
    server = MlflowServer(postgres, tmp_path / "artifacts", workers=1).start()
    client = MlflowClient(tracking_uri=server.url)
    experiment = f"gone-{uuid.uuid4().hex[:8]}"
    stderr = tmp_path / "job.stderr"
    with FakeLLMServer(api_key=API_KEY, latency=0.05) as llm:
        args = ["llm=openai", f"llm.base_url={llm.url}/v1", f"tracking.tracking_uri={server.url}",
                f"tracking.experiment_name={experiment}", f"dataset.path={prompts}", "experiment.concurrency=2",
                "cache.mode=off", "tracking.reconnect_timeout=3"]
        job = start_job(args, tmp_path, stderr)
        try:
            wait_for(lambda: run_started(client, experiment), 180, "the run on the server")
            server.stop()
            job.wait(300)
        finally:
            stop_group(job, signal.SIGKILL, grace=0)
        assert len(llm.log) == 300  # every call was made
    log = stderr.read_text()
    assert job.returncode == 1, log[-4000:]
    [line] = [line for line in log.splitlines() if "[pikeclient.cli][ERROR]" in line]
    assert "was unreachable for 3 s" in line and "records are on disk" in line
    assert "Traceback" not in log
    [records_file] = tmp_path.glob("runs/outputs/*/*/records.jsonl")
    assert len(records_file.read_text().splitlines()) == 300
