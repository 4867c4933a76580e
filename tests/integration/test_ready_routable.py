"""A worker that says ``ready.`` is already routable: its first heartbeat is in the registry.

A script that waits for the ready line and then calls ``infer.apply_async``
must not get ``NoCapableWorker``.  Each round starts a real worker, watches
its log closely for the ready line and, at once (no sleep), reads the
registry store afresh, as a newly built router would.
"""

from __future__ import annotations

import time

import pytest

from routing.queues import direct_queue
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tasks.wire.backend import registry_store
from tests.integration.conftest import WorkerFactory

pytestmark = pytest.mark.integration


def _wait_for_ready_line(worker: WorkerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    marker = f"{worker.hostname} ready."
    while marker not in worker.logfile.read_text(errors="replace"):
        assert worker.alive(), worker.log_tail()
        assert time.monotonic() < deadline, f"not ready after {timeout}s:\n{worker.log_tail()}"
        time.sleep(0.005)


@pytest.mark.parametrize("preload", [(), ("mlp",), (), ("mlp", "cnn")])
def test_ready_means_routable(
    worker_factory: WorkerFactory, run_id: str, preload: tuple[str, ...]
) -> None:
    tag = "-".join(preload) or "none"
    name, queue = f"rr{tag}-{run_id}", f"rr-{run_id}"
    worker = worker_factory(name, [direct_queue(queue, name), queue], preload=preload)
    _wait_for_ready_line(worker)
    records = {c.name: c for c in registry_store(app.infer_settings).load()}
    assert worker.hostname in records, f"ready, but not in the registry:\n{worker.log_tail()}"
    record = records[worker.hostname]
    assert record.queue == worker.own_queue
    assert {f"{m}@1" for m in preload} <= set(record.models_loaded)  # name@version
    assert "first heartbeat is in the registry" in worker.logfile.read_text()
