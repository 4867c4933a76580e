"""Scenario 10: chords of 100 with a failing header task, and with a header task's worker killed."""

from __future__ import annotations

import time
import uuid

import pytest
from celery import chord

from tests.reliability.conftest import BOTH_WORKERS, FleetFactory

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@BOTH_WORKERS
def test_chord_with_a_failing_header(fleet: FleetFactory, batching: bool) -> None:
    """One header task raises: the body never runs and the errback runs exactly once."""
    f = fleet(2, batching=batching)
    # The client refuses bad inference inputs before publishing, so the failing
    # header task is one only the worker can refuse: a negative sleep.
    header = [
        f.app.signature(
            "tasks.diag.sleep",
            args=(-1.0 if i == 37 else 0.001,),
            queue=f.queue,
            headers=f.ledger.headers,
        )
        for i in range(100)
    ]
    errback_id = str(uuid.uuid4())
    errback = f.app.signature(
        "tasks.diag.on_error", queue=f.queue, headers=f.ledger.headers, task_id=errback_id
    )
    body = f.app.signature("tasks.diag.count", queue=f.queue, headers=f.ledger.headers)
    body.link_error(errback)
    joined = chord(header, app=f.app)(body)
    header_ids = [r.id for r in joined.parent.results]
    f.ledger.ids += header_ids
    f.ledger.wait(timeout=60)
    deadline = time.monotonic() + 30
    while f.ledger.executions().get(errback_id, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # room for a second (wrong) errback run to show up
    executions = f.ledger.executions()
    report = f.ledger.report(
        timeout=10,
        body_runs=executions.get(joined.id, 0),
        errback_runs=executions.get(errback_id, 0),
    )
    assert report.failed == {"RequestError": 1} and report.succeeded == 99
    assert executions.get(joined.id, 0) == 0  # the body never ran
    assert executions.get(errback_id, 0) == 1  # the errback ran exactly once
    assert f.ledger.outcomes([errback_id])[errback_id]["status"] == "SUCCESS"
    assert f.ledger.outcomes([joined.id])[joined.id]["status"] == "FAILURE"


@BOTH_WORKERS
def test_chord_survives_a_killed_header_worker(fleet: FleetFactory, batching: bool) -> None:
    """A header task's worker is killed mid-task: the body runs once, with 100 results."""
    f = fleet(2, batching=batching)
    victim, survivor = f.workers
    held_id = str(uuid.uuid4())
    header = [
        f.app.signature("tasks.diag.sleep", args=(0.02,), queue=f.queue, headers=f.ledger.headers)
        for _ in range(99)
    ]
    header.append(
        f.app.signature(
            "tasks.diag.sleep",
            args=(3.0,),
            queue=victim.own_queue,
            headers=f.ledger.headers,
            task_id=held_id,
        )
    )
    body = f.app.signature("tasks.diag.count", queue=f.queue, headers=f.ledger.headers)
    joined = chord(header, app=f.app)(body)
    f.ledger.ids += [r.id for r in joined.parent.results] + [joined.id]
    f.ledger.wait_started(held_id)
    victim.kill()
    report = f.ledger.report(timeout=120)
    executions = f.ledger.executions()
    assert report.lost == 0 and report.failed == {}, report.line()
    assert executions[held_id] == 2  # redelivered after the kill
    assert executions[joined.id] == 1  # the body ran exactly once
    result = f.ledger.outcomes([joined.id])[joined.id]["result"]
    assert result["count"] == 100 and result["worker"] == survivor.hostname
