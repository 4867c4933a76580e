"""A fleet of real workers and the client processes that load them, as the scaling and overload
lanes run them.

Each lane starts its workers (:class:`~tasks.ops.launcher.WorkerProcess`, a
class queue and registry namespace of the fleet's own) and client processes
(the lane's own module run as a script), which say ``READY`` on stdout,
take one command per line on stdin and answer each with one JSON line.
:class:`ClientFleet` is that shared part: spawning the clients with a log
each, waiting for ``READY``, sending commands, reading their answers by a
deadline, reading CPU by process group over a window, resident memory, and
a teardown that leaves no process or queue behind.  What a lane sends and
how it merges the answers stays in the lane.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import psutil

from benchmarks.cpu import CpuMeter, Group, descendants, own
from benchmarks.lanes.base import LaneContext, delete_queues, rss_mb, services
from tasks.ops.launcher import WorkerProcess

__all__ = ["READY_TIMEOUT_S", "ClientFleet", "busy_s", "sleep_until"]

READY_TIMEOUT_S = 180.0  # workers preloading their model, clients importing theirs


def busy_s(times: Any) -> float:
    """Busy CPU seconds of a ``psutil.cpu_times()`` (idle and iowait left out; guest is in user)."""
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, f, 0.0) for f in fields))


def sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


def _union(groups: Sequence[Group]) -> Group:
    """One group of several (their keys are pids: distinct)."""
    return lambda: {k: v for g in groups for k, v in g().items()}


class ClientFleet:
    """``workers`` in class queue ``queue`` (also their registry namespace), and their clients."""

    def __init__(
        self,
        ctx: LaneContext,
        label: str,
        queue: str,
        env: dict[str, str],
        workers: list[WorkerProcess],
    ) -> None:
        self.ctx, self.label, self.queue, self.env = ctx, label, queue, env
        self.workers = workers
        self.clients: list[subprocess.Popen[str]] = []
        self._logs: list[IO[str]] = []
        self.meter: CpuMeter | None = None

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def spawn(self, argv: list[str], count: int, log_name: Callable[[int], str]) -> None:
        """``count`` clients ``python -m <argv> --seed i``, each logging to ``log_name(i)``."""
        for i in range(count):
            log = (self.ctx.logdir / log_name(i)).open("w")
            self._logs.append(log)
            self.clients.append(
                subprocess.Popen(
                    [sys.executable, "-m", *argv, "--seed", str(i)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=self.env,
                )
            )

    def wait_clients(self) -> None:
        """Every client's ``READY``; then a CPU meter over clients, workers, RabbitMQ and Redis."""
        deadline = time.time() + READY_TIMEOUT_S
        for client in self.clients:
            if not self.read_line(client, deadline, "READY").startswith("READY"):
                raise RuntimeError(f"{self.label} client {client.pid} did not say READY")
        svc = services(self.ctx)
        mains = [psutil.Process(w.pid) for w in self.workers]
        groups: dict[str, Group] = {
            "client": _union([own(psutil.Process(c.pid)) for c in self.clients]),
            "worker_main": _union([own(p) for p in mains]),
            "worker_child": _union([descendants(p) for p in mains]),
            "rabbitmq": own(svc["rabbitmq"]),
            "redis": own(svc["redis"]),
        }
        self.meter = CpuMeter(groups)

    def read_line(self, proc: subprocess.Popen[str], deadline: float, what: str) -> str:
        """One line from a client's stdout by ``deadline`` (epoch), else RuntimeError."""
        stdout = proc.stdout
        assert stdout is not None
        while True:
            left = deadline - time.time()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise RuntimeError(f"{self.label} client {proc.pid}: no {what} in time")
            line = stdout.readline()
            if not line:
                raise RuntimeError(
                    f"{self.label} client {proc.pid} exited ({proc.poll()}) before {what}"
                )
            if line.strip():
                return line

    def send(self, lines: Sequence[str]) -> None:
        """One command line to each client (``lines[i]`` to client i)."""
        for client, line in zip(self.clients, lines, strict=True):
            assert client.stdin is not None
            client.stdin.write(line + "\n")
            client.stdin.flush()

    def reports(self, deadline: float, what: str) -> list[dict[str, Any]]:
        """Each client's JSON answer, by ``deadline`` (epoch)."""
        return [json.loads(self.read_line(c, deadline, what)) for c in self.clients]

    def cpu_over(self, t0: float, t1: float) -> tuple[dict[str, float], float]:
        """CPU seconds by group over ``[t0, t1]``, and the whole machine's busy seconds."""
        assert self.meter is not None
        sleep_until(t0)
        self.meter.start()
        machine = busy_s(psutil.cpu_times())
        sleep_until(t1)
        cpu_s = self.meter.stop()
        return cpu_s, busy_s(psutil.cpu_times()) - machine

    def rss(self) -> tuple[float | None, float | None]:
        """The largest worker's and the largest client's resident memory, MB."""
        workers = [rss_mb(w.pid) for w in self.workers if w.alive()]
        clients = [rss_mb(c.pid, children=False) for c in self.clients if c.poll() is None]
        return max(workers, default=None), max(clients, default=None)

    def close(self) -> None:
        for client in self.clients:
            if client.poll() is None and client.stdin is not None:
                with contextlib.suppress(OSError):
                    client.stdin.write("EXIT\n")
                    client.stdin.close()
        for client in self.clients:
            try:
                client.wait(timeout=10)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        for log in self._logs:
            log.close()
        for w in self.workers:
            w.stop()
        delete_queues([self.queue, *(w.own_queue for w in self.workers)])
