"""Message signing against a real worker: signed tasks run, unsigned and forged ones never do.

One worker runs with ``INFER_SIGNING_DIR`` (its own queues and registry
namespace).  Signed clients run in subprocesses with the same folder, since
``setup_security`` is process-wide and this test process stays an unsigned
client.  Refused messages are published raw, with Celery's own protocol-2
headers, so each differs from a good message only in what is under test; each
must be dead-lettered to ``<queue>.dead``, never run, while the same worker
(same process, same pool child) keeps serving signed tasks.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer

from routing.queues import dead_letter_queue, direct_queue
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tasks.wire.signing import CERT_FILE, KEY_FILE, init
from tasks.wire.topology import remove_topology
from tests.integration.conftest import publish_raw, queue_depth

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEP = b"\x00\x01"  # the field separator of Celery's auth serializer
AUTH_FIELDS = ("signer", "signature", "content_type", "content_encoding", "body")


@dataclass
class Signed:
    worker: WorkerProcess
    queue: str  # the shared queue: it dead-letters to <queue>.dead
    env: dict[str, str]  # a signed client's environment
    keys: Path  # the worker's (trusted) signing folder
    rogue: Path  # a key and certificate of the same name, not trusted

    @property
    def dead(self) -> str:
        dead = dead_letter_queue(self.queue)
        assert dead is not None
        return dead

    def children(self) -> list[int]:
        return sorted(p.pid for p in psutil.Process(self.worker.pid).children())


@pytest.fixture(scope="module")
def signed(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[Signed]:
    base = tmp_path_factory.mktemp("signing")
    host = f"sign-{run_id}"
    init(base / "keys", host, bits=2048)
    init(base / "rogue", host, bits=2048)  # same name, different key: not in trusted/
    env = {
        **os.environ,
        "INFER_SIGNING_DIR": str(base / "keys"),
        "INFER_REGISTRY_NAMESPACE": f"sign-{run_id}",  # no other test's router sees this worker
    }
    queue = f"sign-{run_id}"
    worker = WorkerProcess(
        host, "cpu", logdir=base, env=env, queues=[direct_queue(queue, host), queue]
    )
    worker.start()
    made = Signed(worker, queue, env, base / "keys", base / "rogue")
    try:
        worker.wait_ready()
        yield made
    finally:
        worker.stop()
        strays = worker.session_pids()
        queues = [worker.own_queue, queue, made.dead]
        depths = {q: queue_depth(q) for q in queues}  # every test drains its dead letters
        remove_topology(app, queues)
    assert strays == [], f"stray worker processes: {strays}"
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"


def signed_client() -> None:
    """Run in a subprocess with INFER_SIGNING_DIR set: send signed tasks, use remote control."""
    import numpy as np

    from tasks import app, infer

    spec = json.loads(sys.argv[1])
    queue, hostname = spec["queue"], spec["hostname"]
    report: dict[str, Any] = {"task_serializer": app.conf.task_serializer}
    noop = app.send_task("tasks.diag.noop", queue=queue)
    report["noop"] = {"id": noop.id, "result": noop.get(timeout=60)}
    if spec.get("infer"):
        x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        out = infer.apply_async(("mlp", x), queue=queue).get(timeout=60)
        report["infer"] = {k: out[k] for k in ("model", "batch_size", "worker")}
        report["infer"]["shape"] = out["outputs"]["shape"]
    if spec.get("control"):
        report["ping"] = app.control.inspect(destination=[hostname], timeout=5).ping()
        report["events"] = _task_events(app, hostname, queue)
    print(json.dumps(report))


def _task_events(app_: Any, hostname: str, queue: str) -> dict[str, Any]:
    """Switch the worker's events on by remote control, capture one task's, switch them off."""
    seen: list[dict[str, Any]] = []
    with app_.connection_for_read() as conn:
        receiver = app_.events.Receiver(conn, handlers={"*": seen.append})
        consumer = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        consumer.start()
        enabled = app_.control.enable_events(destination=[hostname], reply=True, timeout=5)

        def types_of(task_id: str) -> set[str]:
            return {e["type"] for e in list(seen) if e.get("uuid") == task_id}

        # The receiver binds its queue in its thread: until it has, events go nowhere.
        # Send tasks until one is seen from its start to its end.
        wanted = {"task-received", "task-succeeded"}
        deadline = time.monotonic() + 45
        while True:
            task = app_.send_task("tasks.diag.noop", queue=queue)
            task.get(timeout=60)
            settle = time.monotonic() + 3
            while time.monotonic() < settle and not wanted <= types_of(task.id):
                time.sleep(0.1)
            if wanted <= types_of(task.id) or time.monotonic() > deadline:
                break
        disabled = app_.control.disable_events(destination=[hostname], reply=True, timeout=5)
        receiver.should_stop = True
        consumer.join(timeout=10)
    types = [e["type"] for e in seen if e.get("uuid") == task.id and e.get("hostname") == hostname]
    return {"enabled": enabled, "disabled": disabled, "task_events": types}


def _run_client(s: Signed, **spec: Any) -> dict[str, Any]:
    spec = {"queue": s.queue, "hostname": s.worker.hostname, **spec}
    code = "from tests.integration.test_signing import signed_client; signed_client()"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=s.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["task_serializer"] == "auth"
    assert report["noop"]["result"]["worker"] == s.worker.hostname
    return report


def _task_body() -> list[Any]:
    return list(app.amqp.as_task_v2("x", "tasks.diag.noop").body)  # [args, kwargs, embed]


def _dead_letters(s: Signed, expect: int, timeout: float = 30.0) -> dict[str, Any]:
    """Take ``expect`` messages off ``<queue>.dead``: {task id: x-death reason}."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        while len(got) < expect and time.monotonic() < deadline:
            message = conn.default_channel.basic_get(s.dead, no_ack=True)
            if message is None:
                time.sleep(0.2)
            else:
                got[message.headers["id"]] = message.headers["x-death"][0]["reason"]
    return got


