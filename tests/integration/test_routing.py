"""Capability routing with 3 real CPU workers that declare different capabilities.

The workers and this client share a registry namespace of their own, so the
session's other workers (same Redis) are invisible to these routing decisions.
Requests go through the real path: ``infer.apply_async`` -> ``task_routes`` ->
the router -> a worker's direct queue on RabbitMQ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.errors import NoCapableWorker, UnsupportedDtype
from routing.queues import direct_queue
from routing.router import CapabilityRouter
from tasks import app, infer
from tasks.client.routes import build_router, wait_for_workers
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology
from tests.integration.conftest import queue_depth
from tests.specs import spec_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Fleet:
    def __init__(self, run_id: str, logdir: Path) -> None:
        self.namespace = f"rt-{run_id}"
        self.fallback = f"rt-{run_id}"
        env = dict(os.environ, INFER_REGISTRY_NAMESPACE=self.namespace)
        spec = {  # name: (advertised memory MB, dtypes, preload)
            "small": ("100", "fp32", ("mlp",)),
            "bf16": ("4000", "fp32,bf16", ("cnn",)),
            "big": ("4000", "fp32", ("transformer",)),
        }
        self.workers = {
            key: WorkerProcess(
                f"{key}-{run_id}",
                "cpu",
                logdir=logdir,
                preload=preload,
                queues=[direct_queue(self.fallback, f"{key}-{run_id}"), self.fallback],
                env=dict(env, INFER_MEMORY_MB=memory, INFER_DTYPES=dtypes),
            )
            for key, (memory, dtypes, preload) in spec.items()
        }

    def host(self, key: str) -> str:
        return self.workers[key].hostname

    @property
    def queues(self) -> list[str]:
        return [self.fallback, *(w.own_queue for w in self.workers.values())]


@pytest.fixture(scope="module")
def fleet(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[Fleet]:
    f = Fleet(run_id, tmp_path_factory.mktemp("routing"))
    for w in f.workers.values():
        w.start()
    try:
        for w in f.workers.values():
            w.wait_ready()
        yield f
    finally:
        for w in f.workers.values():
            w.stop()
        remove_topology(app, f.queues)


@pytest.fixture
def router(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[CapabilityRouter]:
    """The real router, reading this fleet's registry namespace."""
    r = build_router(replace(app.infer_settings, registry_namespace=fleet.namespace))
    monkeypatch.setattr(app.route, "router", r)  # the app routes with this one meanwhile
    wait_for_workers(app.router, {w.hostname for w in fleet.workers.values() if w.alive()})
    yield r
    r.registry.close()


def x(model: str, seed: int = 0) -> np.ndarray:
    return sample_inputs(spec_of(model), 1, seed)[0]


def test_requests_land_only_on_capable_workers(fleet: Fleet, router: object) -> None:
    bf16 = [infer.apply_async(("mlp", x("mlp", i), "bf16")) for i in range(6)]
    big_memory = [
        infer.apply_async(("mlp", x("mlp", i)), headers={"requires": {"min_free_memory_mb": 1000}})
        for i in range(6)
    ]
    assert {r.get(timeout=60)["worker"] for r in bf16} == {fleet.host("bf16")}
    assert all(r.get(timeout=60)["dtype"] == "bf16" for r in bf16)
    assert fleet.host("small") not in {r.get(timeout=60)["worker"] for r in big_memory}


def test_a_models_requests_stick_to_the_worker_holding_it(
    fleet: Fleet, router: CapabilityRouter
) -> None:
    results = [infer.apply_async(("transformer", x("transformer", i))) for i in range(20)]
    workers = Counter(r.get(timeout=60)["worker"] for r in results)
    assert workers == Counter({fleet.host("big"): 20})
    assert router.stats.sticky_hits >= 19


def test_no_capable_worker_is_refused_at_submit_and_publishes_nothing(
    fleet: Fleet, router: object
) -> None:
    before = {q: queue_depth(q) for q in fleet.queues}
    with pytest.raises(NoCapableWorker, match="lacks device cuda"):
        infer.apply_async(("mlp", x("mlp")), headers={"requires": {"device": "cuda"}})
    # The same class the worker raises for a precision its device cannot run.
    with pytest.raises(UnsupportedDtype, match=r"'fp16' is not supported on any live worker"):
        app.send_task("tasks.infer", args=("mlp", x("mlp").tolist(), "fp16"))
    assert {q: queue_depth(q) for q in fleet.queues} == before == {q: 0 for q in fleet.queues}


def test_inspect_capabilities_shows_each_record(fleet: Fleet, router: object) -> None:
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=fleet.namespace)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "inspect",
            "capabilities",
            "--json",
            "-t",
            "5",
            "-d",
            fleet.host("bf16"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)[fleet.host("bf16")]
    assert record["dtypes"] == ["fp32", "bf16"] and record["total_memory_mb"] == 4000
    assert "cnn@1" in record["models_loaded"] and record["queue"] == fleet.workers["bf16"].own_queue


def test_killed_workers_traffic_moves_with_nothing_lost(
    fleet: Fleet, router: CapabilityRouter
) -> None:
    # cnn sticks to "bf16" (it holds cnn); kill it with requests queued and in flight.
    first = [infer.apply_async(("cnn", x("cnn", i))) for i in range(10)]
    assert first[0].get(timeout=60)["worker"] == fleet.host("bf16")
    victim = fleet.workers["bf16"]
    victim.kill()
    killed_at = time.monotonic()
    # New requests keep coming; until the record expires they still target the dead worker.
    second = [infer.apply_async(("cnn", x("cnn", 100 + i))) for i in range(10)]
    done = [r.get(timeout=60) for r in first + second]
    assert len(done) == 20 and all(d["model"] == "cnn" for d in done)
    # After 2 heartbeat intervals the router no longer knows the dead worker ...
    while fleet.host("bf16") in router.registry.workers():
        assert time.monotonic() - killed_at < 3 * 2 * app.infer_settings.heartbeat_s
        time.sleep(0.1)
    # ... and routes this model straight to a live worker.
    later = infer.apply_async(("cnn", x("cnn", 999))).get(timeout=60)
    assert later["worker"] in {fleet.host("small"), fleet.host("big")}
    assert later["timing"]["queue_wait_ms"] < app.infer_settings.direct_queue_ttl_ms
    assert all(queue_depth(q) == 0 for q in fleet.queues if q != victim.own_queue)
    assert queue_depth(victim.own_queue) == 0  # everything it held moved to the fallback queue
