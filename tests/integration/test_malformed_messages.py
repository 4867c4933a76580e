"""A message no worker can run is dead-lettered, and its caller's ``get()`` raises MalformedMessage.

Each case is published raw (kombu, no serializer) with Celery's own protocol 2
headers, so the worker, not a client check, has to refuse it.  The worker
reads the task id from the headers, never from the body: a pickle body that
would create a file when unpickled never does.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest

from models.errors import MalformedMessage, UnknownModel
from routing.queues import dead_letter_queue, direct_queue
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tests.integration.conftest import WorkerFactory, publish_raw

pytestmark = pytest.mark.integration


class Canary:
    """Unpickling this creates a file: proof that a pickle body was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _dead_letters(queue: str, expect: int, timeout: float = 30.0) -> list[Any]:
    dead = dead_letter_queue(queue)
    assert dead is not None
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        while len(got) < expect and time.monotonic() < deadline:
            message = conn.default_channel.basic_get(dead, no_ack=True)
            if message is None:
                time.sleep(0.2)
            else:
                got.append(message)
    return got


def _raises(task_id: str) -> str:
    """The MalformedMessage text ``get()`` raises for ``task_id`` (this client: msgpack results)."""
    with pytest.raises(MalformedMessage) as caught:
        app.AsyncResult(task_id).get(timeout=30)
    return str(caught.value)


def _raw_meta(task_id: str) -> dict[str, Any]:
    """The result as stored in Redis, decoded with msgpack itself (the project's result format)."""
    raw = app.backend.client.get(app.backend.get_key_for_task(task_id))
    assert raw is not None, f"nothing stored for {task_id}"
    meta: dict[str, Any] = msgpack.unpackb(raw)
    return meta


def _children(worker: WorkerProcess) -> list[int]:
    return sorted(p.pid for p in psutil.Process(worker.pid).children())


def _started(worker_factory: WorkerFactory, run_id: str, tag: str) -> tuple[WorkerProcess, str]:
    name, queue = f"mm{tag}-{run_id}", f"mm{tag}-{run_id}"
    worker = worker_factory(name, [direct_queue(queue, name), queue]).wait_ready()
    return worker, queue


