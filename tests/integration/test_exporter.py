"""The queue exporter as a real process, scraped over HTTP, against real queues and a real worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from routing.capabilities import WorkerCapabilities
from routing.queues import direct_queue
from tasks import app, infer
from tasks.ops.demo import sample_inputs
from tasks.ops.exporter import DRAIN_CAP_S, SERVED_METRICS
from tasks.ops.launcher import free_port
from tasks.settings import Settings
from tasks.wire.backend import registry_store
from tasks.wire.topology import declare_topology, remove_topology
from tests.integration.conftest import WorkerFactory, eventually, publish_raw, queue_depth
from tests.specs import spec_of

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Exporter = Callable[..., int]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, queue: str, kind: str) -> float | None:
    return samples.get((name, frozenset({("queue", queue), ("kind", kind)})))


def polled_ok(port: int, after: float) -> Samples | None:
    """A scrape whose last successful poll is later than ``after`` (wall time), else None."""
    try:
        samples = scrape(port)
    except OSError:
        return None
    last = samples.get(("infer_exporter_last_poll_timestamp_seconds", frozenset()), 0.0)
    return samples if last > after else None


def fresh_scrape(port: int) -> Samples:
    """A scrape of a poll that started after this call."""
    since = time.time()
    return eventually(lambda: polled_ok(port, since), 20, "a fresh successful poll")


@pytest.fixture
def namespace(run_id: str) -> str:
    """A registry namespace of this test's own: the exporter sees only its workers."""
    return f"exporter-{run_id}-{time.monotonic_ns() % 10**6}"


