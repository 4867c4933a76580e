"""Lane ``dramatiq``: the second peer, a Dramatiq no-op actor (optional: ``pip install '.[peers]'``).

Same RabbitMQ (publisher confirms on) and Redis results; one worker process,
one thread, started as ``dramatiq benchmarks.dramatiq_peer`` on a queue of its
own.  Compare with ``celery_baseline`` (``dramatiq_vs_celery_baseline_p50``).
Summary: the round-trip figures of :mod:`benchmarks.lanes.roundtrip`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil

from benchmarks.lanes.base import (
    Lane,
    LaneContext,
    delete_queues,
    live_process,
    rss_mb,
    stop_session,
)
from benchmarks.lanes.roundtrip import RoundTripLane

__all__ = ["DramatiqLane"]


class DramatiqLane(RoundTripLane):
    """Round trips of a Dramatiq no-op actor (RabbitMQ + Redis results), one process, one thread."""

    name = "dramatiq"

    @classmethod
    def build(cls, ctx: LaneContext) -> Lane | None:
        return cls(ctx) if importlib.util.find_spec("dramatiq") is not None else None

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.queue = f"bench-dramatiq-{uuid.uuid4().hex[:6]}"
        os.environ["BENCH_DRAMATIQ_QUEUE"] = self.queue  # read when the peer module is imported
        from benchmarks import dramatiq_peer

        self.peer = dramatiq_peer  # its worker: the dramatiq CLI imports it by this module path
        self.logfile = ctx.logdir / "dramatiq.log"
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
                    self.peer.__name__,
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

    def setup(self) -> None:
        deadline = time.monotonic() + 90
        while "ready for action" not in self.logfile.read_text(errors="replace"):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dramatiq worker failed to start: {self.logfile.read_text()}")
            time.sleep(0.1)
        self.warm_up()

    def wait(self, pending: Any) -> Any:
        return pending.get_result(block=True, timeout=60_000)

    def rss_mb(self) -> float | None:
        peer = live_process(self.proc)
        return rss_mb(peer.pid) if peer is not None else None

    def peer_process(self) -> psutil.Process | None:
        return live_process(self.proc)

    def close(self) -> None:
        stop_session(self.proc)
        self.peer.broker.close()
        delete_queues([self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"])
