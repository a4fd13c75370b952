"""PIKE-RAG's own QA and tagging workflows, configured by YAML as its users configure them, on pikeclient:
against the loopback server and against SmolLM2 on this machine, tracked in a real sqlite MLflow store.

The loopback server echoes the prompt ("You said: ..."); each test question carries the JSON answer PIKE-RAG's
QA protocol parses, so the echo is a parseable answer and the workflow's metrics are known in advance.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pikeclient.testing.server import FakeLLMServer, FaultPlan
from tests.conftest import API_KEY, REPO
from tests.integrations.conftest import MODEL, ended_run, read_jsonl, server_args, traces_of, tracked_run

CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Athens", "Dublin"]


def write_questions(path: Path, count: int) -> Path:
    """A PIKE-RAG testing suite whose questions carry their answer as the JSON the QA protocol parses."""
    with path.open("w") as out:
        for i, city in enumerate(CITIES[:count]):
            question = f'Which city is number {i}? {{"answer": "{city}", "rationale": "number {i}"}}'
            out.write(json.dumps({"id": f"q{i}", "question": question, "answer_labels": [city],
                                  "question_type": "factoid", "metadata": {}}) + "\n")
    return path


def qa_config(tmp_path: Path, name: str, llm_client: dict[str, Any], questions: int, rounds: int = 1,
              num_parallel: int = 1) -> Path:
    """A QA workflow YAML like PIKE-RAG's zero-shot examples: BaseQaRetriever (no index), four metrics."""
    config = {
        "dotenv_path": str(write_env(tmp_path)),
        "log_root_dir": str(tmp_path / "logs"),
        "experiment_name": name,
        "test_jsonl_filename": None,
        "test_rounds": rounds,
        "workflow": {"module_path": "pikerag.workflows.qa", "class_name": "QaWorkflow",
                     "args": {"num_parallel": num_parallel}},
        "test_loading": {"module": "pikerag.utils.data_protocol_utils", "name": "load_testing_suite",
                         "args": {"filepath": str(write_questions(tmp_path / "questions.jsonl", questions))}},
        "qa_protocol": {"module_path": "pikerag.prompts.qa", "attr_name": "generation_qa_protocol"},
        "llm_client": llm_client,
        "retriever": {"module_path": "pikerag.knowledge_retrievers", "class_name": "BaseQaRetriever", "args": {}},
        "evaluator": {"metrics": ["ExactMatch", "F1", "Precision", "Recall"]},
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tagging_config(tmp_path: Path, name: str, llm_client: dict[str, Any]) -> Path:
    """PIKE-RAG's atom-question tagging of two chunks, with two threads."""
    chunks = tmp_path / "chunks.jsonl"
    chunks.write_text("".join(json.dumps({"chunk_id": f"c{i}", "title": title, "content": content}) + "\n"
                              for i, (title, content) in enumerate([
                                  ("Paris", "Paris is the capital of France."),
                                  ("Rome", "Rome is the capital of Italy.")])))
    config = {
        "dotenv_path": str(write_env(tmp_path)),
        "log_root_dir": str(tmp_path / "logs"),
        "experiment_name": name,
        "ori_doc_loading": {"module": "pikerag.utils.data_protocol_utils", "name": "load_chunks_from_jsonl",
                            "args": {"jsonl_chunk_path": str(chunks)}},
        "tagged_doc_saving": {"module": "pikerag.utils.data_protocol_utils", "name": "save_chunks_to_jsonl",
                              "args": {"dump_path": str(tmp_path / "tagged.jsonl")}},
        "tagger": {"tagging_protocol": {"module_path": "pikerag.prompts.tagging",
                                        "attr_name": "atom_question_tagging_protocol"},
                   "tag_name": "atom_questions", "num_parallel": 2},
        "llm_client": llm_client,
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_env(tmp_path: Path) -> Path:
    """PIKE-RAG's scripts read their keys from a dot-env file (and insist that it sets something)."""
    path = tmp_path / ".env"
    path.write_text(f"OPENAI_API_KEY={API_KEY}\n")
    return path


def llm_client(args: dict[str, Any], **llm_config: Any) -> dict[str, Any]:
    return {"module_path": "pikeclient.integrations.pikerag", "class_name": "PikeClientLLM", "args": args,
            "llm_config": {"model": MODEL, "temperature": 0, "max_tokens": 512, **llm_config},
            "cache_config": {"location_prefix": None, "auto_dump": True}}


def load_config(pikerag_path: Path, script: str, path: Path) -> dict[str, Any]:
    """The config as PIKE-RAG's own example script prepares it (log_dir, output paths, cache prefix)."""
    example = runpy.run_path(str(pikerag_path / "examples" / script))
    return example["load_yaml_config"](str(path), None)


def run_qa(pikerag_path: Path, path: Path) -> dict[str, Any]:
    from pikerag.workflows.qa import QaWorkflow

    config = load_config(pikerag_path, "qa.py", path)
    workflow = QaWorkflow(config)
    workflow.run()
    return {"config": config, "client": workflow._client}


def metrics_table(log_dir: Path) -> list[list[str]]:
    """PIKE-RAG's evaluator's table: a header, one row per round, then the average."""
    return [line.split(",") for line in (log_dir / "Evaluator _metrics.csv").read_text().splitlines()]


@pytest.fixture
def env(pikerag_path, api_env, no_tracking_env):
    return pikerag_path


def test_qa_workflow_two_rounds_tracked_then_rerun_from_its_cache(env, server, tmp_path):
    path = qa_config(tmp_path, "qa_server", llm_client(server_args(server, tmp_path, tracking=True)), questions=4,
                     rounds=2)
    done = run_qa(env, path)
    log_dir = Path(done["config"]["log_dir"])
    answers = read_jsonl(Path(done["config"]["test_jsonl_path"]))
    assert [a["answer"].lower() for a in answers] == [c.lower() for c in CITIES[:4]] * 2
    assert all(a["answer_metric_scores"]["ExactMatch"] == 1 for a in answers)
    table = metrics_table(log_dir)
    assert table[0][:2] == ["Round", "ExactMatch"] and [row[1] for row in table[1:]] == ["1.0", "1.0", "1.0"]
    assert server.request_count == 8  # each round has its own cache: every question asked twice
    assert {p.name for p in log_dir.glob("*.db")} == {"qa_server_round0.db", "qa_server_round1.db"}
    stats = done["client"].stats
    del done
    gc.collect()  # the workflow is gone and nobody called close(): its run ends now
    run = tracked_run(tmp_path / "runs")
    assert run.info.status == "FINISHED" and run.info.run_name == "qa_server"
    assert run.data.tags["pikeclient.source"] == "pikerag"
    assert run.data.params["pikerag.llm_config.model"] == MODEL and run.data.params["llm.model"] == MODEL
    for name, value in stats.metrics().items():  # whatever the metrics are called, the store has them all
        assert run.data.metrics[name] == pytest.approx(value), name
    assert (stats.calls, stats.measured, stats.cache_hits, stats.error_count) == (8, 8, 0, 0)
    traces = traces_of(tmp_path / "runs", run)
    assert len(traces) == 8 and traces[0].data.spans[0].span_type == "LLM"
    assert traces[0].info.token_usage["total_tokens"] > 0
    records = read_jsonl(next((log_dir / "pikeclient").glob("*/records.jsonl")))
    assert sorted(r["pikerag_cache"] for r in records) == ["qa_server_round0.db"] * 4 + ["qa_server_round1.db"] * 4

    # The same workflow again: PIKE-RAG's cache answers every question, nothing is measured.
    again = run_qa(env, path)
    assert server.request_count == 8
    stats = again["client"].stats
    assert (stats.calls, stats.cache_hits, stats.measured) == (8, 8, 0)
    again["client"].close()
    run_id = again["client"].run_id
    second = tracked_run(tmp_path / "runs", run_id)
    assert second.info.status == "FINISHED" and second.data.metrics["calls/cache_hits"] == 8
    assert traces_of(tmp_path / "runs", second) == []


def test_qa_workflow_in_a_thread_pool_attaches_every_answer_to_its_question(env, server, tmp_path):
    path = qa_config(tmp_path, "qa_threads", llm_client(server_args(server, tmp_path)), questions=8,
                     num_parallel=4)
    done = run_qa(env, path)
    answers = read_jsonl(Path(done["config"]["test_jsonl_path"]))
    assert [a["answer"].lower() for a in answers] == [c.lower() for c in CITIES]
    assert [row[1] for row in metrics_table(Path(done["config"]["log_dir"]))[1:]] == ["1.0", "1.0"]
    assert server.request_count == 8 and done["client"].stats.measured == 8


def test_tagging_workflow_tags_each_chunk_with_its_own_answer(env, server, tmp_path):
    from pikerag.workflows.tagging import TaggingWorkflow

    path = tagging_config(tmp_path, "tagging_server", llm_client(server_args(server, tmp_path)))
    workflow = TaggingWorkflow(load_config(env, "tagging.py", path))
    workflow.run()
    tagged = read_jsonl(tmp_path / "tagged.jsonl")
    assert [t["chunk_id"] for t in tagged] == ["c0", "c1"]
    for chunk in tagged:  # the echo of the chunk's own prompt: each answer went to its own chunk
        assert len(chunk["atom_questions"]) == 1 and chunk["content"] in chunk["atom_questions"][0]
    assert server.request_count == 2 and workflow._client.stats.measured == 2


def test_pikerags_qa_script_tracked_ends_its_run_at_exit_and_shows_a_failed_call(env, tmp_path):
    """examples/qa.py as PIKE-RAG's users run it: the run is FINISHED when the script ends (nobody calls
    close()); a question whose call failed after its retries is an error in the log and in the run."""
    with FakeLLMServer(api_key=API_KEY, faults=FaultPlan(script=["503", "503"])) as server:
        args = server_args(server, tmp_path, "retry.initial_delay=0.01", tracking=True, max_attempt=2)
        path = qa_config(tmp_path, "qa_script", llm_client(args), questions=4)
        environ = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        done = subprocess.run([sys.executable, str(REPO / "tests" / "integrations" / "run_pikerag.py"),
                               str(env / "examples" / "qa.py"), str(path)], cwd=tmp_path, env=environ,
                              capture_output=True, text=True, timeout=240, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "LLM call failed after 2 attempt(s), server: HTTP 503" in done.stderr
        assert server.request_count == 5
    run = tracked_run(tmp_path / "runs")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert (m["calls/total"], m["Errors/count"], m["Errors/server"], m["Errors/retries"]) == (4, 1, 1, 1)
    assert len(traces_of(tmp_path / "runs", run)) == 4  # the failed call is a trace too, with its error
    answers = read_jsonl(tmp_path / "logs" / "qa_script" / "qa_script.jsonl")
    assert [a["answer_metadata"]["response"] == "" for a in answers] == [True, False, False, False]


@pytest.mark.parametrize("ending, status", [("raise RuntimeError('workflow broke')", "FAILED"),
                                            ("raise KeyboardInterrupt", "KILLED"),
                                            ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "KILLED")])
def test_a_workflow_that_dies_leaves_its_run_failed_or_killed(env, server, tmp_path, ending, status):
    """An uncaught exception: FAILED; Ctrl-C: KILLED (both with the summary metrics); SIGTERM: KILLED by the
    tracking process, which sees its parent go."""
    args = server_args(server, tmp_path, tracking=True)
    script = tmp_path / "workflow.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(REPO / 'tests' / 'integrations')!r}]\n"
        "from pikerag_env import checkout, import_pikerag\n"
        "import_pikerag(checkout())\n"
        "from pikeclient.integrations.pikerag import PikeClientLLM\n"
        f"client = PikeClientLLM(llm_config={{'model': {MODEL!r}}}, **{args!r})\n"
        f"assert client.generate_content_with_messages([{{'role': 'user', 'content': 'hi'}}], model={MODEL!r})\n"
        f"{ending}\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode != 0
    run = ended_run(tmp_path / "runs")
    assert run.info.status == status
    if "SIGTERM" not in ending:
        assert run.data.metrics["calls/total"] == 1


def test_qa_and_tagging_workflows_on_smollm2_offline(env, tmp_path, models_dir, smollm2):
    """The local model: PIKE-RAG's issues ask for it. Two questions from two threads (batched together)."""
    from pikerag.workflows.tagging import TaggingWorkflow

    args = {"llm": "smollm2", "overrides": [f"llm.models_dir={models_dir}", f"paths.runs_dir={tmp_path / 'runs'}"],
            "tracking": True}
    path = qa_config(tmp_path, "qa_smollm2", llm_client(args, model="smollm2", max_tokens=24), questions=2,
                     num_parallel=2)
    done = run_qa(env, path)
    answers = read_jsonl(Path(done["config"]["test_jsonl_path"]))
    assert len(answers) == 2 and all(a["answer_metadata"]["response"].strip() for a in answers)
    assert len(metrics_table(Path(done["config"]["log_dir"]))) == 3
    client = done["client"]
    assert client.client.provider == "hf_local" and client.stats.measured == 2
    assert client.stats.token_sources == {"tokenizer": 2}
    client.close()
    run = tracked_run(tmp_path / "runs", client.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["tokens/completion_total"] > 0

    path = tagging_config(tmp_path, "tagging_smollm2", llm_client({**args, "tracking": False}, model="smollm2",
                                                                   max_tokens=24))
    TaggingWorkflow(load_config(env, "tagging.py", path)).run()
    tagged = read_jsonl(tmp_path / "tagged.jsonl")
    assert [t["chunk_id"] for t in tagged] == ["c0", "c1"] and all(t["atom_questions"] for t in tagged)
