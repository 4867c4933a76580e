"""A three-node RabbitMQ cluster and a Redis, each on its own test host.

Every node is the machine's installed ``rabbitmq-server``, started in its
host's namespace with a configuration of its own: the machine's
``/etc/rabbitmq`` pins the listener to 127.0.0.1 and its env file pins the
node name, so each node gets its own ``RABBITMQ_CONF_ENV_FILE``,
``RABBITMQ_CONFIG_FILE``, ``RABBITMQ_ADVANCED_CONFIG_FILE``,
``RABBITMQ_NODENAME`` (a long name, ``rabbit@<ip>``),
``RABBITMQ_DIST_PORT``, ``RABBITMQ_MNESIA_BASE``, ``RABBITMQ_LOG_BASE`` and
``RABBITMQ_ENABLED_PLUGINS_FILE``, and a private ``HOME`` holding the shared
Erlang cookie.  The scripts under ``/usr/lib/rabbitmq/bin`` are called
directly: ``/usr/sbin``'s wrappers switch to the rabbitmq user and its home.

Nodes 2 and 3 join node 1 with ``rabbitmqctl join_cluster``.  The cluster
runs ``pause_minority`` (a node cut off from the other two stops serving, so
its clients reconnect to the majority) and a short ``net_ticktime`` so a
partition is noticed in seconds instead of a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.multihost.topology import Host

__all__ = ["BrokerNode", "RabbitCluster", "RedisHost"]

BIN = Path("/usr/lib/rabbitmq/bin")
COOKIE = "INFERMULTIHOSTCOOKIE"
NET_TICKTIME = 8  # seconds; Erlang's default is 60


@dataclass
class BrokerNode:
    host: Host
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"rabbit@{self.host.ip}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host.ip}:5672//"

    def env(self) -> dict[str, str]:
        d = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(d.parent / "home"),
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "true",
            "RABBITMQ_DIST_PORT": "25672",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
        }

    def write_config(self) -> None:
        d = self.workdir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = {self.host.ip}:5672",
                    "loopback_users = none",
                    "cluster_partition_handling = pause_minority",
                    "log.console = false",
                    "log.file.level = info",
                    "",
                ]
            )
        )
        (d / "advanced.config").write_text(f"[{{kernel, [{{net_ticktime, {NET_TICKTIME}}}]}}].\n")

    def start(self) -> BrokerNode:
        self.write_config()
        out = open(self.workdir / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            self.host.argv([str(BIN / "rabbitmq-server")]),
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )
        out.close()
        return self

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        argv = self.host.argv(
            [
                str(BIN / "rabbitmqctl"),
                "--longnames",
                "-n",
                self.node,
                "--timeout",
                str(int(timeout)),
                *args,
            ]
        )
        done = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout + 15
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}"
            )
        return done.stdout

    def wait_running(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.node} exited: {self.log_tail()}")
            try:
                self.ctl("await_startup", timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"{self.node} did not start in {timeout}s: {last}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted((self.workdir / "log").glob("*.log"))
        text = "".join(p.read_text(errors="replace") for p in logs[:1])
        return "\n".join(text.splitlines()[-lines:])

    def pid(self) -> int | None:
        """The node's Erlang VM (beam.smp) pid: the process a ``kill -9`` hits."""
        out = self.ctl("eval", "list_to_integer(os:getpid()).", timeout=10, check=False).strip()
        return int(out) if out.isdigit() else None

    def kill9(self) -> None:
        """``kill -9`` the node's VM (and its epmd-less process group), like a lost machine."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.ctl("stop", timeout=30, check=False)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class RabbitCluster:
    """Three :class:`BrokerNode` s, clustered with ``join_cluster``."""

    def __init__(self, hosts: list[Host], workdir: Path) -> None:
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(COOKIE)
            cookie.chmod(0o400)
        self.nodes = [BrokerNode(h, workdir / h.name) for h in hosts]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def broker_url(self) -> str:
        """kombu's failover form: every node, ``;``-separated."""
        return ";".join(self.urls)

    def start(self) -> RabbitCluster:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_running()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        for node in self.nodes:
            node.wait_running()
        return self

    def running_nodes(self, via: BrokerNode | None = None) -> list[str]:
        """The running nodes as ``via`` sees them; [] when it cannot say (it is paused or down)."""
        via = via or self.nodes[0]
        try:
            status = json.loads(via.ctl("cluster_status", "--formatter", "json", timeout=20))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            return []
        return sorted(status.get("running_nodes", []))

    def by_node(self, node: str) -> BrokerNode:
        return next(n for n in self.nodes if n.node == node)

    def queue_status(self, queue: str, via: BrokerNode | None = None) -> dict[str, object]:
        """``leader`` and ``members`` of a quorum queue, as a running node sees them."""
        for node in [via] if via else self.nodes:
            if node is None:
                continue
            out = node.ctl(
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "messages",
                "--formatter",
                "json",
                timeout=20,
                check=False,
            )
            try:
                rows = json.loads(out)
            except ValueError:
                continue
            for row in rows:
                if row.get("name") == queue:
                    return dict(row)
        return {}

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


class RedisHost:
    """A redis-server on its own host (append-only, fsync always), listening on the host's address."""

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self.url = f"redis://{host.ip}:6379/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisHost:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.host.argv(
                [
                    "redis-server",
                    "--bind",
                    self.host.ip,
                    "--port",
                    "6379",
                    "--dir",
                    str(self.workdir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                    "--logfile",
                    str(self.workdir / "redis.log"),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = subprocess.run(
                self.host.argv(["redis-cli", "-h", self.host.ip, "ping"]),
                capture_output=True,
                text=True,
            )
            if done.stdout.strip() == "PONG":
                return self
            time.sleep(0.1)
        raise TimeoutError(f"redis on {self.host.ip} did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
