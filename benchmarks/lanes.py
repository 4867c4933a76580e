"""Benchmark lanes: each one starts its own peer processes and runs rounds.

A round is a closed loop of ``requests`` round trips with one in flight
(latency), then ``window_requests`` more with ``window`` in flight
(throughput), timing each publish call on the way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from memory_profiler import memory_usage

from benchmarks.amqp import pika_parameters
from tasks.ops.launcher import WorkerProcess

__all__ = [
    "AmqpFloorLane",
    "CeleryLane",
    "ChunkedLane",
    "DramatiqLane",
    "InProcessLane",
    "Lane",
    "RoundConfig",
    "RoundResult",
    "RoundTripLane",
    "rss_mb",
]


@dataclass(frozen=True)
class RoundConfig:
    requests: int  # closed loop, one in flight
    window: int  # requests in flight for the throughput phase
    window_requests: int
    producers: int = 0  # client processes of the saturation phase (0: no such phase)


@dataclass
class RoundResult:
    rtt_ms: list[float] = field(default_factory=list)
    throughput_per_s: float = 0.0
    publish_us: float | None = None
    samples_per_s: dict[str, float] = field(default_factory=dict)  # in_process: by batch size
    saturated_per_s: float | None = None  # requests/s with `producers` clients at once
    breakdown_ms: dict[str, list[float]] = field(default_factory=dict)


class Lane(Protocol):
    name: str

    def start(self) -> None: ...
    def wait_ready(self) -> None: ...
    def run_round(self, cfg: RoundConfig) -> RoundResult: ...
    def rss_mb(self) -> float | None: ...
    def stop(self) -> None: ...


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of ``pid`` (plus its children, e.g. a prefork pool), via memory-profiler."""
    return round(float(memory_usage(proc=pid, include_children=children, max_usage=True)), 1)


class RoundTripLane:
    """A lane of request/response round trips: subclasses give ``submit`` and ``wait``."""

    name: str
    window: int | None = None  # requests in flight for throughput; None: the plan's

    def submit(self) -> Any:
        raise NotImplementedError

    def wait(self, pending: Any) -> Any:
        raise NotImplementedError

    def warm_up(self, n: int = 5) -> None:
        for _ in range(n):
            self.wait(self.submit())

    def run_round(self, cfg: RoundConfig) -> RoundResult:
        out = RoundResult()
        for _ in range(cfg.requests):
            started = time.perf_counter()
            value = self.wait(self.submit())
            out.rtt_ms.append((time.perf_counter() - started) * 1000.0)
            _collect_timing(out, value)
        in_flight: deque[Any] = deque()
        publish_s = 0.0
        started = time.perf_counter()
        window = self.window or cfg.window
        for _ in range(cfg.window_requests):
            if len(in_flight) >= window:
                self.wait(in_flight.popleft())
            t0 = time.perf_counter()
            in_flight.append(self.submit())
            publish_s += time.perf_counter() - t0
        while in_flight:
            self.wait(in_flight.popleft())
        out.throughput_per_s = cfg.window_requests / (time.perf_counter() - started)
        out.publish_us = publish_s / cfg.window_requests * 1e6
        return out


def _collect_timing(out: RoundResult, value: Any) -> None:
    """Keep the timing breakdown a deployment task returns (``{"timing": {...}}``)."""
    timing = value.get("timing") if isinstance(value, dict) else None
    for key, ms in (timing or {}).items():
        if isinstance(ms, int | float):
            out.breakdown_ms.setdefault(key, []).append(float(ms))


def _delete_queues(names: list[str]) -> None:
    """Leave no benchmark queue behind on the broker."""
    from tasks import app
    from tasks.wire.queues import remove_topology

    remove_topology(app, names)


