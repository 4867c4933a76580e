"""Scenarios 2, 3 and 4: a worker killed, pool children killed, a poison task."""

from __future__ import annotations

import os
import signal
import time

import pytest

from models.errors import TaskCrashed
from routing.queues import dead_letter_queue
from tasks.client.routes import wait_for_workers
from tests.reliability.conftest import BOTH_WORKERS, Fleet, FleetFactory, Scale
from tests.reliability.ledger import sample
from tests.reliability.ledger_hook import POISON_HEADER

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@BOTH_WORKERS
def test_kill_one_of_two_workers(fleet: FleetFactory, scale: Scale, batching: bool) -> None:
    """Scenario 2: kill -9 one of 2 workers mid-run; its work finishes on the other."""
    f = fleet(2, batching=batching)
    victim, survivor = f.workers
    wait_for_workers(f.app.router, {w.hostname for w in f.workers})
    n = scale.tasks
    for i in range(n // 2):
        f.ledger.send("tasks.infer", ("mlp", sample(i)))  # routed: sticky direct queues
        f.ledger.send("tasks.diag.sleep", (0.01,), queue=f.queue)
    held = f.ledger.send("tasks.diag.sleep", (3.0,), queue=victim.own_queue)
    assert held is not None
    f.ledger.wait_started(held)  # the victim is running it now
    victim.kill()
    report = f.ledger.report(timeout=120 + n * 0.05)
    executions = f.ledger.executions()
    outcomes = f.ledger.outcomes()
    rerun = [i for i, count in executions.items() if count > 1]
    report.extra.update(redelivered=len(rerun))
    report.save()
    assert report.lost == 0 and report.failed == {}, report.line()
    assert report.succeeded == n + 1
    assert held in rerun  # in flight on the victim: redelivered ...
    assert all(outcomes[i]["result"]["worker"] == survivor.hostname for i in rerun)  # ... and done
    assert survivor.alive()


def test_kill_pool_child_repeatedly(fleet: FleetFactory, scale: Scale) -> None:
    """Scenario 3: kill -9 the pool child 5 times under load; 0 lost, no WorkerLostError."""
    f = fleet(2)
    target = f.workers[0]
    for _ in range(scale.tasks):
        f.ledger.send("tasks.diag.sleep", (0.01,), queue=f.queue)
    kills = 0
    killed: set[int] = set()
    for _ in range(5):
        # The worker replaces a killed child (which preloads its model first): on a busy
        # machine that can take over a second, so wait for the new one, then let it work.
        deadline = time.monotonic() + 60
        while not (fresh := [p for p in f.pool_children(target) if p not in killed]):
            assert time.monotonic() < deadline, "the worker never replaced its pool child"
            time.sleep(0.05)
        time.sleep(1.0)
        for pid in fresh:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            kills += 1
    report = f.ledger.report(timeout=180, child_kills=kills)
    assert kills >= 5
    assert report.lost == 0 and report.succeeded == scale.tasks, report.line()
    assert "WorkerLostError" not in report.failed and report.failed == {}
    assert target.alive()


@BOTH_WORKERS
def test_poison_task_is_dead_lettered(fleet: FleetFactory, rapp: object, batching: bool) -> None:
    """Scenario 4: a task that kills its process on every delivery, among 500 good ones."""
    f = fleet(2, batching=batching)
    limit = f.app.infer_settings.delivery_limit
    poison = f.ledger.send("tasks.diag.crash", queue=f.queue)
    assert poison is not None
    good = [f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue) for i in range(500)]
    with pytest.raises(TaskCrashed, match="dead-letter queue"):
        f.app.AsyncResult(poison).get(timeout=120)
    outcomes = f.ledger.wait(timeout=120, ids=[g for g in good if g])
    assert sum(1 for m in outcomes.values() if m["status"] == "SUCCESS") == 500
    deliveries = f.ledger.executions()[poison]
    assert 1 < deliveries <= limit + 1  # redelivered, then stopped at the limit
    dead_ids = dead_lettered(f)
    assert dead_ids == [poison]  # the poison task, and no good task, was dead-lettered
    report = f.ledger.report(timeout=10, poison_deliveries=deliveries, delivery_limit=limit)
    assert report.lost == 0 and report.failed == {"TaskCrashed": 1}
    assert all(w.alive() for w in f.workers)


def test_poison_request_inside_a_batch_takes_no_batch_mate_down(fleet: FleetFactory) -> None:
    """A request that kills its process, riding in a batch of good ones: only it is dead-lettered.

    The child is held by a sleep task while 300 good requests and the poison
    arrive, so they wait together and leave in batches.  The poison's batch
    dies with the child: every message of it is redelivered, each then runs
    alone, so the poison dies alone until its delivery limit and its
    batch-mates succeed.
    """
    f = fleet(1, batching=True)
    limit = f.app.infer_settings.delivery_limit
    f.ledger.send("tasks.diag.sleep", (1.5,), queue=f.queue)
    good = [f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue) for i in range(20)]
    poison = f.ledger.send(
        "tasks.infer", ("mlp", sample(999)), queue=f.queue, headers={POISON_HEADER: True}
    )
    assert poison is not None
    good += [
        f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue) for i in range(20, 300)
    ]
    with pytest.raises(TaskCrashed, match="dead-letter queue"):
        f.app.AsyncResult(poison).get(timeout=180)
    outcomes = f.ledger.wait(timeout=180, ids=[g for g in good if g])
    assert sum(1 for m in outcomes.values() if m["status"] == "SUCCESS") == 300
    executions = f.ledger.executions()
    assert 1 < executions[poison] <= limit + 1
    batch_mates = [g for g in good if g and executions.get(g, 0) > 1]
    assert batch_mates, "the poison never shared a batch: nothing was redelivered with it"
    served_in = {outcomes[g]["result"]["forward_batch"] for g in good if g in outcomes}
    assert max(served_in) > 1  # the good requests were batched
    assert all(outcomes[g]["result"]["forward_batch"] == 1 for g in batch_mates)  # rerun alone
    dead_ids = dead_lettered(f)
    assert dead_ids == [poison]  # 0 good requests dead-lettered
    report = f.ledger.report(
        timeout=10, poison_deliveries=executions[poison], batch_mates_redelivered=len(batch_mates)
    )
    report.save()
    assert report.lost == 0 and report.failed == {"TaskCrashed": 1}, report.line()
    assert all(w.alive() for w in f.workers)


def dead_lettered(f: Fleet, wait_s: float = 30.0) -> list[str]:
    """Task ids in the fleet's dead-letter queue (taken off it), waiting up to ``wait_s`` for one."""
    dead = dead_letter_queue(f.queue)
    assert dead is not None
    dead_ids: list[str] = []
    deadline = time.monotonic() + wait_s
    with f.app.connection_for_write() as conn:
        channel = conn.default_channel
        while time.monotonic() < deadline and not dead_ids:
            while (message := channel.basic_get(dead, no_ack=True)) is not None:
                dead_ids.append(message.headers["id"])
            time.sleep(0.2)
    return dead_ids
