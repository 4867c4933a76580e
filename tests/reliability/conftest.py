"""Fault suite fixtures: a Redis of its own, a client app on it, and worker fleets.

The suite runs its own ``redis-server`` (append-only file, fsync always) on a
free port, so it can restart Redis without touching the machine's shared one
and without losing stored results.  RabbitMQ is the machine's: one scenario
restarts its app with ``rabbitmqctl stop_app`` / ``start_app`` and always
starts it again.  Each scenario uses queues named after the run and itself,
and the fleet fixture deletes them, stops its workers and checks that no
worker process and no message outlives the scenario, so a failed scenario
cannot poison the next one.

``INFER_RELIABILITY=full`` (``make reliability``) runs the full counts; CI
runs the reduced ones.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from routing.queues import dead_letter_queue, direct_queue
from tasks.app import InferenceApp
from tasks.ops.launcher import WorkerProcess, free_port
from tasks.settings import Settings
from tasks.wire.topology import remove_topology
from tasks.worker.command import worker_argv
from tests.reliability.ledger import Ledger

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

FULL = os.environ.get("INFER_RELIABILITY") == "full"
LEDGER = ["--include", "tests.reliability.ledger_hook"]


@dataclass(frozen=True)
class Scale:
    full: bool
    soak: int
    tasks: int  # per fault scenario


@pytest.fixture(scope="session")
def scale() -> Scale:
    return Scale(full=FULL, soak=10_000 if FULL else 2_000, tasks=2_000 if FULL else 400)


class RedisServer:
    """A private redis-server whose data survives its own restarts (AOF, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.workdir / "redis.pid"),
            ],
            check=True,
        )
        self._wait(up=True)
        return self

    def stop(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown"], check=False, capture_output=True
        )
        self._wait(up=False)

    def restart(self, down_s: float = 2.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def _wait(self, up: bool, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    if up:
                        return
            except OSError:
                if not up:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"redis on {self.port} did not go {'up' if up else 'down'}")


@pytest.fixture(scope="session")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("the fault suite needs redis-server (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rel_id() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def worker_env(own_redis: RedisServer, rel_id: str) -> dict[str, str]:
    return {
        **os.environ,
        "CELERY_RESULT_BACKEND": own_redis.url,
        "INFER_REGISTRY_NAMESPACE": f"rel-{rel_id}",
        "INFER_FAULT_INJECTION": "true",
        "INFER_BROKER_HEARTBEAT": "4",
    }


@pytest.fixture(scope="session")
def rapp(worker_env: dict[str, str]) -> Iterator[InferenceApp]:
    """The client app of the suite: same broker, the suite's own Redis and namespace."""
    client = InferenceApp(Settings.from_env(worker_env))
    yield client
    router = getattr(client, "_infer_router", None)
    if router is not None:  # stop its registry refresh before the suite's Redis goes
        router.registry.close()
    # An AsyncResult unsubscribes from its result channel when it is collected.  Once
    # the suite's Redis is gone, that raises in __del__ (Celery gives up reconnecting),
    # and pytest turns the unraisable exception into a failed run: unsubscribe all now.
    gc.collect()
    consumer = client.backend.result_consumer
    consumer.stop()
    consumer.subscribed_to.clear()


def queue_depth(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception:  # the queue does not exist
            return 0


@dataclass
class Fleet:
    """Workers of one scenario, consuming ``<class>`` and their own direct queues."""

    app: InferenceApp
    queue: str
    workers: list[WorkerProcess]
    ledger: Ledger

    @property
    def queues(self) -> list[str]:
        own = [w.own_queue for w in self.workers]
        dead = dead_letter_queue(self.queue)
        return [self.queue, *own, *([dead] if dead else [])]

    def pool_children(self, worker: WorkerProcess) -> list[int]:
        return [p.pid for p in psutil.Process(worker.pid).children()]


FleetFactory = Callable[..., Fleet]

# Scenarios that run against both workers: batch 1 and the batching strategy.
BOTH_WORKERS = pytest.mark.parametrize("batching", [False, True], ids=["batch1", "batching"])


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest,
    rapp: InferenceApp,
    worker_env: dict[str, str],
    rel_id: str,
    tmp_path: Path,
    weights_dir: Path,
) -> Iterator[FleetFactory]:
    """Start a fleet for one scenario; afterwards stop it, check and delete its queues."""
    fleets: list[Fleet] = []
    name = request.node.name.removeprefix("test_")
    scenario = name.split("[")[0] + (f"-{name.split('[')[1].rstrip(']')}" if "[" in name else "")

    def start(
        n: int = 2, preload: tuple[str, ...] = ("mlp",), batching: bool = False, **env: str
    ) -> Fleet:
        queue = f"rel-{rel_id}-{scenario}"
        if batching:  # the batching consumer strategy (tasks.worker.strategy)
            env = {**env, "INFER_BATCHING": "true"}
        names = [f"{scenario}{i}-{rel_id}" for i in range(n)]
        workers = [
            WorkerProcess(
                name,
                "cpu",
                logdir=tmp_path,
                env={**worker_env, **env},
                # The ledger's execution counter connects a signal in these workers only.
                command=[*worker_argv(name, "cpu", [direct_queue(queue, name), queue]), *LEDGER],
                preload=preload,
            )
            for name in names
        ]
        for w in workers:
            w.start()
        made = Fleet(rapp, queue, workers, Ledger(rapp, scenario, rel_id))
        fleets.append(made)
        for w in workers:
            w.wait_ready()
        return made

    yield start
    for f in fleets:
        for w in f.workers:
            w.stop()
        strays = {w.name: w.session_pids() for w in f.workers if w.session_pids()}
        depths = {q: queue_depth(rapp, q) for q in f.queues}
        remove_topology(rapp, f.queues)
        assert strays == {}, f"stray worker processes: {strays}"
        assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"
