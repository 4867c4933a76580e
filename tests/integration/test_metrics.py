"""Prometheus metrics scraped over HTTP from a real worker, and from a routing client."""

from __future__ import annotations

import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.errors import NonFiniteInput, UnknownModel
from routing.queues import direct_queue
from tasks import app, infer
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess, free_port
from tests.integration.conftest import WorkerFactory, eventually
from tests.specs import spec_of

pytestmark = pytest.mark.integration

Pair = tuple[WorkerProcess, WorkerProcess, str]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample at ``/metrics`` as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_worker_exports_request_batch_model_and_memory_metrics(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    port = free_port()
    name, shared = f"met-{run_id}", f"met-{run_id}"
    env = dict(os.environ, INFER_METRICS_PORT=str(port))
    worker = worker_factory(name, [direct_queue(shared, name), shared], env=env).wait_ready()
    spec = spec_of("mlp")
    for batch in (1, 3, 5):
        out = infer.apply_async(("mlp", sample_inputs(spec, batch, batch)), queue=worker.own_queue)
        assert out.get(timeout=60)["batch_size"] == batch
    # Bad requests straight to the worker (send_task skips the client's checks).
    unknown = app.send_task("tasks.infer", args=("nope", [1.0]), queue=worker.own_queue)
    with pytest.raises(UnknownModel):
        unknown.get(timeout=60)
    nan = app.send_task("tasks.infer", args=("mlp", [[float("nan")] * 64]), queue=worker.own_queue)
    with pytest.raises(NonFiniteInput):
        nan.get(timeout=60)

    m = scrape(port)
    assert value(m, "infer_requests_total", model="mlp", outcome="success") == 3
    assert value(m, "infer_requests_total", model="unknown", outcome="UnknownModel") == 1
    assert value(m, "infer_requests_total", model="mlp", outcome="NonFiniteInput") == 1
    for histogram in ("infer_queue_wait_seconds", "infer_batch_wait_seconds"):
        assert value(m, f"{histogram}_count", model="mlp") == 3, histogram
    assert value(m, "infer_service_seconds_count", model="mlp") == 3
    assert value(m, "infer_compute_seconds_count", model="mlp", dtype="fp32") == 3
    assert value(m, "infer_batch_size_sum", model="mlp") == 1 + 3 + 5
    assert value(m, "infer_batch_size_bucket", model="mlp", le="1.0") == 1
    assert value(m, "infer_batch_size_bucket", model="mlp", le="4.0") == 2
    assert value(m, "infer_model_loads_total", model="mlp", dtype="fp32") == 1
    assert value(m, "infer_model_load_seconds_count", model="mlp") == 1
    assert value(m, "infer_models_loaded") == 1
    assert value(m, "infer_model_loaded", model="mlp", version="1", dtype="fp32") == 1
    assert value(m, "infer_model_cache_bytes", kind="used") > 0
    for kind in ("used", "free", "total"):
        assert value(m, "infer_device_memory_bytes", device="cpu", kind=kind) > 0, kind
    assert value(m, "infer_tasks_running") == 0

    # An unload through the control command counts an eviction and drops the gauge.
    replies = app.control.broadcast(
        "unload_model", arguments={"model": "mlp"}, destination=[worker.hostname], reply=True
    )
    assert replies and "queued" in replies[0][worker.hostname]["ok"]
    eventually(
        lambda: value(scrape(port), "infer_model_evictions_total", model="mlp", dtype="fp32") == 1
    )
    assert value(scrape(port), "infer_models_loaded") == 0


def test_a_client_exports_its_router_decisions(pair: Pair) -> None:
    from tasks.client.routes import wait_for_workers
    from tasks.worker import metrics

    a, b, _ = pair
    wait_for_workers(app.router, {a.hostname, b.hostname})
    router = app.router
    port = free_port()
    assert metrics.serve(port, app=app)  # what a client application calls to export its router
    before = scrape(port)
    for seed in range(6):
        infer.apply_async(("cnn", sample_inputs(spec_of("cnn"), 1, seed))).get(timeout=60)
    after = scrape(port)
    decided = sum(
        value(after, "infer_router_decisions_total", outcome=o)
        - value(before, "infer_router_decisions_total", outcome=o)
        for o in ("sticky_hit", "spill", "fallback", "miss")
    )
    assert decided == 6
    assert value(after, "infer_router_sticky_hit_ratio") == pytest.approx(
        router.stats.sticky_hit_rate
    )
    assert value(after, "infer_router_decision_seconds", quantile="0.99") > 0