def _never_ran(s: Signed, ids: list[str]) -> None:
    log = s.worker.logfile.read_text()
    for task_id in ids:
        assert f"[{task_id}] received" not in log, f"{task_id} reached the pool"
        assert app.AsyncResult(task_id).state == "PENDING", f"{task_id} has a result"


def _refusal(s: Signed, task_id: str) -> str:
    """The worker's log line that refused ``task_id`` (it names the message's headers)."""
    lines = [line for line in s.worker.logfile.read_text().splitlines() if task_id in line]
    assert lines, f"no log line names {task_id}"
    assert "refused a message that cannot be decoded" in lines[0]
    return lines[0]


def test_signed_tasks_run(signed: Signed) -> None:
    """(a) A signed no-op and a signed tasks.infer (tensor bytes in msgpack, under auth) succeed."""
    report = _run_client(signed, infer=True)
    assert report["infer"] == {
        "model": "mlp",
        "batch_size": 2,
        "worker": signed.worker.hostname,
        "shape": [2, 10],
    }


def test_unsigned_messages_are_refused(signed: Signed) -> None:
    """(b) msgpack from an unsigned Celery client, raw json, raw text: dead-lettered, never run."""
    children = signed.children()
    body = _task_body()
    # A stock Celery client without the key: this test process's own (unsigned) app.
    unsigned = app.send_task("tasks.diag.noop", queue=signed.queue).id
    as_json = publish_raw(
        signed.queue, json.dumps(body).encode(), "application/json", encoding="utf-8"
    )
    # kombu trusts application/text whatever `accept` says; tasks.wire.codec refuses it.
    as_text = publish_raw(
        signed.queue, json.dumps(body).encode(), "application/text", encoding="utf-8"
    )
    ids = [unsigned, as_json, as_text]
    assert _dead_letters(signed, len(ids)) == dict.fromkeys(ids, "rejected")
    _never_ran(signed, ids)
    log = signed.worker.logfile.read_text()
    assert (
        "Refusing to deserialize untrusted content of type msgpack (application/x-msgpack)" in log
    )
    assert "Refusing to deserialize untrusted content of type json (application/json)" in log
    assert "application/text messages are refused" in _refusal(signed, as_text)
    # (d) the same worker, the same pool child, still serves signed tasks.
    _run_client(signed)
    assert signed.worker.alive() and signed.children() == children
    assert queue_depth(signed.queue) == 0 and queue_depth(signed.dead) == 0


