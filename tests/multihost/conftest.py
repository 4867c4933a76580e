"""The multihost tier: eight test hosts in network namespaces, a RabbitMQ cluster, real workers.

Hosts (``10.231.0.11`` ...): ``broker1``-``broker3`` (one RabbitMQ node each,
clustered), ``redis``, ``worker1``-``worker3`` (one ``celery worker`` each,
device cpu) and ``client`` (:mod:`tests.multihost.driver`, which publishes
through the router and keeps the ledger).  Every process of the deployment
runs in its host's namespace and uses only these hosts' addresses.

The topology is built once per session; each scenario starts from a healthy
deployment (every host healed, three running broker nodes, three registered
workers, empty queues) and leaves one, or fails saying what it could not
restore.  Teardown kills every process left in the namespaces and deletes
them, and checks that none is left, even when a scenario failed.

``INFER_MULTIHOST=full`` (``make multihost``) runs the full load; ``make
test`` the reduced one.  A machine that cannot create namespaces (not root,
no iproute2/nftables) skips the tier with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.ops.launcher import WorkerProcess
from tasks.worker.command import worker_argv
from tests.multihost.cluster import RabbitCluster, RedisHost
from tests.multihost.delay_proxy import MARK
from tests.multihost.topology import Topology, netns_unavailable

pytestmark = [pytest.mark.multihost, pytest.mark.integration]

FULL = os.environ.get("INFER_MULTIHOST") == "full"
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "var" / "multihost"
HOSTS = ["broker1", "broker2", "broker3", "redis", "worker1", "worker2", "worker3", "client"]
WORKERS = ["worker1", "worker2", "worker3"]
SERVERS = ["broker1", "broker2", "broker3", "redis"]
PROXY_PORT = 17000
HEARTBEAT_S = 2.0  # capability heartbeat: records expire after two
BROKER_HEARTBEAT_S = 4  # AMQP heartbeat: a silent peer is dropped after about two


@dataclass(frozen=True)
class Scale:
    full: bool
    rate: float  # requests per second from the client
    seconds: float  # load before and after each fault


@pytest.fixture(scope="session")
def scale() -> Scale:
    return Scale(full=FULL, rate=60.0 if FULL else 25.0, seconds=20.0 if FULL else 6.0)


@dataclass
class Deployment:
    topology: Topology
    cluster: RabbitCluster
    redis: RedisHost
    workers: dict[str, WorkerProcess]
    namespace: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proxies: list[subprocess.Popen[str]] = field(default_factory=list)

    def delay(self, host: str, ms: float) -> None:
        """Delay every byte of ``host``'s connections by ``ms`` each way (its proxy reads this)."""
        (self.workdir / f"delay-{host}").write_text(str(ms))

    def broker_url(self, first: int) -> str:
        """The cluster's URL list, starting at node ``first`` (connections spread over nodes)."""
        urls = self.cluster.urls
        return ";".join(urls[first:] + urls[:first])

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, "CELERY_BROKER_URL": self.broker_url(2), **extra}

    def driver(self, scenario: str, **env: str) -> Driver:
        return Driver(self, scenario, self.client_env(**env))

    def hostname(self, host: str) -> str:
        return self.workers[host].hostname

    def heal_all(self) -> None:
        for name in HOSTS:
            self.topology.heal(name)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Three running broker nodes, every quorum queue with three online members, three workers."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                running = self.cluster.running_nodes()
                if len(running) != 3:
                    last = f"running broker nodes: {running}"
                elif not all(w.alive() for w in self.workers.values()):
                    last = "a worker process died: " + ", ".join(
                        f"{h}:\n{w.log_tail()}" for h, w in self.workers.items() if not w.alive()
                    )
                    break
                else:
                    status = self.cluster.queue_status("cpu")
                    online = status.get("online") or []
                    if len(online) == 3 and self.registered() == set(self.workers):
                        return
                    last = f"queue cpu online {online}; registered {sorted(self.registered())}"
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                last = str(e)
            time.sleep(1.0)
        raise AssertionError(f"the deployment did not get healthy in {timeout}s: {last}")

    def registered(self) -> set[str]:
        """Worker hosts whose capability record is in Redis now (read from the client host)."""
        out = subprocess.run(
            self.topology["client"].argv(
                [
                    "redis-cli",
                    "-h",
                    self.topology["redis"].ip,
                    "--scan",
                    "--pattern",
                    f"*{self.namespace}*",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return {h for h, w in self.workers.items() if w.name in out}


class Driver:
    """:mod:`tests.multihost.driver` on the client host, driven over its stdin and stdout."""

    def __init__(self, deployment: Deployment, scenario: str, env: dict[str, str]) -> None:
        self.scenario = scenario
        self.log = deployment.workdir / f"driver-{scenario}.log"
        run_id = uuid.uuid4().hex[:6]
        log = open(self.log, "w")  # noqa: SIM115 - handed to the child, closed below
        self.proc = subprocess.Popen(
            deployment.topology["client"].argv(
                [sys.executable, "-m", "tests.multihost.driver", scenario, run_id]
            ),
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        log.close()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._reply(120.0)
        assert ready.get("ready"), ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.put(line)
        except ValueError:  # closed by close()
            return

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"driver {self.scenario} gave no answer in {timeout}s:\n{self.log.read_text()[-3000:]}"
            ) from None
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"driver {self.scenario}: {reply['error']}")
        return reply

    def call(self, op: str, wait: float = 120.0, **args: Any) -> dict[str, Any]:
        """Send one command; its reply, or AssertionError after ``wait`` seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply(wait)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


BULKY = ("latencies", "ledger", "completions", "publishes", "line")


def save(scenario: str, record: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{scenario}.json").write_text(
        json.dumps(record, indent=2, sort_keys=True, default=str)
    )
    shown = {k: v for k, v in record.items() if k not in BULKY}
    print(f"\n{record.get('line', scenario)}\n{json.dumps(shown, default=str, sort_keys=True)}")


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[Deployment]:
    reason = netns_unavailable()
    if reason is not None:
        why = f"multihost tier needs network namespaces: {reason}"
        if os.environ.get("INFER_MULTIHOST_REQUIRED"):  # CI: the tier must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    workdir = tmp_path_factory.mktemp("multihost")
    run = uuid.uuid4().hex[:4]
    topology = Topology(f"mh{run}", HOSTS)
    cluster = RabbitCluster([], workdir)
    redis = None
    workers: dict[str, WorkerProcess] = {}
    proxies: list[subprocess.Popen[str]] = []
    try:
        topology.create()
        cluster = RabbitCluster(
            [topology[f"broker{i}"] for i in (1, 2, 3)], workdir / "rabbit"
        ).start()
        redis = RedisHost(topology["redis"], workdir / "redis").start()
        namespace = f"mh-{run}"
        env = {
            **os.environ,
            "CELERY_RESULT_BACKEND": redis.url,
            "INFER_REGISTRY_NAMESPACE": namespace,
            "INFER_HEARTBEAT_S": str(HEARTBEAT_S),
            "INFER_BROKER_HEARTBEAT": str(BROKER_HEARTBEAT_S),
            "INFER_METRICS_PORT": "0",
            "INFER_WEIGHTS_DIR": str(weights_dir),
            "INFER_HOME": str(workdir / "home"),
            "PYTHONPATH": str(ROOT),
        }
        deployment = Deployment(topology, cluster, redis, workers, namespace, workdir, env, proxies)
        for host in WORKERS:  # each worker host's link: a proxy that delays when told to
            deployment.delay(host, 0)
            proxies.append(topology.start_delay_proxy(host, PROXY_PORT, workdir / f"delay-{host}"))
            topology.redirect(host, SERVERS, [5672, 6379], PROXY_PORT, MARK)
        for i, host in enumerate(WORKERS):
            name = f"w{i + 1}"
            workers[host] = WorkerProcess(
                name,
                "cpu",
                logdir=workdir,
                env={**env, "CELERY_BROKER_URL": deployment.broker_url(i)},
                command=[*worker_argv(name, "cpu"), "--include", "tests.reliability.ledger_hook"],
                preload=("mlp", "cnn", "transformer"),
                prefix=topology[host].argv([]),
            )
        for w in workers.values():
            w.start()
        for w in workers.values():
            w.wait_ready(180.0)
        deployment.wait_healthy()
        yield deployment
    finally:
        for w in workers.values():
            w.stop(timeout=15)
        cluster.stop()
        for proxy in proxies:
            proxy.kill()
            proxy.wait(timeout=10)
        if redis is not None:
            redis.stop()
        topology.destroy()
        left = topology.existing()
        strays = {h: w.session_pids() for h, w in workers.items() if w.session_pids()}
        assert not left and not strays, f"left behind: namespaces {left}, worker processes {strays}"


@pytest.fixture
def healthy(deployment: Deployment) -> Iterator[Deployment]:
    """The deployment, healthy before the scenario and healed after it."""
    deployment.heal_all()
    deployment.wait_healthy()
    yield deployment
    deployment.heal_all()
    for node in deployment.cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            node.start()
            node.wait_running()
