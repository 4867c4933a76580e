"""Overloaded at submit, against real RabbitMQ, Redis and workers (issue 17).

Two ways a request is refused before anything is queued, with the typed
:class:`~models.errors.Overloaded`:

- **a full queue**: every task queue is declared with ``x-max-length =
  INFER_MAX_QUEUE_LENGTH`` and ``x-overflow=reject-publish``; the broker nacks
  a publish past it, and the client raises Overloaded at once (no retry into a
  full queue).  Each case uses a fresh, worker-less queue declared with a
  bound of 3 (RabbitMQ refuses to redeclare a queue with other arguments), by
  a client whose environment sets the bound, as an operator would;
- **admission control**: the router refuses a request whose expected wait at
  a busy worker (its advertised backlog over its measured service rate)
  exceeds its deadline.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from models import errors
from routing.capabilities import WorkerCapabilities
from routing.queues import direct_queue
from routing.router import CapabilityRouter
from tasks import app, infer, sleep
from tasks.client.publish import nacked
from tasks.client.routes import build_router, wait_for_workers
from tasks.wire.topology import remove_topology
from tests.integration.conftest import WorkerFactory, eventually, queue_depth
from tests.integration.flower_server import running_flower
from tests.integration.plain_client import plain_client, publishes
from tests.integration.test_batching import mlp_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BOUND = 3

# A client process whose environment bounds its queues (INFER_MAX_QUEUE_LENGTH): it fills
# a fresh queue to the bound, then tries apply_async and send_task once more each.
BOUNDED_CLIENT = """
import json, sys, time
from celery.signals import before_task_publish
from models.errors import Overloaded
from tasks import app, infer, noop

queue, bound = sys.argv[1], int(sys.argv[2])
published = []  # the task id of each publish attempt (a retry repeats its id)
before_task_publish.connect(lambda headers=None, **_: published.append(headers["id"]), weak=False)

def depth():
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)

def attempt(publish):
    before, started, tried = depth(), time.monotonic(), len(published)
    try:
        publish()
    except Overloaded as e:
        error = {"class": type(e).__name__, "message": str(e)}
    else:
        error = None
    return {"error": error, "seconds": time.monotonic() - started, "before": before,
            "after": depth(), "attempts": published[tried:]}

for _ in range(bound):
    noop.apply_async(queue=queue)
out = {"filled": depth()}
call = lambda: infer.apply_async(("mlp", [0.5] * 64), queue=queue)
first = attempt(call)
out["one_past"] = first["error"] is None  # a quorum queue may take one past its bound
out["apply_async"] = attempt(call) if out["one_past"] else first
out["send_task"] = attempt(lambda: app.send_task("tasks.infer", args=("mlp", [0.5] * 64), queue=queue))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def stock() -> Iterator[Celery]:
    with plain_client() as client:
        yield client


@pytest.fixture
def bounded_queue(run_id: str) -> Iterator[str]:
    """A fresh queue name; the queue (declared by the test's clients) is deleted afterwards."""
    name = f"full-{run_id}-{uuid.uuid4().hex[:6]}"
    yield name
    remove_topology(app, [name])