def _stop_session(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a peer's process session, SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class CeleryLane(RoundTripLane):
    """Round trips of one Celery task through ``submit()`` to a real worker process.

    ``saturate`` (producer arguments, see :mod:`benchmarks.producers`) adds a
    saturation phase when the round asks for producers: that many client
    processes load the worker at once, ``saturate_window`` (else ``window``)
    requests in flight in all.
    """

    def __init__(
        self,
        name: str,
        submit: Callable[[], Any],
        worker: WorkerProcess,
        window: int | None = None,
        saturate: list[str] | None = None,
        saturate_window: int | None = None,
    ) -> None:
        self.name = name
        self._submit = submit
        self.worker = worker
        self.window = window
        self.saturate = saturate
        self.saturate_window = saturate_window

    def submit(self) -> Any:
        return self._submit()

    def run_round(self, cfg: RoundConfig) -> RoundResult:
        out = super().run_round(cfg)
        if cfg.producers > 0 and self.saturate is not None:
            out.saturated_per_s = saturate(
                self.saturate,
                producers=cfg.producers,
                requests=max(cfg.window_requests, 2 * cfg.window),
                window=self.saturate_window or self.window or cfg.window,
            )
        return out

    def wait(self, pending: Any) -> Any:
        return pending.get(timeout=60)

    def start(self) -> None:
        self.worker.start()

    def wait_ready(self) -> None:
        self.worker.wait_ready()
        self.warm_up()  # the pool child starts, preloads and warms up

    def rss_mb(self) -> float | None:
        return rss_mb(self.worker.pid) if self.worker.alive() else None

    def stop(self) -> None:
        self.worker.stop()
        _delete_queues(self.worker.consumed_queues)


def saturate(args: list[str], producers: int, requests: int, window: int) -> float:
    """Requests/s of ``producers`` processes sending ``requests`` in all, ``window`` in flight."""
    each_window = max(1, window // producers)
    each = max(each_window, requests // producers)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.producers",
                *args,
                "--requests",
                str(each),
                "--window",
                str(each_window),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(producers)
    ]
    try:
        for p in procs:
            _expect(p, "READY")
        for p in procs:  # all warm: start them together
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        reports = [json.loads(_expect(p, "{")) for p in procs]
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = sum(r["errors"] for r in reports)
    if errors:
        raise RuntimeError(f"saturation phase: {errors} of {each * producers} requests failed")
    span = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    return sum(r["sent"] for r in reports) / span


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"producer said {line!r}, expected {prefix!r}: {err[-2000:]}")
    return line


class AmqpFloorLane(RoundTripLane):
    """Raw AMQP with pika: publish (confirmed, persistent) -> echo process -> reply queue."""

    name = "amqp_floor"

    def __init__(self, url: str, logdir: Path) -> None:
        import pika

        self.url = url
        self.queue = f"bench-echo-{uuid.uuid4().hex[:6]}"
        self.logfile = logdir / "echo.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection = pika.BlockingConnection(pika_parameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.queue_declare(queue=self.queue, durable=True)
        self.reply_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.replies: set[str] = set()
        self.channel.basic_consume(
            queue=self.reply_queue,
            auto_ack=True,
            on_message_callback=lambda _ch, _m, props, _b: self.replies.add(props.correlation_id),
        )
        self.body = b"x" * 64

    def start(self) -> None:
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.echo", self.url, self.queue],
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"echo consumer failed to start: {self.logfile.read_text()}")
        self.warm_up()

    def submit(self) -> str:
        import pika

        corr = uuid.uuid4().hex
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            body=self.body,
            properties=pika.BasicProperties(
                reply_to=self.reply_queue, correlation_id=corr, delivery_mode=2
            ),
        )
        return corr

    def wait(self, corr: str) -> None:
        deadline = time.monotonic() + 60
        while corr not in self.replies:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from the echo consumer")
            self.connection.process_data_events(time_limit=1)
        self.replies.discard(corr)

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        _stop_session(self.proc)
        if self.connection.is_open:
            self.channel.queue_delete(self.queue)
            self.connection.close()


