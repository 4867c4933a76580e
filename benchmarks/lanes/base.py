"""The shape of a benchmark lane, and what the lanes of one run share.

A lane measures one thing (a peer, a deployment path, the compute limit) and
owns its whole story: the processes it starts, its measured loop and its entry
in the results file.  The run (:mod:`benchmarks.run`) drives every lane the
same way::

    lane = SomeLane.build(ctx)    # None: the lane cannot run here (optional peer missing)
    lane.start()                  # launch peers, don't wait: every lane's peers boot at once
    lane.setup()                  # wait until ready, warm up
    lane.run_round(cfg)           # one measured round, interleaved with the other lanes
    lane.rss_mb()                 # its peer's memory, read after the rounds
    lane.close()                  # stop its peers, delete its queues (safe if never started)
    lane.summary(rss)             # its entry under "lanes" in the results file

The broker and backend every lane shares are found once per run
(:func:`services`), for the lanes' CPU accounting (:mod:`benchmarks.cpu`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from memory_profiler import memory_usage

from benchmarks.cpu import find_process
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tasks.settings import Settings
from tasks.wire.topology import remove_topology

__all__ = [
    "Lane",
    "LaneContext",
    "LaneWorker",
    "RoundConfig",
    "delete_queues",
    "live_process",
    "rss_mb",
    "services",
    "stop_session",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RoundConfig:
    """The sizes of one round, the same for every lane of a run."""

    requests: int  # closed loop, one in flight
    window: int  # requests in flight for the throughput phase
    window_requests: int
    producers: int = 0  # client processes of the saturation phase (0: no such phase)


@dataclass
class LaneContext:
    """What the lanes of one run share: its id, its log folder, its device and model, peers."""

    logdir: Path
    device: str  # of the inference lanes: cpu, cuda:N, auto
    model: str  # the model every inference lane serves
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])  # names queues and workers
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def settings(self) -> Settings:
        """The deployment's settings (broker, backend, serializer, weights), read once."""
        return app.infer_settings

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """The one ``key`` of this run (e.g. a worker several lanes use), made on first ask."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value


class Lane:
    """One lane.  Subclasses give ``name``, ``run_round`` and ``summary``; the rest may stay no-ops."""

    name: str
    loads_torch_here = False  # its rounds load torch here: the run reads the client's RSS first

    def __init__(self, ctx: LaneContext) -> None:
        self.ctx = ctx

    @classmethod
    def build(cls, ctx: LaneContext) -> Lane | None:
        """The lane for this run, or None where it cannot run (an optional peer is missing)."""
        return cls(ctx)

    def start(self) -> None:
        """Launch its peer processes without waiting for them."""

    def setup(self) -> None:
        """Wait until its peers are ready and warm them up (not measured)."""

    def run_round(self, cfg: RoundConfig) -> None:
        """One measured round; the lane keeps its own figures."""
        raise NotImplementedError

    def rss_mb(self) -> float | None:
        """Resident memory of its peer process, read after the rounds (None: no peer)."""
        return None

    def latency_ms(self) -> list[float]:
        """Its one-in-flight round trips of every round, for the latency CDF ([]: none)."""
        return []

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        """Its entry under ``lanes`` in the results file (median of rounds)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop its peers and leave nothing behind on the broker; safe when never started."""


class LaneWorker:
    """A worker process one or more lanes use: the first to start it starts it, the last stops it.

    ``ready`` is an extra readiness check after the worker logs ``ready.`` (e.g.
    the router has seen its heartbeat).  Stopping deletes the queues it consumed.
    """

    def __init__(
        self, process: WorkerProcess, ready: Callable[[WorkerProcess], None] | None = None
    ) -> None:
        self.process = process
        self._ready_check = ready
        self._users: set[str] = set()
        self._ready = False

    def start(self, user: str) -> None:
        if not self._users:
            self.process.start()
        self._users.add(user)

    def wait_ready(self) -> None:
        if not self._ready:
            self.process.wait_ready()
            if self._ready_check is not None:
                self._ready_check(self.process)
            self._ready = True

    def rss_mb(self) -> float | None:
        return rss_mb(self.process.pid) if self.process.alive() else None

    def stop(self, user: str) -> None:
        """Stop it when ``user`` was the last lane using it (a user that never started: no-op)."""
        if user not in self._users:
            return
        self._users.discard(user)
        if not self._users:
            self.process.stop()
            delete_queues(self.process.consumed_queues)


def services(ctx: LaneContext) -> dict[str, psutil.Process | None]:
    """This host's RabbitMQ (``beam.smp``) and Redis (``redis-server``) processes, None if absent."""
    return ctx.shared(
        "services",
        lambda: {"rabbitmq": find_process("beam.smp"), "redis": find_process("redis-server")},
    )


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of ``pid`` (plus its children, e.g. a prefork pool), via memory-profiler."""
    return round(float(memory_usage(proc=pid, include_children=children, max_usage=True)), 1)


def delete_queues(names: list[str]) -> None:
    """Leave no benchmark queue behind on the broker."""
    remove_topology(app, names)


def live_process(proc: subprocess.Popen[bytes] | None) -> psutil.Process | None:
    """The peer's process while it runs, else None (never started, or exited)."""
    return psutil.Process(proc.pid) if proc is not None and proc.poll() is None else None


def stop_session(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a peer's process session, SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_alone(
    name: str,
    options: Any,
    path: Path,
    make_lane: Callable[[LaneContext, Any], Any],
    results_file: Callable[[dict[str, Any], Any, dict[str, Any], Any], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], Path],
) -> dict[str, Any]:
    """Run a lane with a subcommand of its own (``scaling``, ``overload``); its summary.

    On RabbitMQ and Redis only: starts the lane, runs ``options.rounds``
    rounds, writes the results file at ``path``, its plot beside it, and
    prints the table.
    """
    from benchmarks.machine import machine_info
    from benchmarks.report import print_table

    ctx = LaneContext(
        Path(tempfile.mkdtemp(prefix=f"infer-{name}-")), options.device, options.model
    )
    settings = ctx.settings
    if settings.embedded or not settings.broker.startswith(("amqp", "pyamqp")):
        raise SystemExit(
            f"the {name} lane runs on RabbitMQ and Redis: set CELERY_BROKER_URL=amqp://... and "
            "CELERY_RESULT_BACKEND=redis://..."
        )
    lane = make_lane(ctx, options)
    try:
        lane.start()
        lane.setup()
        for _ in range(options.rounds):
            lane.run_round(RoundConfig(requests=0, window=0, window_requests=0))
        worker_rss = lane.rss_mb()
    finally:
        lane.close()
    summary: dict[str, Any] = lane.summary(worker_rss)
    machine = machine_info(settings.broker, settings.backend, settings.serializer, options.device)
    result = results_file(summary, options, machine, lane.client_rss_mb())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    stem = path.stem if path.stem.endswith(name) else f"{path.stem}-{name}"
    drawn = plot(summary, path.with_name(stem + ".png"))
    print_table(result, path.as_posix())
    print(f"wrote {path}, {drawn} (worker and client logs in {ctx.logdir})")
    return summary
