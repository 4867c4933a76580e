"""Scenarios 5 and 6: RabbitMQ restarted while publishing, Redis restarted mid-run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import chord

from tasks.app import InferenceApp
from tasks.settings import Settings
from tasks.wire.backend import ResilientRedisBackend
from tests.reliability.conftest import BOTH_WORKERS, FleetFactory, RedisServer, Scale
from tests.reliability.ledger import sample

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def _wait_amqp(timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 5672), 1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("RabbitMQ did not come back on 5672")


@pytest.fixture
def rabbit_restart() -> Iterator[None]:
    """Allow a scenario to stop RabbitMQ's app; always start it again afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot restart the broker here")
    try:
        _rabbitmqctl("status")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"rabbitmqctl cannot reach the local node ({e}): cannot restart it")
    yield
    _rabbitmqctl("start_app")  # no-op when it runs
    _wait_amqp()


@BOTH_WORKERS
def test_rabbitmq_restart_while_publishing(
    fleet: FleetFactory, scale: Scale, rabbit_restart: None, batching: bool
) -> None:
    """Scenario 5: every task is confirmed and completed, or reported unpublished."""
    f = fleet(2, batching=batching)
    n = scale.tasks
    done = threading.Event()

    def publish() -> None:
        for i in range(n):
            f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue)
            time.sleep(0.002)
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    time.sleep(0.5)
    before = len(f.ledger.ids)
    _rabbitmqctl("stop_app")
    time.sleep(3.0)
    _rabbitmqctl("start_app")
    _wait_amqp()
    publisher.join(timeout=300)
    assert done.is_set(), "the publisher hung"
    report = f.ledger.report(timeout=240, published_before_stop=before)
    assert before < n  # the restart happened while publishing
    assert report.lost == 0, report.line()  # every confirmed task completed
    assert report.succeeded + report.unpublished == n
    assert report.failed == {}
    assert all(w.alive() for w in f.workers)  # and the workers resumed on their own
    # both workers still take new work after the restart
    fresh = [f.ledger.send("tasks.diag.noop", queue=w.own_queue) for w in f.workers]
    outcomes = f.ledger.wait(timeout=60, ids=[i for i in fresh if i])
    assert [outcomes[i]["status"] for i in fresh if i] == ["SUCCESS", "SUCCESS"]


@BOTH_WORKERS
def test_redis_restart_mid_run(
    fleet: FleetFactory, scale: Scale, own_redis: RedisServer, batching: bool
) -> None:
    """Scenario 6: Redis goes away and comes back; 0 results missing, chords complete."""
    f = fleet(2, batching=batching)
    n = scale.tasks
    header = [
        f.app.signature(
            "tasks.infer", args=("mlp", sample(i)), queue=f.queue, headers=f.ledger.headers
        )
        for i in range(50)
    ]
    body = f.app.signature("tasks.gather", queue=f.queue, headers=f.ledger.headers)
    joined = chord(header, app=f.app)(body)
    f.ledger.ids += [r.id for r in joined.parent.results] + [joined.id]
    for i in range(n):
        f.ledger.send("tasks.infer", ("mlp", sample(i)), queue=f.queue)
    own_redis.restart(down_s=2.0)
    report = f.ledger.report(timeout=240)
    assert report.lost == 0 and report.failed == {}, report.line()
    assert report.succeeded == n + 51
    gathered = f.ledger.outcomes([joined.id])[joined.id]["result"]
    assert gathered["batch_size"] == 50 and gathered["chunks"] == 50
    assert all(w.alive() for w in f.workers)


def test_backend_commands_wait_for_redis_to_return(own_redis: RedisServer) -> None:
    """Scenario 6b: the chord join's own Redis commands wait out a restart instead of failing.

    Celery retries ``store_result`` by itself, but not the chord join in
    ``on_chord_part_return``; without tasks.wire.backend's reconnecting pool a
    Redis blip there became a ``ChordError`` (CI, scenario 6).
    """
    app = InferenceApp(
        Settings.from_env(
            {"CELERY_RESULT_BACKEND": own_redis.url, "INFER_BACKEND_RECONNECT_S": "8"}
        )
    )
    backend = app.backend
    assert isinstance(backend, ResilientRedisBackend)
    gid = f"restart-{time.monotonic_ns()}"
    backend.set_chord_size(gid, 2)
    jkey, tkey, skey = (backend.get_key_for_group(gid, s) for s in (".j", ".t", ".s"))
    dkey, ckey = backend.get_key_for_group(gid, ".d"), backend.get_key_for_group(gid, ".c")

    def part(tid: str, index: int) -> list[Any]:
        return list(
            backend._chord_part_return_script(
                keys=[jkey, tkey, skey, dkey, backend.get_key_for_group(gid), ckey],
                args=[tid, backend.encode([1, tid, "SUCCESS", index]), 1, index, 60, 60, 10, "t"],
                client=backend.client,
            )
        )

    assert part("a", 0)[0] == 1
    own_redis.stop()
    comeback = threading.Timer(2.0, own_redis.start)
    comeback.start()
    try:
        started = time.monotonic()
        ready, _, size, claimed = part("b", 1)  # sent while Redis is down
        waited = time.monotonic() - started
        with backend.client.pipeline() as pipe:
            joined = pipe.zrange(jkey, 0, -1).execute()[0]
    finally:
        comeback.join()
    assert waited >= 1.5  # it really met the outage and waited for Redis
    assert (ready, int(size), claimed) == (2, 2, 1)  # both parts counted, the join claimed once
    assert [backend.decode(j)[1] for j in joined] == ["a", "b"]
