"""A worker stopped mid-task: ``kill -9`` redelivers the task to another, a warm stop finishes it.

``kill -9``: acks_late + reject_on_worker_lost redeliver it.  ``WorkerProcess.stop``
(SIGTERM to the main process, Celery's warm shutdown): the task ends, its result
is stored and its message acked, so nothing is left to redeliver.
"""

from __future__ import annotations

import os
import time

import pytest

from tasks import sleep
from tests.integration.conftest import WorkerFactory, queue_depth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_task_of_a_killed_worker_finishes_on_the_other(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    queue = f"loss-{run_id}"
    # STARTED states (off by default) tell which worker holds the task.
    env = dict(os.environ, INFER_TRACK_STARTED="true")
    workers = [worker_factory(f"k{i}-{run_id}", [queue], env=env) for i in (1, 2)]
    for w in workers:
        w.wait_ready()
    res = sleep.apply_async((4.0,), queue=queue)  # workers track STARTED (see env above)
    deadline = time.monotonic() + 60
    while res.state != "STARTED":
        assert time.monotonic() < deadline, f"task never started (state {res.state})"
        time.sleep(0.05)
    owner_host = res.info["hostname"]
    victim = next(w for w in workers if w.hostname == owner_host)
    survivor = next(w for w in workers if w is not victim)
    victim.kill()  # SIGKILL to the worker and its pool child, mid-task
    assert not victim.alive()
    done = res.get(timeout=60)
    assert done["worker"] == survivor.hostname
    assert done["redelivered"] is True
    assert survivor.alive()


def test_stop_finishes_the_running_task_and_acks_it(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    # A SIGTERM to the worker's whole session killed the pool child at once, mid-task or
    # between storing a result and the main process's ack: the message was requeued, and
    # worker_factory's teardown found it on the queue (a flaky test_flower_api teardown).
    queue = f"stop-{run_id}"
    env = dict(os.environ, INFER_TRACK_STARTED="true")
    worker = worker_factory(f"st-{run_id}", [queue], env=env).wait_ready()
    res = sleep.apply_async((1.5,), queue=queue)
    deadline = time.monotonic() + 60
    while res.state != "STARTED":
        assert time.monotonic() < deadline, f"task never started (state {res.state})"
        time.sleep(0.05)
    assert worker.stop() == 0
    assert worker.session_pids() == []
    assert res.get(timeout=10) == {"worker": worker.hostname, "redelivered": False}
    assert queue_depth(queue) == 0  # acked: nothing left to redeliver