@pytest.fixture
def exporter(tmp_path: Path, namespace: str) -> Iterator[Exporter]:
    """Start ``python -m tasks.ops.exporter`` on a free port; stop it with SIGTERM (exit 0)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*queues: str, broker: str | None = None) -> int:
        port = free_port()
        env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace)
        if broker is not None:
            env["CELERY_BROKER_URL"] = broker
        args = [sys.executable, "-m", "tasks.ops.exporter", "--port", str(port)]
        args += ["--interval", "0.5", *(a for q in queues for a in ("--queue", q))]
        with (tmp_path / f"exporter-{port}.log").open("wb") as log:  # the child keeps its copy
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        if broker is None:
            eventually(lambda: polled_ok(port, 0.0), 30, "the exporter's first successful poll")
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=15) for proc in procs] == [0] * len(procs)


def test_messages_of_a_queue_nobody_consumes(exporter: Exporter, run_id: str) -> None:
    queue = f"exp-empty-{run_id}"
    declare_topology(app, [queue])
    try:
        port = exporter(queue)
        first = fresh_scrape(port)
        assert get(first, "infer_queue_messages", queue, "class") == 0
        assert get(first, "infer_queue_expected_drain_seconds", queue, "class") == 0
        assert get(first, "infer_queue_oldest_age_seconds", queue, "class") == 0
        body = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None}]).encode()
        for _ in range(7):
            publish_raw(queue, body, "application/json")
        m = fresh_scrape(port)
        assert get(m, "infer_queue_messages", queue, "class") == 7
        assert get(m, "infer_queue_consumers", queue, "class") == 0
        assert get(m, "infer_queue_service_rate", queue, "class") == 0
        # Nothing drains it (an empty fleet): the finite cap, for KEDA to scale up from zero.
        assert get(m, "infer_queue_expected_drain_seconds", queue, "class") == DRAIN_CAP_S
        # No worker has ever taken a message from it: no bound to give.
        assert get(m, "infer_queue_oldest_age_seconds", queue, "class") is None
        assert {name for name, _ in m} == set(SERVED_METRICS) - {"infer_queue_oldest_age_seconds"}
        assert m[("infer_exporter_polls_total", frozenset({("outcome", "ok")}))] >= 2
    finally:
        remove_topology(app, [queue])
    # A queue that does not exist (deleted) reads as empty, and the poll still succeeds.
    gone = fresh_scrape(port)
    assert get(gone, "infer_queue_messages", queue, "class") == 0


def test_a_workers_queues_consumers_and_service_rate(
    exporter: Exporter, worker_factory: WorkerFactory, namespace: str, run_id: str
) -> None:
    name, shared = f"exp-{run_id}", f"exp-{run_id}"
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace, INFER_SERVICE_RATE_WINDOW_S="120")
    # A batching worker: its consumer reports the queue heads (tasks.worker.load).
    queues = [direct_queue(shared, name), shared]
    worker = worker_factory(name, queues, env=env, batching=True).wait_ready()
    port = exporter()  # the worker's queues come from the registry, none named
    spec = spec_of("mlp")
    sent = {}  # queue -> when its requests were sent
    for queue in (worker.own_queue, shared):
        sent[queue] = time.time()
        results = [
            infer.apply_async(("mlp", sample_inputs(spec, 2, seed)), queue=queue)
            for seed in range(10)
        ]
        for r in results:
            r.get(timeout=60)
    store = registry_store(Settings.from_env(env))

    def record() -> WorkerCapabilities:
        (caps,) = [w for w in store.load() if w.name == worker.hostname]
        return caps

    def matches() -> Samples | None:
        m = fresh_scrape(port)
        rate = record().service_rate
        exported = get(m, "infer_queue_service_rate", worker.own_queue, "direct")
        return m if rate > 0 and exported == pytest.approx(rate) else None

    m = eventually(matches, 30, "the exporter reporting the worker's advertised service rate")
    rate = get(m, "infer_queue_service_rate", worker.own_queue, "direct")
    for queue, kind in ((worker.own_queue, "direct"), (shared, "class")):
        assert get(m, "infer_queue_consumers", queue, kind) == 1, queue
        assert get(m, "infer_queue_messages", queue, kind) == 0, queue
        assert get(m, "infer_queue_expected_drain_seconds", queue, kind) == 0, queue
        assert get(m, "infer_queue_oldest_age_seconds", queue, kind) == 0, queue
    assert get(m, "infer_queue_service_rate", shared, "class") == rate  # the only worker of it

    # The worker stops consuming its class queue; messages wait there.  The oldest-age bound
    # comes from the last message it took from it, before any of these was published.
    heads = record().queue_heads
    assert shared in heads and worker.own_queue in heads, heads
    replies = app.control.cancel_consumer(shared, destination=[worker.hostname], reply=True)
    assert replies, "cancel_consumer: no reply"
    eventually(lambda: get(fresh_scrape(port), "infer_queue_consumers", shared, "class") == 0, 30)
    published = time.time()
    waiting = [
        infer.apply_async(("mlp", sample_inputs(spec, 1, seed)), queue=shared) for seed in range(5)
    ]
    try:
        m = eventually(
            lambda: (
                (s := fresh_scrape(port))
                and get(s, "infer_queue_messages", shared, "class") == 5
                and s
            ),
            20,
            "5 ready messages",
        )
        age = get(m, "infer_queue_oldest_age_seconds", shared, "class")
        polled = m[("infer_exporter_last_poll_timestamp_seconds", frozenset())]
        # At least the true age of the oldest waiting message (published after `published`), at
        # most the age of the last message the worker took from it (sent after sent[shared]).
        assert age is not None and polled - published <= age <= polled - sent[shared], age
        # Nothing consumes it now: the rate of its (only) worker does not count.
        assert get(m, "infer_queue_consumers", shared, "class") == 0
        assert get(m, "infer_queue_service_rate", shared, "class") == 0
        assert get(m, "infer_queue_expected_drain_seconds", shared, "class") == DRAIN_CAP_S
    finally:
        app.control.add_consumer(shared, destination=[worker.hostname], reply=True)
        for r in waiting:
            r.get(timeout=60)
    assert queue_depth(shared) == 0


def test_polls_that_cannot_reach_the_broker_are_counted_and_drop_the_queue_series(
    exporter: Exporter,
) -> None:
    nobody = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # nothing listens there
    port = exporter(broker=nobody)

    def failed_twice() -> Samples | None:
        try:
            m = scrape(port)
        except OSError:
            return None
        failed = m.get(
            ("infer_exporter_polls_total", frozenset({("outcome", "broker_unreachable")}))
        )
        return m if failed is not None and failed >= 2 else None

    m = eventually(failed_twice, 30, "two failed polls")  # and the process still serves
    assert m[("infer_exporter_polls_total", frozenset({("outcome", "ok")}))] == 0
    assert m[("infer_exporter_last_poll_timestamp_seconds", frozenset())] == 0
    assert not [name for name, _ in m if name.startswith("infer_queue_")]  # no made-up numbers
