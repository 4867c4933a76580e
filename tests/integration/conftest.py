"""Real RabbitMQ + Redis and real ``celery worker`` subprocesses.

Every worker and queue is named with a per-run id, so runs never share
messages; fixtures delete their queues and check that no message is left
ready or unacked and no worker process outlives its test.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from routing.queues import direct_queue
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology

pytestmark = pytest.mark.integration


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 3
        ):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def services() -> None:
    broker, backend = os.environ["CELERY_BROKER_URL"], os.environ["CELERY_RESULT_BACKEND"]
    missing = [url for url, port in ((broker, 5672), (backend, 6379)) if not _reachable(url, port)]
    if missing:
        pytest.fail(
            f"integration tests need RabbitMQ and Redis; not reachable: {missing}. Start them with "
            '`rabbitmq-server -detached` and `redis-server --daemonize yes --port 6379 --save "" '
            "--appendonly no` (.ci/run does this)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:6]


def eventually(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something true, and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def publish_raw(
    queue: str,
    body: bytes,
    content_type: str,
    *,
    encoding: str = "utf-8",
    task: str = "tasks.diag.noop",
    task_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """Publish ``body`` as it is (kombu, no serializer), with the headers Celery would give ``task``."""
    task_id = task_id or str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, origin="tests")
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=queue,
            content_type=content_type,
            content_encoding=encoding,
            headers=message.headers if headers is None else headers,
            delivery_mode=2,
            **message.properties,
        )
    return task_id


def queue_depth(queue: str) -> int:
    """Ready + unacked messages of ``queue`` (a passive declare on RabbitMQ)."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker_factory(tmp_path: Path, weights_dir: Path) -> Iterator[WorkerFactory]:
    """Start workers for one test; stop them, delete their queues, check no stray process."""
    started: list[WorkerProcess] = []
    queues: set[str] = set()

    def start(name: str, queues_: list[str], **kwargs: object) -> WorkerProcess:
        w = WorkerProcess(name, "cpu", logdir=tmp_path, queues=queues_, **kwargs)  # type: ignore[arg-type]
        started.append(w.start())
        queues.update(queues_)
        return w

    yield start
    for w in started:
        w.stop()
    leftovers = {w.name: w.session_pids() for w in started if w.session_pids()}
    depths = {q: queue_depth(q) for q in queues}
    remove_topology(app, sorted(queues))
    assert leftovers == {}, f"stray worker processes: {leftovers}"
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"


@pytest.fixture(scope="session")
def pair(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[tuple[WorkerProcess, WorkerProcess, str]]:
    """Two CPU workers posing as separate devices, each with its own queue and a shared one."""
    shared = f"shared-{run_id}"
    logdir = tmp_path_factory.mktemp("pair")
    workers = tuple(
        WorkerProcess(
            name, "cpu", logdir=logdir, queues=[direct_queue(shared, name), shared], preload=preload
        )
        for name, preload in ((f"ta-{run_id}", ("mlp", "cnn")), (f"tb-{run_id}", ("transformer",)))
    )
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.wait_ready()
        yield workers[0], workers[1], shared
    finally:
        for w in workers:
            w.stop()
        depths = {q: queue_depth(q) for q in (shared, *(w.own_queue for w in workers))}
        remove_topology(app, list(depths))
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"
