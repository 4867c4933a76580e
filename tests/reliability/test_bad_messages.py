"""Scenarios 8 and 9: malformed messages published raw, bad inputs at scale."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest

from models.errors import MalformedMessage
from routing.queues import dead_letter_queue
from tasks.wire.codec import encode
from tests.reliability.conftest import BOTH_WORKERS, FleetFactory
from tests.reliability.ledger import sample

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


class Canary:
    """Unpickling this creates a file: proof that a pickle body was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _publish_raw(queue: str, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    params = pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(
                content_type=content_type,
                content_encoding="utf-8",
                headers=headers,
                delivery_mode=2,
            ),
        )


def _drain(app: Any, queue: str, expect: int, timeout: float = 30.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        while len(got) < expect and time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                time.sleep(0.2)
            else:
                got.append(message)
    return got


def test_malformed_messages(fleet: FleetFactory, tmp_path: Path) -> None:
    """Scenario 8: each is dead-lettered, logged and failed for its id; no canary; 500 valid succeed."""
    f = fleet(1)
    worker = f.workers[0]
    children = f.pool_children(worker)
    canary = tmp_path / "canary"
    task_headers = {"lang": "py", "task": "tasks.diag.noop", "argsrepr": "()", "kwargsrepr": "{}"}
    cases = {
        "not json": (b"{this is not json", "application/json", {**task_headers, "id": "bad-1"}),
        "unknown task": (
            json.dumps([[], {}, {}]).encode(),
            "application/json",
            {**task_headers, "task": "tasks.no_such_task", "id": "bad-2"},
        ),
        "missing headers": (json.dumps([[], {}, {}]).encode(), "application/json", {}),
        "pickle": (
            pickle.dumps(Canary(canary)),
            "application/x-python-serialize",
            {**task_headers, "id": "bad-4"},
        ),
        # kombu passes application/text on undecoded whatever accept_content says.
        "text": (
            json.dumps([[], {}, {}]).encode(),
            "application/text",
            {**task_headers, "id": "bad-5"},
        ),
    }
    for body, content_type, headers in cases.values():
        _publish_raw(f.queue, body, content_type, headers)
    dead = dead_letter_queue(f.queue)
    assert dead is not None
    dead_letters = _drain(f.app, dead, expect=len(cases))
    assert len(dead_letters) == len(cases), f"dead-lettered {len(dead_letters)} of {len(cases)}"
    reasons = {m.headers["x-death"][0]["reason"] for m in dead_letters}
    assert reasons == {"rejected"}
    assert not canary.exists(), "a pickle body was deserialised"
    log = worker.logfile.read_text()
    assert "refused a message that cannot be decoded (DecodeError" in log  # not json
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert "application/text messages are refused" in log
    assert "refused a message that names an unregistered task; task 'tasks.no_such_task'" in log
    assert "refused a message that is not a task" in log  # missing headers: no id, nothing stored
    # Every one with an id in its headers: its caller's get() raises, typed (issue 13).
    for task_id in ("bad-1", "bad-2", "bad-4", "bad-5"):
        with pytest.raises(MalformedMessage):
            f.app.AsyncResult(task_id).get(timeout=10)
    for i in range(500):
        f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue)
    report = f.ledger.report(timeout=120, malformed=len(cases))
    assert report.succeeded == 500 and report.lost == 0
    assert worker.alive() and f.pool_children(worker) == children  # no crash, no restart


def _bad_request(kind: str, i: int) -> tuple[str, Any]:
    rng = np.random.default_rng(i)
    if kind == "unknown model":
        return "resnet9000", sample(i)
    if kind == "wrong shape":
        return "mlp", encode(rng.standard_normal((1, 32)).astype(np.float32), binary=True)
    if kind == "wrong dtype":
        return "mlp", encode(rng.integers(0, 9, (1, 64)).astype(np.int64), binary=True)
    if kind == "nan":
        x = rng.standard_normal((1, 64)).astype(np.float32)
        x[0, i % 64] = np.nan
        return "mlp", encode(x, binary=True)
    # oversized: 300 x 64 float32 = 76,800 bytes over the workers' 65,536 limit
    return "mlp", encode(rng.standard_normal((300, 64)).astype(np.float32), binary=True)


EXPECTED = {
    "unknown model": "UnknownModel",
    "wrong shape": "ShapeMismatch",
    "wrong dtype": "DtypeMismatch",
    "nan": "NonFiniteInput",
    "oversized": "PayloadTooLarge",
}


@BOTH_WORKERS
def test_bad_inputs_at_scale(fleet: FleetFactory, batching: bool) -> None:
    """Scenario 9: 500 bad requests, each a typed error, 0 redeliveries, 0 crashes."""
    f = fleet(2, INFER_MAX_PAYLOAD_BYTES=str(64 * 1024), batching=batching)
    children = {w.name: f.pool_children(w) for w in f.workers}
    warm = [
        f.app.send_task("tasks.infer", ("mlp", sample(0)), queue=w.own_queue) for w in f.workers
    ]
    for result in warm:  # first tasks pay one-off imports; not what this measures
        result.get(timeout=60)
    kinds = list(EXPECTED)
    expected: dict[str, str] = {}
    latencies: list[float] = []
    for window in range(25):  # 25 windows of 20 requests in flight
        sent: dict[str, float] = {}
        for j in range(20):
            i = window * 20 + j
            kind = kinds[i % len(kinds)]
            task_id = str(uuid.uuid4())
            sent[task_id] = time.time()
            f.ledger.send("tasks.infer", _bad_request(kind, i), queue=f.queue, task_id=task_id)
            expected[task_id] = EXPECTED[kind]
        outcomes = f.ledger.wait(timeout=30, ids=list(sent))
        for task_id, meta in outcomes.items():
            done = datetime.fromisoformat(meta["date_done"]).timestamp()
            latencies.append(done - sent[task_id])
    outcomes = f.ledger.wait(timeout=30)
    wrong = {
        i: (expected[i], type(m["result"]).__name__)
        for i, m in outcomes.items()
        if m["status"] != "FAILURE" or type(m["result"]).__name__ != expected[i]
    }
    report = f.ledger.report(
        timeout=10,
        failure_p50_ms=round(float(np.percentile(latencies, 50)) * 1000, 1),
        failure_max_ms=round(max(latencies) * 1000, 1),
    )
    assert wrong == {}
    assert report.lost == 0 and sum(report.failed.values()) == 500
    assert report.max_executions == 1  # no redelivery: a typed error is final
    assert max(latencies) < 1.0  # published to stored failure, 20 in flight
    assert {w.name: f.pool_children(w) for w in f.workers} == children  # 0 worker crashes
