"""Series and traces written as rows (pikeclient.tracking.store_rows) are what MLflow's own log_batch and
log_spans write for the same calls: every row of every table, and what MLflow reads back through its API."""

import json
import logging
import sqlite3
import time

import pytest
from mlflow.entities import Metric
from mlflow.entities.span import Span

from pikeclient.tracking import store_rows
from pikeclient.tracking.process import CallLogger, MlflowRun, get_or_create_experiment, open_client

NOW = time.time()
USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42, "source": "server"}
NO_USAGE = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "source": "none"}


def record(n, **fields):
    base = {"index": n, "id": f"p{n}", "start_time": NOW + n, "latency_s": 0.25 + n / 1000, "attempts": 1,
            "error": None, "response": f"answer {n}", "finish_reason": "stop", "usage": USAGE,
            "request_id": f"{n:032x}"}
    return {**base, **fields}


# The shapes a call's trace can have: each attribute a record can carry, and texts that MLflow's
# translation treats specially (JSON inside a string, non-ASCII, long enough to be truncated in previews).
CALLS = [
    (record(0), [{"role": "user", "content": "Capital of France?"}]),
    (record(1, ttft_s=0.05, itl_s=0.01, tpot_s=0.012, send_delay_s=0.002), [{"role": "user", "content": "stream"}]),
    (record(2, error="server: HTTP 500 boom", response=None, finish_reason=None, latency_s=None, attempts=3,
            backoff_s=1.5, usage=NO_USAGE), [{"role": "user", "content": "fails"}]),
    (record(3, usage={**USAGE, "source": "tokenizer"}, session_id="conv-7", turn=2),
     [{"role": "user", "content": "turn one"}, {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "turn two"}]),
    (record(4, id='"quoted"', response='"a JSON string"'), [{"role": "user", "content": '{"json": "prompt"}'}]),
    (record(5, id="{}", response='{"a": [1, 2]}', resumed=True, request_id=None), [{"role": "user", "content": "[1]"}]),
    (record(6, response="Grüße, 東京 ✓ \u2028 \x00", usage=NO_USAGE), [{"role": "user", "content": "ünïcødé " * 200}]),
    (record(7, repeat=2, throttle_s=0.3, send_delay_s=0.0), [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": [{"type": "text", "text": "parts"}]}]),
]
TABLES = {"trace_info": "request_id", "trace_tags": "request_id, key", "trace_request_metadata": "request_id, key",
          "spans": "trace_id, span_id", "span_metrics": "trace_id, span_id, key", "trace_metrics": "request_id, key"}


def store(tmp_path, name, model="gpt-4o-mini"):
    """A fresh sqlite store with a run and its CallLogger (traces on)."""
    client = open_client(f"sqlite:///{tmp_path / name}", str(tmp_path / "artifacts"))
    experiment = get_or_create_experiment(client, "rows", str(tmp_path / "artifacts"))
    run = MlflowRun.create(client, experiment, run_name=name)
    return client, experiment, run, CallLogger(run, {"model": model, "provider": "openai"}, traces=True)


def rows(path, table, order):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def links(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT source_type, source_id, destination_type, destination_id FROM entity_associations "
                          "ORDER BY source_id").fetchall()


@pytest.mark.parametrize("model", ["gpt-4o-mini", "a-model-without-a-price"])
def test_rows_equal_what_log_spans_writes(tmp_path, model):
    _, _, run_a, rows_logger = store(tmp_path, "rows.db", model)
    client_b, _, run_b, spans_logger = store(tmp_path, "spans.db", model)
    assert rows_logger.rows is not None, "the sqlite store should take the rows path"
    spans = [rows_logger._span(r, m) for r, m in CALLS]
    for span in spans:  # the same calls in both stores: the ids come from the first run
        span["attributes"] = {k: v.replace(run_a.run_id[:8], run_b.run_id[:8]) for k, v in span["attributes"].items()}
    rows_logger._write_spans(spans[:3])  # two batches, as calls arrive
    rows_logger._write_spans(spans[3:])
    client_b._tracking_client.store.log_spans(run_b.experiment_id, [Span.from_dict(s) for s in spans])
    client_b._tracking_client.store.link_traces_to_run([s["trace_id"] for s in spans], run_b.run_id)

    assert rows_logger.unlinked == [] and len(rows_logger.trace_ids) == len(CALLS)
    for table, order in TABLES.items():
        assert rows(tmp_path / "rows.db", table, order) == rows(tmp_path / "spans.db", table, order), table
    assert links(tmp_path / "rows.db") == [(t, i, d, run_a.run_id) for t, i, d, _ in links(tmp_path / "spans.db")]


def test_mlflow_reads_the_same_traces(tmp_path):
    client_a, experiment_a, run_a, rows_logger = store(tmp_path, "rows.db")
    client_b, experiment_b, run_b, spans_logger = store(tmp_path, "spans.db")
    spans_logger.rows = None  # MLflow's own way
    rows_logger.write(CALLS)
    spans_logger.write(CALLS)
    rows_logger.close()
    spans_logger.close()
    found_a = client_a.search_traces(locations=[experiment_a], run_id=run_a.run_id, max_results=100)
    found_b = client_b.search_traces(locations=[experiment_b], run_id=run_b.run_id, max_results=100)
    assert len(found_a) == len(found_b) == len(CALLS)

    def comparable(trace, run_id):
        """The trace as MLflow reads it, less what differs between the two stores (ids, the run's own id)."""
        data = trace.to_dict()
        data["info"].pop("trace_id")
        data["info"]["tags"].pop("mlflow.artifactLocation")
        for span in data["data"]["spans"]:
            for key in ("trace_id", "span_id"):
                span.pop(key)
            span["attributes"].pop("mlflow.traceRequestId")
        return json.dumps(data, sort_keys=True).replace(run_id[:8], "RUN")

    key = lambda trace: trace.data.spans[0].attributes["pikeclient.prompt_index"]  # noqa: E731
    for a, b in zip(sorted(found_a, key=key), sorted(found_b, key=key)):
        assert comparable(a, run_a.run_id) == comparable(b, run_b.run_id)
    assert client_a.get_run(run_a.run_id).data.tags["pikeclient.traces"] == str(len(CALLS))


def test_a_span_mlflow_would_store_differently_sends_the_traces_through_log_spans(tmp_path, monkeypatch, caplog):
    client, experiment, run, calls = store(tmp_path, "rows.db")
    original = store_rows.stored_span
    monkeypatch.setattr(store_rows, "stored_span", lambda span: {**original(span), "name": "not what MLflow stores"})
    with caplog.at_level(logging.WARNING):
        calls.write(CALLS[:2])
        calls.write(CALLS[2:])
    calls.close()
    assert calls.rows is None and "log_spans from now on" in caplog.text
    assert len(client.search_traces(locations=[experiment], run_id=run.run_id, max_results=100)) == len(CALLS)
    assert rows(tmp_path / "rows.db", "spans", "trace_id")[0][4] == "chat"


def test_a_trace_already_in_the_store_is_updated_by_log_spans(tmp_path):
    # A resumed call whose trace was written before the stop: the rows' INSERT is refused, log_spans upserts.
    client, experiment, run, calls = store(tmp_path, "rows.db")
    spans = [calls._span(r, m) for r, m in CALLS[:2]]
    calls._write_spans(spans[:1])
    calls._write_spans(spans)
    calls.close()
    assert calls.rows is not None and calls.unlinked == [s["trace_id"] for s in spans]
    assert len(client.search_traces(locations=[experiment], run_id=run.run_id, max_results=100)) == 2


def test_other_stores_keep_log_spans(tmp_path, monkeypatch):
    _, _, _, calls = store(tmp_path, "rows.db")
    assert store_rows.usable(calls.store)
    monkeypatch.setattr(store_rows.mlflow, "__version__", "3.99.0")  # not read against this version's log_spans
    assert not store_rows.usable(calls.store)
    monkeypatch.setenv("MLFLOW_SQL_TRACE_ROLLUPS_ENABLED", "true")
    monkeypatch.setattr(store_rows.mlflow, "__version__", store_rows.VERIFIED_MLFLOW[0] + ".0")
    assert not store_rows.usable(calls.store)


def metric_rows(path, table):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT key, value, timestamp, step, is_nan FROM {table} "
                          "ORDER BY key, step, timestamp, value, is_nan").fetchall()


def test_series_rows_equal_what_log_batch_writes(tmp_path):
    client_a, _, run_a, rows_logger = store(tmp_path, "rows.db")
    client_b, _, run_b, _ = store(tmp_path, "batch.db")
    assert rows_logger.series_rows is not None
    t = int(NOW * 1000)
    batches = [
        [Metric("call/latency_s", 0.25, t, 0), Metric("call/latency_s", 0.5, t + 5, 2),
         Metric("call/completion_tokens", 30, t, 0), Metric("call/completion_tokens", 12, t + 5, 2),
         Metric("call/latency_s", 0.25, t, 0)],  # an exact repeat: stored once
        [Metric("call/latency_s", 0.75, t + 1, 1), Metric("call/completion_tokens", 7, t + 1, 1)],  # earlier steps
        [Metric("call/latency_s", float("nan"), t + 9, 3), Metric("call/latency_s", float("inf"), t + 9, 4),
         Metric("call/latency_s", 0.1, t + 9, 4), Metric("other", -float("inf"), t, 0),
         Metric("call/completion_tokens", 12, t + 5, 2 + 0)],  # the same latest again: no change
    ]
    for batch in batches:
        rows_logger._write_series(batch)  # the last batch repeats a value: log_batch writes that one
        client_b.log_batch(run_b.run_id, metrics=batch)
    for table in ("metrics", "latest_metrics"):
        assert metric_rows(tmp_path / "rows.db", table) == metric_rows(tmp_path / "batch.db", table), table
    assert client_a.get_run(run_a.run_id).data.metrics == client_b.get_run(run_b.run_id).data.metrics
    assert ([(m.step, str(m.value)) for m in client_a.get_metric_history(run_a.run_id, "call/latency_s")] ==
            [(m.step, str(m.value)) for m in client_b.get_metric_history(run_b.run_id, "call/latency_s")])  # nan


def test_series_already_in_the_store_go_through_log_batch(tmp_path):
    # A resumed call whose values reached MLflow before the stop: the rows' INSERT is refused, log_batch
    # leaves out what is there.
    client, _, run, calls = store(tmp_path, "rows.db")
    calls.write(CALLS[:2])
    calls.write(CALLS[:3])
    history = client.get_metric_history(run.run_id, "call/latency_s")
    assert sorted(m.step for m in history) == [0, 1]  # call 2 failed: no latency
    assert calls.series_rows is not None


def test_a_run_that_is_not_active_takes_no_series(tmp_path):
    client, _, run, calls = store(tmp_path, "rows.db")
    client.delete_run(run.run_id)
    with pytest.raises(Exception, match="active"):
        calls.write(CALLS[:1])


def test_a_writer_kept_to_its_cpu_share_pauses_and_stop_hands_back_what_it_did_not_write(tmp_path):
    # tracking.live_cpu: after each chunk the background writer pauses in proportion to the chunk's CPU; a
    # share this small would pause for ages after its first chunk, and stop() must not wait for that.
    import threading

    from pikeclient.tracking.process import Background

    _, _, _, calls = store(tmp_path, "share.db")
    writer = Background(calls, share=1e-9)
    batch = [(record(n), [{"role": "user", "content": f"q{n}"}]) for n in range(Background.CHUNK + 5)]
    writer.put(batch)
    deadline = time.monotonic() + 120
    while len(calls.trace_ids) < Background.CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls.trace_ids) == Background.CHUNK  # the first chunk, then the pause
    left: list = []
    stopping = threading.Thread(target=lambda: left.extend(writer.stop()))
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive(), "stop() waited for the writer's pause"
    assert [r["index"] for r, _ in left] == list(range(Background.CHUNK, Background.CHUNK + 5))
    calls.write(left)  # what the tracking process then writes at normal priority
    assert len(calls.trace_ids) == Background.CHUNK + 5
