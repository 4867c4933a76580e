"""Deadlines and revocation against real RabbitMQ, Redis and worker processes (issue 17).

A request whose deadline passes while it waits is never computed: its
caller's ``get()`` raises :class:`~models.errors.DeadlineExceeded` (state
FAILURE, not Celery's bare REVOKED), and the worker counts it in
``infer_requests_total{outcome="DeadlineExceeded"}``.  A request already past
its deadline is refused at submit, and nothing is published.  A request
revoked with ``AsyncResult.revoke()`` is never computed either, and stays
Celery's REVOKED (``TaskRevokedError``).

"Never computed" is proved, not read off the result: the workers load the
fault suite's execution ledger (``--include tests.reliability.ledger_hook``),
which counts each request whose body starts; a request dropped by the
worker's consumer has no entry.  Its batch-mates' ``forward_batch`` and the
worker's ``infer_batch_size`` histogram (one sample per forward pass) say how
many samples the forward passes really took, which also covers the last hop:
the pool child's check just before the forward pass.

To make requests wait, a test holds the worker's one pool child with
``tasks.diag.sleep``: what arrives meanwhile waits in the worker (a batching
worker's batcher) or in its queue (a worker that does not batch reserves one
message per queue).
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from models import errors
from routing.queues import dead_letter_queue, direct_queue
from tasks import app, infer, sleep
from tasks.ops.launcher import WorkerProcess, free_port
from tasks.wire.deadline import DEADLINE_HEADER
from tasks.wire.topology import remove_topology
from tasks.worker.command import worker_argv
from tests.integration.conftest import WorkerFactory, eventually, queue_depth
from tests.integration.plain_client import plain_client, publishes
from tests.integration.test_batching import hold_child, mlp_sample
from tests.integration.test_metrics import scrape, value
from tests.reliability.ledger_hook import LEDGER_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEDGER = ["--include", "tests.reliability.ledger_hook"]
GET_TIMEOUT = 30.0
SHORT_S = 0.3  # a deadline that passes while the pool child is held (seconds)
FULL = 8  # the batching worker's largest mlp batch


@dataclass
class Served:
    """A worker of this module and its ``/metrics`` port."""

    worker: WorkerProcess
    port: int

    @property
    def fallback(self) -> str:
        """Its class queue (where its direct queue dead-letters expired messages)."""
        return self.worker.consumed_queues[1]

    def counts(self) -> dict[str, float]:
        """What its ``/metrics`` says about mlp: outcomes, forward passes and their samples."""
        m = scrape(self.port)
        return {
            "success": value(m, "infer_requests_total", model="mlp", outcome="success"),
            "DeadlineExceeded": value(
                m, "infer_requests_total", model="mlp", outcome="DeadlineExceeded"
            ),
            "passes": value(m, "infer_batch_size_count", model="mlp"),
            "samples": value(m, "infer_batch_size_sum", model="mlp"),
        }


def served(name: str, logdir: Path, *, batching: bool, **env: str) -> Iterator[Served]:
    """Run a worker (mlp, the ledger, metrics on a free port) for a module; check it cleaned up."""
    port = free_port()
    queues = [direct_queue(name, name), name]
    worker = WorkerProcess(
        name,
        "cpu",
        logdir=logdir,
        batching=batching,
        queues=queues,
        preload=("mlp",),
        command=[*worker_argv(name, "cpu", queues), *LEDGER],
        env={**os.environ, "INFER_METRICS_PORT": str(port), **env},
    )
    try:
        worker.start().wait_ready()
        yield Served(worker, port)
    finally:
        worker.stop()
        depths = {q: queue_depth(q) for q in queues}
        remove_topology(app, queues)
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"


@pytest.fixture(scope="module")
def batching(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[Served]:
    yield from served(
        f"dlb-{run_id}",
        tmp_path_factory.mktemp("dl-batching"),
        batching=True,
        INFER_MAX_BATCH_SIZE=str(FULL),  # mlp's batches (its model.toml sets no cap)
        INFER_BATCH_SIZING="false",
    )


@pytest.fixture(scope="module")
def single(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[Served]:
    """A worker that does not batch: one request per pool job."""
    yield from served(f"dls-{run_id}", tmp_path_factory.mktemp("dl-single"), batching=False)


@pytest.fixture(scope="module")
def stock() -> Iterator[Celery]:
    """A client that imports nothing of this project: it sends the deadline header as it is."""
    with plain_client() as client:
        yield client


def iso_in(seconds: float) -> str:
    """An absolute ISO 8601 time ``seconds`` from now (the header's string form)."""
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


def received(worker: WorkerProcess, task_id: str) -> bool:
    """Whether ``worker`` has taken the message of ``task_id`` off its queue (its log says so)."""
    return f"[{task_id}] received" in worker.log_tail(400)


def drained(queue: str) -> bool:
    """Whether no message of ``queue`` is ready (its consumers hold them all)."""
    return queue_depth(queue) == 0


def new_ledger() -> str:
    return f"infer:ledger:deadlines:{uuid.uuid4().hex[:8]}"


def executions(ledger: str) -> dict[str, int]:
    """Task id -> how many times its body started, from the ledger (deleted once read)."""
    client = app.backend.client
    found = {k.decode(): int(v) for k, v in client.hgetall(ledger).items()}
    client.delete(ledger)
    return found


def stock_late(client: Celery, queue: str, ledger: str, i: int) -> AsyncResult:
    """A request from the stock client with only a ``deadline`` header (ISO), due in SHORT_S."""
    return client.send_task(
        "tasks.infer",
        args=["mlp", mlp_sample(i).tolist()],
        queue=queue,
        declare=[],  # the worker declared its queues; a plain producer only publishes
        headers={LEDGER_HEADER: ledger, DEADLINE_HEADER: iso_in(SHORT_S)},
    )


def assert_deadline_exceeded(result: AsyncResult) -> None:
    with pytest.raises(errors.DeadlineExceeded, match="it was not computed"):
        result.get(timeout=GET_TIMEOUT)
    assert result.state == "FAILURE"


def dropped(s: Served, before: dict[str, float], n: int) -> dict[str, float]:
    """What the worker counted since ``before``, once it counts ``n`` drops (synced at scrape)."""

    def since() -> dict[str, float] | None:
        now = s.counts()
        counted = {k: now[k] - before[k] for k in now}
        return counted if counted["DeadlineExceeded"] >= n else None

    found: dict[str, float] = eventually(
        since, timeout=15, what=f"{s.worker.name}'s /metrics counting {n} dropped requests"
    )
    return found


def test_requests_past_their_deadline_in_a_batch_are_never_computed(
    batching: Served, stock: Celery
) -> None:
    worker, q = batching.worker, batching.worker.own_queue
    ledger = new_ledger()
    before = batching.counts()
    held = hold_child(worker, seconds=2.0)
    tag = {LEDGER_HEADER: ledger}
    live = [infer.apply_async(("mlp", mlp_sample(i)), queue=q, headers=dict(tag)) for i in range(4)]
    late = [
        # Every form of deadline: expires= (seconds), the header in ms and as an ISO time,
        infer.apply_async(("mlp", mlp_sample(10)), queue=q, headers=dict(tag), expires=SHORT_S),
        infer.apply_async(
            ("mlp", mlp_sample(11)), queue=q, headers={**tag, DEADLINE_HEADER: SHORT_S * 1000}
        ),
        infer.apply_async(
            ("mlp", mlp_sample(12)), queue=q, headers={**tag, DEADLINE_HEADER: iso_in(SHORT_S)}
        ),
        # and the header alone from a stock client (no expires=, nothing normalised).
        stock_late(stock, q, ledger, 13),
    ]
    held.get(timeout=GET_TIMEOUT)
    for r in late:
        assert_deadline_exceeded(r)
    replies = [r.get(timeout=GET_TIMEOUT) for r in live]
    # The four live requests shared one forward pass, and no late one rode in it.
    assert [r["forward_batch"] for r in replies] == [4, 4, 4, 4]
    assert executions(ledger) == {r.id: 1 for r in live}  # the late ones never started
    counted = dropped(batching, before, len(late))
    assert counted == {"success": 4, "DeadlineExceeded": 4, "passes": 1, "samples": 4}


def test_a_full_batch_queued_for_the_child_is_dropped_before_its_forward_pass(
    batching: Served,
) -> None:
    worker, q = batching.worker, batching.worker.own_queue
    before = batching.counts()
    held = hold_child(worker, seconds=2.0)
    # A full batch cannot grow by waiting: it goes to the pool's queue at once, before its
    # deadline, and waits there behind the held child until the deadline has passed.
    full = [infer.apply_async(("mlp", mlp_sample(i)), queue=q, expires=0.8) for i in range(FULL)]
    held.get(timeout=GET_TIMEOUT)
    for r in full:
        with pytest.raises(errors.DeadlineExceeded, match="before its forward pass"):
            r.get(timeout=GET_TIMEOUT)
        assert r.state == "FAILURE"
    counted = dropped(batching, before, FULL)
    # No forward pass ran: the child checked each request just before it.
    assert counted == {"success": 0, "DeadlineExceeded": FULL, "passes": 0, "samples": 0}


def test_a_worker_that_does_not_batch_never_computes_them_either(
    single: Served, stock: Celery
) -> None:
    worker, q = single.worker, single.worker.own_queue
    ledger = new_ledger()
    before = single.counts()
    held = hold_child(worker, seconds=1.5)
    tag = {LEDGER_HEADER: ledger}
    # They wait in the broker behind the held one (one reserved message per queue).
    late = [
        infer.apply_async(("mlp", mlp_sample(i)), queue=q, headers=dict(tag), expires=SHORT_S)
        for i in range(2)
    ]
    late.append(stock_late(stock, q, ledger, 2))
    live = infer.apply_async(("mlp", mlp_sample(3)), queue=q, headers=dict(tag))
    revoked = infer.apply_async(("mlp", mlp_sample(4)), queue=q, headers=dict(tag))
    revoked.revoke()  # still queued: the worker drops it when it arrives
    held.get(timeout=GET_TIMEOUT)
    for r in late:
        assert_deadline_exceeded(r)
    assert live.get(timeout=GET_TIMEOUT)["forward_batch"] == 1
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=GET_TIMEOUT)
    assert revoked.state == "REVOKED"
    assert executions(ledger) == {live.id: 1}
    counted = dropped(single, before, len(late))
    assert counted == {"success": 1, "DeadlineExceeded": 3, "passes": 1, "samples": 1}