JSON_TASK = json.dumps(
    [[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
)
YAML_TASK = b"!!python/object/apply:os.system ['touch /tmp/yaml-canary']\n"

# name -> (body, content type, task name, what the caller's error says)
CASES: dict[str, tuple[Callable[[Path], bytes], str, str, str]] = {
    "undecodable json": (
        lambda _: b"{this is not json",
        "application/json",
        "tasks.diag.noop",
        "the message body is not valid application/json (",
    ),
    "undecodable msgpack": (
        lambda _: b"\xc1\xc1\xc1",
        "application/x-msgpack",
        "tasks.diag.noop",
        "the message body is not valid application/x-msgpack (",
    ),
    "pickle": (
        lambda canary: pickle.dumps(Canary(canary)),
        "application/x-python-serialize",
        "tasks.diag.noop",
        "content type application/x-python-serialize is refused (pickle executes code): "
        "send with serializer msgpack or json",
    ),
    "yaml": (
        lambda _: YAML_TASK,
        "application/x-yaml",
        "tasks.diag.noop",
        "content type application/x-yaml is refused: send with serializer msgpack or json",
    ),
    "text": (
        lambda _: JSON_TASK.encode(),
        "application/text",
        "tasks.diag.noop",
        "content type application/text is refused (kombu would hand its body to the task "
        "undecoded): send with serializer msgpack or json",
    ),
    "unknown task": (
        lambda _: JSON_TASK.encode(),
        "application/json",
        "tasks.nope",
        "task 'tasks.nope' is not registered on this worker: check the name "
        "(celery -A tasks inspect registered)",
    ),
}


def test_refused_messages_fail_their_callers(
    worker_factory: WorkerFactory, run_id: str, tmp_path: Path
) -> None:
    worker, queue = _started(worker_factory, run_id, "a")
    children = _children(worker)
    canary = tmp_path / "canary"
    ids = {
        case: publish_raw(queue, body(canary), content_type, task=task)
        for case, (body, content_type, task, _) in CASES.items()
    }
    # What Flower's async-apply with {"serializer": "pickle"} sends: a stock Celery publish.
    ids["stock pickle"] = app.send_task("tasks.diag.noop", queue=queue, serializer="pickle").id
    for case, (_, _, _, expected) in CASES.items():
        assert _raises(ids[case]).startswith(expected), case
    assert _raises(ids["stock pickle"]) == CASES["pickle"][3]
    dead = _dead_letters(queue, len(ids))
    assert sorted(m.headers["id"] for m in dead) == sorted(ids.values())
    assert {m.headers["x-death"][0]["reason"] for m in dead} == {"rejected"}
    assert not canary.exists(), "a pickle body was deserialised"
    # Celery's normal format, the same fields as a failure a task raised (here UnknownModel).
    typed = app.send_task("tasks.infer", ("no-such-model", [0.0] * 64), queue=queue)
    with pytest.raises(UnknownModel):
        typed.get(timeout=30)
    raw = {i: _raw_meta(i) for i in (ids["unknown task"], typed.id)}
    refused, normal = raw[ids["unknown task"]], raw[typed.id]
    assert set(refused) == set(normal) and refused["status"] == normal["status"] == "FAILURE"
    assert refused["result"]["exc_module"] == normal["result"]["exc_module"] == "models.errors"
    assert refused["result"]["exc_type"] == "MalformedMessage"
    log = worker.logfile.read_text()
    assert "Traceback" not in log
    for case, task_id in ids.items():
        lines = [line for line in log.splitlines() if task_id in line]
        assert len(lines) == 1, (case, lines)  # one line per refusal
        assert "dead-lettered, not run; its caller gets MalformedMessage: " in lines[0], case
    # The same worker, the same pool child, still serves.
    assert (
        app.send_task("tasks.diag.noop", queue=queue).get(timeout=30)["worker"] == worker.hostname
    )
    assert worker.alive() and _children(worker) == children


def test_messages_without_a_readable_id_are_only_dead_lettered(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    worker, queue = _started(worker_factory, run_id, "b")
    body = JSON_TASK.encode()
    no_headers = publish_raw(queue, body, "application/json", headers={})
    # Protocol 1 keeps the id in the body: refused without reading it, so nothing is stored.
    proto1_id = str(uuid.uuid4())
    proto1 = json.dumps({"task": "tasks.diag.noop", "id": proto1_id, "args": [], "kwargs": {}})
    publish_raw(queue, proto1.encode(), "application/x-python-serialize", headers={})
    # An id, but no task name: not protocol 2.
    half = publish_raw(queue, body, "application/x-yaml", headers={"id": str(uuid.uuid4())})
    assert len(_dead_letters(queue, 3)) == 3
    for task_id in (no_headers, proto1_id, half):
        assert app.AsyncResult(task_id).state == "PENDING"
    log = worker.logfile.read_text()
    assert log.count("no task id in its headers") == 3
    assert "Traceback" not in log


def test_a_stored_result_is_never_overwritten(worker_factory: WorkerFactory, run_id: str) -> None:
    worker, queue = _started(worker_factory, run_id, "c")
    done = app.send_task("tasks.diag.noop", queue=queue)
    assert done.get(timeout=30)["worker"] == worker.hostname
    again = publish_raw(
        queue, pickle.dumps(None), "application/x-python-serialize", task_id=done.id
    )
    ignored = str(uuid.uuid4())
    headers = {**app.amqp.as_task_v2(ignored, "tasks.diag.noop").headers, "ignore_result": True}
    publish_raw(queue, b"{bad", "application/json", task_id=ignored, headers=headers)
    assert len(_dead_letters(queue, 2)) == 2
    assert app.AsyncResult(again).state == "SUCCESS"
    assert app.AsyncResult(ignored).state == "PENDING"
    log = worker.logfile.read_text()
    assert f"{again} already has its result, left alone" in log
    assert "no result stored: the message asks for none (ignore_result)" in log


def test_a_refused_remote_control_message_is_ignored(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    worker, queue = _started(worker_factory, run_id, "d")
    host = worker.hostname
    # Straight into this worker's own no-ack pidbox queue (the broadcast exchange reaches all).
    task_id = publish_raw(
        f"{host}.celery.pidbox", pickle.dumps(None), "application/x-python-serialize"
    )
    deadline = time.monotonic() + 15
    while "ignored a remote-control message" not in worker.logfile.read_text():
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.1)
    assert app.control.inspect(destination=[host], timeout=5).ping() == {host: {"ok": "pong"}}
    assert "Connection to broker lost" not in worker.logfile.read_text()
    assert app.AsyncResult(task_id).state == "PENDING"
    assert app.send_task("tasks.diag.noop", queue=queue).get(timeout=30)["worker"] == host