def test_a_full_queue_refuses_apply_async_and_send_task_with_overloaded(
    bounded_queue: str, stock: Celery
) -> None:
    env = {**os.environ, "INFER_MAX_QUEUE_LENGTH": str(BOUND)}
    out = subprocess.run(
        [sys.executable, "-c", BOUNDED_CLIENT, bounded_queue, str(BOUND)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["filled"] == BOUND
    full = BOUND + int(result["one_past"])
    for path in ("apply_async", "send_task"):
        refused = result[path]
        assert refused["error"] is not None, f"{path} was published into a full queue"
        assert refused["error"]["class"] == "Overloaded", (path, refused)
        message = refused["error"]["message"]
        assert f"queue {bounded_queue} is full" in message, message
        assert f"INFER_MAX_QUEUE_LENGTH={BOUND}" in message and "nothing was queued" in message
        assert refused["before"] == refused["after"] == full, (path, refused)  # nothing queued
        assert len(refused["attempts"]) == 1, (path, refused)  # one try: never retried
        assert refused["seconds"] < 2.0, (path, refused)
    # A stock Celery client runs none of our code: the broker's nack reaches it as kombu's
    # error (not Overloaded), and nothing is queued either.
    with pytest.raises(OperationalError) as caught:
        stock.send_task("tasks.infer", args=["mlp", [0.5] * 64], queue=bounded_queue, declare=[])
    assert nacked(caught.value)
    assert queue_depth(bounded_queue) == full


def test_flower_answers_503_overloaded_for_a_full_queue(
    bounded_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFER_MAX_QUEUE_LENGTH", str(BOUND))  # Flower's environment only
    body = {"args": ["mlp", [0.5] * 64], "queue": bounded_queue}
    with running_flower(tmp_path) as flower:
        answers = []
        for _ in range(BOUND + 2):  # a quorum queue may take one past its bound
            status, _, text = flower.post("async-apply", body)
            answers.append((status, json.loads(text)))
            if status != 200:
                break
    status, refusal = answers[-1]
    accepted = len(answers) - 1
    assert accepted in (BOUND, BOUND + 1), answers
    assert all(s == 200 and "task-id" in a for s, a in answers[:-1]), answers
    assert status == 503, answers
    assert refusal["error"] == "Overloaded", refusal
    assert f"queue {bounded_queue} is full" in refusal["message"]
    assert queue_depth(bounded_queue) == accepted  # the refused one was not queued


def _measured(router: CapabilityRouter, host: str, backlog: int) -> WorkerCapabilities | None:
    """The router's record of ``host`` once it advertises a service rate and ``backlog``."""
    record = router.registry.workers().get(host)
    if record is None or record.service_rate <= 0 or record.backlog < backlog:
        return None
    return record


def _router(settings: Any, host: str, monkeypatch: pytest.MonkeyPatch) -> CapabilityRouter:
    """A real router over ``settings``'s registry namespace; the app routes with it meanwhile."""
    router = build_router(settings)
    monkeypatch.setattr(app.route, "router", router)
    wait_for_workers(router, {host})
    return router


def test_admission_refuses_a_deadline_shorter_than_the_expected_wait(
    worker_factory: WorkerFactory, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, fallback = f"adm-{run_id}", f"adm-{run_id}"
    env = {
        **os.environ,
        "INFER_REGISTRY_NAMESPACE": name,  # no other test's worker or router in this fleet
        "INFER_HEARTBEAT_S": "1",
        "INFER_SERVICE_RATE_WINDOW_S": "60",
    }
    worker = worker_factory(
        name, [direct_queue(fallback, name), fallback], env=env, preload=("mlp",)
    ).wait_ready()
    settings = replace(app.infer_settings, registry_namespace=name, heartbeat_s=1.0)
    assert settings.admission and settings.admission_margin == 0.5
    router = _router(settings, worker.hostname, monkeypatch)
    # Slow work queued on it (tasks.diag.sleep stands in for long requests): it measures its
    # service rate (about 2.5 requests/s) and advertises its backlog.
    sent_here: list[AsyncResult] = [
        sleep.apply_async((0.4,), queue=worker.own_queue) for _ in range(8)
    ]
    try:
        record = eventually(
            functools.partial(_measured, router, worker.hostname, 3),
            timeout=30,
            what="the worker advertising a measured service rate and a backlog",
        )
        assert 0.5 < record.service_rate < 5.0, record
        x = mlp_sample(0)
        with publishes() as sent:
            try:
                sent_here.append(infer.apply_async(("mlp", x), expires=0.3))
            except errors.Overloaded as e:
                assert re.search(r"expected wait .* exceeds the \d+ ms left", str(e)), e
            else:
                pytest.fail("a deadline shorter than the expected wait was admitted")
        assert sent == [] and router.stats.overloaded == 1
        # The same request with a deadline it can meet is admitted, and served in time.
        with publishes() as sent:
            admitted = infer.apply_async(("mlp", x), expires=60)
        sent_here.append(admitted)
        assert sent == ["tasks.infer"]
        # INFER_ADMISSION=false: the short deadline is published, and dropped once past.
        unchecked_router = _router(replace(settings, admission=False), worker.hostname, monkeypatch)
        try:
            with publishes() as sent:
                unchecked = infer.apply_async(("mlp", x), expires=0.3)
            sent_here.append(unchecked)
            assert sent == ["tasks.infer"]
        finally:
            unchecked_router.registry.close()
        assert admitted.get(timeout=60)["worker"] == worker.hostname
        with pytest.raises(errors.DeadlineExceeded):
            unchecked.get(timeout=60)
    finally:
        router.registry.close()
        for r in sent_here:  # nothing left on its queues when the worker stops
            r.get(timeout=60, propagate=False)