class DramatiqLane(RoundTripLane):
    """Round trips of a Dramatiq no-op actor (RabbitMQ + Redis results), one process, one thread."""

    name = "dramatiq"

    def __init__(self, logdir: Path) -> None:
        self.queue = f"bench-dramatiq-{uuid.uuid4().hex[:6]}"
        os.environ["BENCH_DRAMATIQ_QUEUE"] = self.queue  # read when the peer module is imported
        from benchmarks import dramatiq_peer

        self.peer = dramatiq_peer
        self.logfile = logdir / "dramatiq.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def submit(self) -> Any:
        return self.peer.noop.send()

    def start(self) -> None:
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dramatiq",
                    "benchmarks.dramatiq_peer",
                    "-p",
                    "1",
                    "-t",
                    "1",
                    "-Q",
                    self.queue,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while "ready for action" not in self.logfile.read_text(errors="replace"):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dramatiq worker failed to start: {self.logfile.read_text()}")
            time.sleep(0.1)
        self.warm_up()

    def wait(self, pending: Any) -> Any:
        return pending.get_result(block=True, timeout=60_000)

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        _stop_session(self.proc)
        self.peer.broker.close()
        _delete_queues([self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"])


class ChunkedLane:
    """``infer_many`` over many inputs at one batch size: served samples/s with canvas batching."""

    name = "deployment_infer_chunked"

    def __init__(self, model: str, batch: int, sample_shape: tuple[int, ...], queue: str) -> None:
        self.model, self.batch, self.queue = model, batch, queue
        self.sample_shape = sample_shape

    def start(self) -> None:
        pass

    def wait_ready(self) -> None:
        self._run(self.batch * 2)

    def _run(self, n: int) -> float:
        import numpy as np

        from tasks import infer_many

        x = np.random.default_rng(n).standard_normal((n, *self.sample_shape), dtype=np.float32)
        started = time.perf_counter()
        infer_many(self.model, x, batch_size=self.batch, queue=self.queue).get(timeout=600)
        return n / (time.perf_counter() - started)

    def run_round(self, cfg: RoundConfig) -> RoundResult:
        n = max(4, cfg.window_requests // self.batch) * self.batch
        out = RoundResult()
        out.samples_per_s = {str(self.batch): self._run(n)}
        return out

    def rss_mb(self) -> float | None:
        return None

    def stop(self) -> None:
        pass


class InProcessLane:
    """The CNN forward pass in this process at each batch size: the compute limit."""

    name = "in_process"

    def __init__(
        self, model: str, batches: tuple[int, ...], device: str, threads: int, weights: Path
    ) -> None:
        self.model_name = model
        self.batches = batches
        self.device_name = device
        self.threads = threads
        self.weights = weights
        self.model: Any = None

    def start(self) -> None:
        pass

    def wait_ready(self) -> None:
        pass  # loads on its first round, so the client's RSS is measured without torch

    def _load(self) -> None:
        import torch

        from models.loader import load_model
        from models.registry import get_spec
        from models.runner import resolve_device, resolve_dtype

        torch.set_num_threads(self.threads)
        self.spec = get_spec(self.model_name)
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(None, self.spec, self.device)
        from models.runner import DTYPES

        self.model = load_model(self.spec, self.weights, self.device, DTYPES[self.dtype])
        self._rate(1, 5)

    def _rate(self, batch: int, iterations: int) -> float:
        import numpy as np

        from models.runner import forward

        x = np.random.default_rng(batch).standard_normal(
            (batch, *self.spec.sample_shape), dtype=np.float32
        )
        forward(self.model, x, self.device, self.dtype)
        started = time.perf_counter()
        for _ in range(iterations):
            forward(self.model, x, self.device, self.dtype)
        return batch * iterations / (time.perf_counter() - started)

    def run_round(self, cfg: RoundConfig) -> RoundResult:
        if self.model is None:
            self._load()
        out = RoundResult()
        for batch in self.batches:
            # Enough iterations to cover about as many samples as a served round.
            iterations = max(3, min(cfg.requests, cfg.window_requests // batch))
            out.samples_per_s[str(batch)] = self._rate(batch, iterations)
        return out

    def rss_mb(self) -> float | None:
        return None

    def stop(self) -> None:
        self.model = None