def test_forged_messages_are_refused(signed: Signed) -> None:
    """(c) Signed by an untrusted key, claiming a trusted signer, or altered: dead-lettered."""
    children = signed.children()
    rogue = SecureSerializer(
        PrivateKey((signed.rogue / KEY_FILE).read_text()),
        Certificate((signed.rogue / CERT_FILE).read_text()),
        digest="sha256",
        serializer="msgpack",
    )
    trusted = SecureSerializer(
        PrivateKey((signed.keys / KEY_FILE).read_text()),
        Certificate((signed.keys / CERT_FILE).read_text()),
        digest="sha256",
        serializer="msgpack",
    )
    body = _task_body()
    trusted_id = Certificate((signed.keys / CERT_FILE).read_text()).get_id().encode()

    def signed_as(serializer: SecureSerializer, **replace: bytes) -> bytes:
        # auth's wire format: base64 of signer id, signature, content type, encoding, body
        wire = base64.b64decode(serializer.serialize(body)).split(SEP, 4)
        fields = dict(zip(AUTH_FIELDS, wire, strict=True))
        return base64.b64encode(SEP.join({**fields, **replace}.values()))

    # An untrusted certificate with the worker's own name.
    forged = publish_raw(signed.queue, signed_as(rogue), "application/data", encoding="utf-8")
    # The trusted certificate's id on the rogue key's signature.
    claimed_as = signed_as(rogue, signer=base64.b64encode(trusted_id))
    claimed = publish_raw(signed.queue, claimed_as, "application/data", encoding="utf-8")
    # A genuinely signed message whose body was altered afterwards.
    altered_body = signed_as(trusted, body=msgpack.packb([[], {"seconds": 1}, body[2]]))
    altered = publish_raw(signed.queue, altered_body, "application/data", encoding="utf-8")
    # Unsigned msgpack labelled as signed.
    relabelled = publish_raw(
        signed.queue, msgpack.packb(body), "application/data", encoding="binary"
    )
    ids = [forged, claimed, altered, relabelled]
    assert _dead_letters(signed, len(ids)) == dict.fromkeys(ids, "rejected")
    _never_ran(signed, ids)
    assert "Unknown certificate" in _refusal(signed, forged)
    for task_id in (claimed, altered, relabelled):
        assert "DecodeError: Unable to deserialize" in _refusal(signed, task_id)
    # (d) the genuine signer still gets through, to the same worker and pool child.
    good = publish_raw(signed.queue, signed_as(trusted), "application/data", encoding="utf-8")
    assert app.AsyncResult(good).get(timeout=60)["worker"] == signed.worker.hostname
    _run_client(signed)
    assert signed.worker.alive() and signed.children() == children
    assert queue_depth(signed.queue) == 0 and queue_depth(signed.dead) == 0


def test_remote_control_and_events_keep_working(signed: Signed) -> None:
    """Signed clients ping and switch events on and off; the worker's events (json) arrive."""
    report = _run_client(signed, control=True)
    host = signed.worker.hostname
    assert report["ping"] == {host: {"ok": "pong"}}
    events = report["events"]
    assert events["enabled"] == [{host: {"ok": "task events enabled"}}]
    assert events["disabled"] == [{host: {"ok": "task events disabled"}}]
    assert {"task-received", "task-started", "task-succeeded"} <= set(events["task_events"])


def test_an_unsigned_control_broadcast_leaves_the_connection_alone(signed: Signed) -> None:
    log = signed.worker.logfile
    before = log.read_text().count("Connection to broker lost")
    # This process's unsigned app: the worker must refuse the ping, and nothing else.
    assert app.control.inspect(destination=[signed.worker.hostname], timeout=2).ping() is None
    time.sleep(1.0)
    assert log.read_text().count("Connection to broker lost") == before
    _run_client(signed)