PAST: dict[str, Any] = {
    "expires -1 s": lambda: {"expires": -1},
    "expires 0": lambda: {"expires": 0},
    "expires a datetime": lambda: {"expires": datetime.now(UTC) - timedelta(seconds=1)},
    "expires ISO": lambda: {"expires": "2020-01-01T00:00:00+00:00"},
    "deadline 0 ms": lambda: {"headers": {DEADLINE_HEADER: 0}},
    "deadline -5 ms": lambda: {"headers": {DEADLINE_HEADER: -5}},
    "deadline ISO": lambda: {"headers": {DEADLINE_HEADER: "2020-01-01T00:00:00Z"}},
}


@pytest.mark.parametrize("path", ["apply_async", "send_task", "routed"])
@pytest.mark.parametrize("form", list(PAST))
def test_an_already_past_deadline_is_refused_at_submit(
    batching: Served, form: str, path: str
) -> None:
    q = batching.worker.own_queue
    options = PAST[form]()
    x = mlp_sample(1)
    calls = {
        "apply_async": lambda: infer.apply_async(("mlp", x), queue=q, **options),
        "send_task": lambda: app.send_task("tasks.infer", args=("mlp", x), queue=q, **options),
        "routed": lambda: infer.apply_async(("mlp", x), **options),  # before the router runs
    }
    before = queue_depth(q)
    with (
        publishes() as sent,
        pytest.raises(errors.DeadlineExceeded, match="before it was published"),
    ):
        calls[path]()
    assert sent == []
    assert queue_depth(q) == before == 0


