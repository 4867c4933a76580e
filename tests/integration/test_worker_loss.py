"""``kill -9`` a worker mid-task: acks_late + reject_on_worker_lost redeliver it to another."""

from __future__ import annotations

import os
import time

import pytest

from tasks import sleep
from tests.integration.conftest import WorkerFactory

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
