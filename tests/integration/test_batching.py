"""The batching worker (tasks.worker.strategy) against real RabbitMQ, Redis and worker processes.

Each request of a batch keeps its own task id, state, result, events and ack.
To make requests wait together in a batch, a test first holds the worker's
pool child with ``tasks.diag.sleep``: everything that arrives meanwhile waits
in the main process and leaves as batches once the child is free.  The worker
loads the fault suite's execution ledger (``--include``), so a test can prove
that a request was never computed.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import chord
from celery.exceptions import TaskRevokedError

from models import errors
from models.runner import reference_forward
from routing.queues import direct_queue
from tasks import app, infer, infer_many
from tasks.canvas import ManyResult, gather
from tasks.diagnostics import count, sleep
from tasks.ops.launcher import WorkerProcess, free_port
from tasks.wire.topology import remove_topology
from tasks.worker.command import worker_argv
from tests.integration.conftest import eventually, queue_depth
from tests.integration.flower_server import running_flower
from tests.integration.test_metrics import scrape, value
from tests.reliability.ledger_hook import LEDGER_HEADER
from tests.specs import spec_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEDGER = ["--include", "tests.reliability.ledger_hook"]


METRICS_PORT = free_port()


def batching_process(name: str, logdir: Path, **env: str) -> WorkerProcess:
    queues = [direct_queue(name, name), name]
    return WorkerProcess(
        name,
        "cpu",
        logdir=logdir,
        batching=True,
        queues=queues,
        preload=("cnn", "mlp"),
        command=[*worker_argv(name, "cpu", queues), *LEDGER],
        env={**os.environ, "INFER_TASK_EVENTS": "true", **env},
    )


@pytest.fixture(scope="module")
def batching_worker(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[WorkerProcess]:
    w = batching_process(
        f"bw-{run_id}", tmp_path_factory.mktemp("batching"), INFER_METRICS_PORT=str(METRICS_PORT)
    )
    with w:
        yield w
    remove_topology(app, w.consumed_queues)


def hold_child(worker: WorkerProcess, seconds: float = 1.5) -> Any:
    """Keep the pool child busy, so the requests sent next wait together in a batch."""
    held = sleep.apply_async((seconds,), queue=worker.own_queue)
    eventually(lambda: _started(worker, held.id), timeout=30, what="the sleep task to start")
    return held


def _started(worker: WorkerProcess, task_id: str) -> bool:
    # An idle worker sends a received task straight to its pool child.
    return f"{task_id}] received" in worker.log_tail(400) or app.AsyncResult(task_id).ready()


def mlp_sample(i: int) -> np.ndarray:
    return np.full(64, i / 100, np.float32)


def test_500_concurrent_requests_batch_and_match_unbatched(
    batching_worker: WorkerProcess, weights_dir: Path
) -> None:
    x = np.random.default_rng(5).standard_normal((500, 3, 32, 32), dtype=np.float32)
    result = infer.map("cnn", x, queue=batching_worker.own_queue)  # 500 in flight at once
    replies = result.get(timeout=180)
    got = np.concatenate(
        [np.frombuffer(r["outputs"]["data"], np.float32).reshape(1, 10) for r in replies]
    )
    expected = reference_forward(spec_of("cnn"), x)
    assert np.allclose(got, expected, atol=1e-4)
    sizes = [r["forward_batch"] for r in replies]
    assert max(sizes) > 1 and sum(s > 1 for s in sizes) > 250  # most rode in a shared pass
    assert all(r["batch_size"] == 1 for r in replies)  # each is still its own task and result
    assert len(set(result.ids)) == 500
    assert all(app.AsyncResult(i).state == "SUCCESS" for i in result.ids[:20])
    # Prometheus counts every request, and fewer forward passes than requests.
    samples = scrape(METRICS_PORT)
    assert value(samples, "infer_requests_total", model="cnn", outcome="success") >= 500
    passes = value(samples, "infer_batch_size_count", model="cnn")
    assert 0 < passes < 500
    assert value(samples, "infer_batch_size_sum", model="cnn") >= 500


def test_a_bad_request_in_a_batch_fails_alone(batching_worker: WorkerProcess) -> None:
    q = batching_worker.own_queue
    held = hold_child(batching_worker)
    good = [infer.apply_async(("mlp", mlp_sample(i)), queue=q) for i in range(10)]
    bad_env = {"dtype": "float32", "shape": [64], "data": [float("nan")] * 64}
    bad = app.send_task("tasks.infer", args=("mlp", bad_env), queue=q)
    good += [infer.apply_async(("mlp", mlp_sample(i)), queue=q) for i in range(10, 20)]
    held.get(timeout=30)
    with pytest.raises(errors.NonFiniteInput):
        bad.get(timeout=60)
    replies = [p.get(timeout=60) for p in good]
    assert all(r["batch_size"] == 1 for r in replies)
    assert max(r["forward_batch"] for r in replies) == 20  # all good ones in the bad one's pass
    assert batching_worker.alive()


def test_a_chord_whose_header_was_batched_runs_its_body_once(
    batching_worker: WorkerProcess,
) -> None:
    q = batching_worker.own_queue
    held = hold_child(batching_worker)
    header = [infer.s("mlp", mlp_sample(i)).set(queue=q) for i in range(12)]
    result = chord(header)(count.s().set(queue=q))
    held.get(timeout=30)
    assert result.get(timeout=60)["count"] == 12
    parts = [r.get(timeout=10) for r in result.parent.results]
    assert max(p["forward_batch"] for p in parts) > 1  # the header parts shared passes
    # The worker logs the success just after storing the result the get() above read.
    eventually(
        lambda: f"tasks.diag.count[{result.id}] succeeded" in batching_worker.log_tail(2000),
        timeout=10,
        what="the chord body's success in the worker's log",
    )
    time.sleep(0.5)  # a second run, were there one, would follow at once
    ran = re.findall(
        rf"tasks\.diag\.count\[{result.id}\] succeeded", batching_worker.log_tail(2000)
    )
    assert len(ran) == 1


def test_infer_many_through_a_chord_and_a_failing_chunk_named_by_range(
    batching_worker: WorkerProcess, weights_dir: Path
) -> None:
    q = batching_worker.own_queue
    x = np.random.default_rng(9).standard_normal((2000, 64), dtype=np.float32)
    result = infer_many("mlp", x, batch_size=128, queue=q)
    assert np.allclose(result.get(timeout=180), reference_forward(spec_of("mlp"), x), atol=1e-4)
    good = np.zeros((10, 64), np.float32)
    # The middle chunk asks for fp16: it passes the client's checks, and a CPU worker refuses it.
    header = [
        infer.s("mlp", good).set(queue=q),
        infer.s("mlp", good, "fp16").set(queue=q),
        infer.s("mlp", good).set(queue=q),
    ]
    body = chord(header)(gather.s().set(queue=q))
    failing = ManyResult(body, body.parent, [(0, 10), (10, 20), (20, 30)])
    with pytest.raises(errors.ChunkFailed, match=r"inputs \[10:20\] failed: UnsupportedDtype"):
        failing.get(timeout=60)
    assert set(failing.partial()) == {(0, 10), (20, 30)}


def test_infer_many_refuses_a_bad_chunk_before_publishing(batching_worker: WorkerProcess) -> None:
    x = np.zeros((300, 64), np.float32)
    x[250, 3] = np.inf
    before = queue_depth(batching_worker.own_queue)
    with pytest.raises(errors.NonFiniteInput, match=r"inputs \[200:300\]"):
        infer_many("mlp", x, batch_size=100, queue=batching_worker.own_queue)
    assert queue_depth(batching_worker.own_queue) == before == 0


def test_a_revoked_or_expired_request_waiting_in_a_batch_is_never_computed(
    batching_worker: WorkerProcess,
) -> None:
    q = batching_worker.own_queue
    ledger = f"infer:ledger:batching:{uuid.uuid4().hex[:8]}"
    headers = {LEDGER_HEADER: ledger}
    held = hold_child(batching_worker, seconds=2.0)
    pending = [
        infer.apply_async(("mlp", mlp_sample(i)), queue=q, headers=dict(headers)) for i in range(6)
    ]
    expiring = infer.apply_async(
        ("mlp", mlp_sample(7)), queue=q, headers=dict(headers), expires=0.5
    )
    revoked = pending[3]
    revoked.revoke()  # arrives while it waits in the main process for the child
    held.get(timeout=30)
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=30)
    # Past its deadline (expires=): the typed DeadlineExceeded, not Celery's bare REVOKED.
    with pytest.raises(errors.DeadlineExceeded):
        expiring.get(timeout=30)
    assert revoked.state == "REVOKED" and expiring.state == "FAILURE"
    others = [p.get(timeout=30) for i, p in enumerate(pending) if i != 3]
    assert len(others) == 5
    client = app.backend.client
    executions = {k.decode(): int(v) for k, v in client.hgetall(ledger).items()}
    client.delete(ledger)
    assert revoked.id not in executions and expiring.id not in executions  # never computed
    assert all(executions.get(p.id) == 1 for i, p in enumerate(pending) if i != 3)


def test_flower_lists_every_request_of_a_batch(
    batching_worker: WorkerProcess, tmp_path: Path
) -> None:
    with running_flower(tmp_path) as flower:
        eventually(
            lambda: batching_worker.hostname in flower.api("/api/workers?refresh=1"),
            what=f"{batching_worker.hostname} in /api/workers",
        )
        q = batching_worker.own_queue
        held = hold_child(batching_worker)
        sent = [infer.apply_async(("mlp", mlp_sample(i)), queue=q) for i in range(16)]
        bad_env = {"dtype": "float32", "shape": [64], "data": [float("nan")] * 64}
        bad = app.send_task("tasks.infer", args=("mlp", bad_env), queue=q)  # in the same batch
        held.get(timeout=30)
        replies = [p.get(timeout=60) for p in sent]
        assert max(r["forward_batch"] for r in replies) > 1
        with pytest.raises(errors.NonFiniteInput):
            bad.get(timeout=60)

        def listed() -> dict[str, Any] | None:
            tasks = flower.api("/api/tasks")
            states = {p.id: (tasks.get(p.id) or {}).get("state") for p in sent}
            done = all(s == "SUCCESS" for s in states.values())
            return tasks if done and (tasks.get(bad.id) or {}).get("state") == "FAILURE" else None

        tasks = eventually(listed, what="the batch as SUCCESS and its bad request as FAILURE")
        for p in sent:
            task = tasks[p.id]
            assert task["name"] == "tasks.infer" and task["worker"] == batching_worker.hostname
            assert task["received"] and task["started"] and task["succeeded"]
            assert "<tensor" in task["result"] and "\\x" not in task["result"]
        assert "NonFiniteInput" in tasks[bad.id]["exception"]  # its own task-failed event


def test_worker_killed_mid_batch_loses_none_of_500(run_id: str, tmp_path: Path) -> None:
    name, fallback = f"bk-{run_id}", f"bk-{run_id}"
    queues = [direct_queue(fallback, name), fallback]
    victim = WorkerProcess(
        name, "cpu", logdir=tmp_path, batching=True, queues=queues, preload=("cnn",)
    )
    rescuer = WorkerProcess(
        f"br-{run_id}",
        "cpu",
        logdir=tmp_path,
        batching=True,
        queues=[direct_queue(fallback, f"br-{run_id}"), fallback],
        preload=("cnn",),
    )
    try:
        victim.start().wait_ready()
        held = hold_child(victim, seconds=1.0)  # the 500 are all delivered or queued first
        x = np.random.default_rng(3).standard_normal((500, 3, 32, 32), dtype=np.float32)
        result = infer.map("cnn", x, queue=victim.own_queue)
        pending = [app.AsyncResult(i) for i in result.ids]
        held.get(timeout=30)
        deadline = time.monotonic() + 60
        while not pending[0].ready():  # the first batch is stored, the next is in the child
            assert time.monotonic() < deadline
            time.sleep(0.002)
        victim.kill()
        done_before = sum(p.ready() for p in pending)
        assert done_before < 500, "the victim finished everything before it was killed"
        rescuer.start().wait_ready()  # consumes the fallback queue the direct queue dead-letters to
        replies = [p.get(timeout=180) for p in pending]
        assert len(replies) == 500 and all(r["model"] == "cnn" for r in replies)
        assert {r["worker"] for r in replies} <= {victim.hostname, rescuer.hostname}
        assert any(r["worker"] == rescuer.hostname for r in replies)
    finally:
        victim.stop()
        rescuer.stop()
        remove_topology(app, [*queues, direct_queue(fallback, f"br-{run_id}")])