def test_revoking_batched_requests_on_two_workers(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    fallback = f"rv-{run_id}"
    env = {**os.environ, "INFER_MAX_WAIT_MS": "5000"}  # a batch would wait for more requests
    workers = []
    for name in (f"rva-{run_id}", f"rvb-{run_id}"):
        queues = [direct_queue(fallback, name), fallback]
        workers.append(
            worker_factory(
                name,
                queues,
                batching=True,
                preload=("mlp",),
                command=[*worker_argv(name, "cpu", queues), *LEDGER],
                env=env,
            )
        )
    for w in workers:
        w.wait_ready()
    ledger = new_ledger()
    holds = [hold_child(w, seconds=2.5) for w in workers]
    batches = [
        [
            infer.apply_async(
                ("mlp", mlp_sample(10 * k + i)), queue=w.own_queue, headers={LEDGER_HEADER: ledger}
            )
            for i in range(5)
        ]
        for k, w in enumerate(workers)
    ]
    targets = [batch[2] for batch in batches]
    for w in workers:  # taken off its queue while its child is held: each waits in its batcher
        eventually(
            functools.partial(drained, w.own_queue),
            timeout=15,
            what=f"{w.name} to take its requests off its queue",
        )
    for target in targets:
        target.revoke()  # a broadcast: each worker drops the one it holds
    for held in holds:
        held.get(timeout=GET_TIMEOUT)
    for target in targets:
        with pytest.raises(TaskRevokedError):
            target.get(timeout=GET_TIMEOUT)
        assert target.state == "REVOKED"
    for w, batch, target in zip(workers, batches, targets, strict=True):
        mates = [r for r in batch if r is not target]
        replies = [r.get(timeout=GET_TIMEOUT) for r in mates]
        assert {r["worker"] for r in replies} == {w.hostname}
        assert [r["forward_batch"] for r in replies] == [4, 4, 4, 4]  # the revoked one not in it
    ran = executions(ledger)
    assert ran == {r.id: 1 for batch in batches for r in batch if r not in targets}


def test_a_request_that_expires_waiting_in_a_class_queue_gets_deadline_exceeded(
    single: Served,
) -> None:
    worker, fallback = single.worker, single.fallback
    dead = dead_letter_queue(fallback)
    assert dead is not None
    held = hold_child(worker, seconds=1.5)  # its direct queue's one reserved message
    blocker = sleep.apply_async((0.2,), queue=fallback)  # and its class queue's
    eventually(
        functools.partial(received, worker, blocker.id),
        timeout=15,
        what="the worker to reserve the class queue's blocker",
    )
    late = infer.apply_async(("mlp", mlp_sample(1)), queue=fallback, expires=SHORT_S)
    try:
        held.get(timeout=GET_TIMEOUT)
        blocker.get(timeout=GET_TIMEOUT)
        eventually(
            lambda: late.ready() or queue_depth(dead) > 0,
            timeout=GET_TIMEOUT,
            what="the late request answered or dead-lettered",
        )
        assert queue_depth(dead) == 0, f"the broker dead-lettered the late request to {dead}"
        assert_deadline_exceeded(late)
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(dead)
