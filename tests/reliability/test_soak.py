"""Scenarios 1, 7 and 11: soak, graceful SIGTERM under load, forced duplicates."""

from __future__ import annotations

import signal
import time

import pytest

from tests.reliability.conftest import BOTH_WORKERS, FleetFactory, Scale, queue_depth
from tests.reliability.ledger import sample

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@BOTH_WORKERS
def test_soak(fleet: FleetFactory, scale: Scale, batching: bool) -> None:
    """Scenario 1: 2,000 (CI) / 10,000 (full) inferences over 2 workers."""
    f = fleet(2, batching=batching)
    for i in range(scale.soak):
        f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue)
    report = f.ledger.report(timeout=60 + scale.soak * 0.02)
    assert report.lost == 0 and report.unpublished == 0
    assert report.succeeded == scale.soak and report.failed == {}
    assert report.duplicates == 0
    assert all(queue_depth(f.app, q) == 0 for q in f.queues)  # no ready or unacked left
    assert all(w.alive() for w in f.workers)


@BOTH_WORKERS
def test_sigterm_under_load(fleet: FleetFactory, scale: Scale, batching: bool) -> None:
    """Scenario 7: a warm shutdown finishes its task, returns its prefetch; 0 lost, 0 duplicates."""
    f = fleet(2, batching=batching)
    for _ in range(scale.tasks):
        f.ledger.send("tasks.diag.sleep", (0.005,), queue=f.queue)
    time.sleep(1.0)  # both workers busy
    victim = f.workers[0]
    victim.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    victim.proc.wait(timeout=30)  # type: ignore[union-attr]
    report = f.ledger.report(timeout=120, sigterm_exit_code=victim.proc.returncode)  # type: ignore[union-attr]
    assert report.lost == 0 and report.succeeded == scale.tasks
    assert report.duplicates == 0, report.line()
    assert f.workers[1].alive()


@BOTH_WORKERS
def test_forced_duplicate(fleet: FleetFactory, batching: bool) -> None:
    """Scenario 11: the same message republished runs once: exactly one SUCCESS per id."""
    f = fleet(2, batching=batching)
    ids = [f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue) for i in range(100)]
    first = f.ledger.wait(timeout=60)
    assert len(first) == 100
    for i, task_id in enumerate(ids):  # the same id, args and headers, published again
        f.app.send_task(
            "tasks.infer",
            args=("mlp", sample(i)),
            queue=f.queue,
            task_id=task_id,
            headers=f.ledger.headers,
        )
    deadline = time.monotonic() + 60
    while queue_depth(f.app, f.queue) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the last copies are acked after their dedup check
    report = f.ledger.report(timeout=30, republished=len(ids))
    assert report.succeeded == 100 and report.lost == 0
    assert report.duplicates == 0 and report.max_executions == 1
    again = f.ledger.outcomes()
    assert all(again[i]["status"] == "SUCCESS" for i in ids)
    assert all(again[i]["result"] == first[i]["result"] for i in ids)  # never overwritten
