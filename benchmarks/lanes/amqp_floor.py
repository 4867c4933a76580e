"""Lane ``amqp_floor``: the messaging floor, raw AMQP with pika and no Celery at all.

Each round trip publishes a 64-byte body (confirmed, persistent) to a durable
queue; the echo process (:mod:`benchmarks.echo`, prefetch 1, manual acks)
publishes it back to this client's exclusive reply queue.  Every Celery lane
is compared with this one (``*_vs_amqp_floor_p50``, ``broker_overhead_ms_*``).
Summary: the round-trip figures of :mod:`benchmarks.lanes.roundtrip`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil

from benchmarks.amqp import pika_parameters
from benchmarks.lanes.base import (
    LaneContext,
    delete_queues,
    live_process,
    rss_mb,
    stop_session,
)
from benchmarks.lanes.roundtrip import RoundTripLane

__all__ = ["AmqpFloorLane"]


class AmqpFloorLane(RoundTripLane):
    """Raw AMQP with pika: publish (confirmed, persistent) -> echo process -> reply queue."""

    name = "amqp_floor"

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.url = ctx.settings.broker
        self.queue = f"bench-echo-{uuid.uuid4().hex[:6]}"
        self.logfile = ctx.logdir / "echo.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection: Any = None
        self.replies: set[str] = set()
        self.body = b"x" * 64

    def start(self) -> None:
        import pika

        # No heartbeats: a blocking connection only answers them during this lane's own
        # rounds, and the other lanes' rounds (minutes in a full run) would let the broker
        # drop it (seen: a full run lost its results to that at the end).
        self.connection = pika.BlockingConnection(pika_parameters(self.url, heartbeat=0))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.queue_declare(queue=self.queue, durable=True)
        self.reply_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(
            queue=self.reply_queue,
            auto_ack=True,
            on_message_callback=lambda _ch, _m, props, _b: self.replies.add(props.correlation_id),
        )
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.echo", self.url, self.queue],
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )

    def setup(self) -> None:
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
        peer = live_process(self.proc)
        return rss_mb(peer.pid) if peer is not None else None

    def peer_process(self) -> psutil.Process | None:
        return live_process(self.proc)

    def close(self) -> None:
        stop_session(self.proc)
        if self.connection is not None and self.connection.is_open:
            with contextlib.suppress(Exception):  # dropped by the broker: a fresh one below
                self.channel.queue_delete(self.queue)
                self.connection.close()
                return
        delete_queues([self.queue])
