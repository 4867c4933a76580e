"""Lane ``celery_batches``: the celery-batches peer, batching one sample per request (optional).

The same CNN served by :mod:`benchmarks.celery_batches_peer` (celery-batches,
``flush_every`` 64, ``flush_interval`` 5 ms: our batcher's limits), whose
worker runs under another interpreter because celery-batches pins celery < 5.7
(``make celery-batches-venv``; the lane runs only when
``BENCH_CELERY_BATCHES_PYTHON`` names it).  Requests carry the run's seeded
sample, 64 in flight, to the peer's queue.  Compare with
``deployment_infer_batched`` (``batched_vs_celery_batches_samples``).
Summary: the round-trip figures of :mod:`benchmarks.lanes.roundtrip`,
``model`` and ``samples_per_s``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from benchmarks.lanes.base import Lane, LaneContext, LaneWorker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from benchmarks.producers import request_input
from tasks.ops.launcher import WorkerProcess
from tasks.wire.codec import encode

__all__ = ["CeleryBatchesLane"]

PEER_MODULE = "benchmarks.celery_batches_peer"  # started as `celery -A` this, by module path
REPO = Path(__file__).resolve().parents[2]  # on the peer's PYTHONPATH, for benchmarks and models


class CeleryBatchesLane(CeleryTaskLane):
    name = "celery_batches"
    window = 64  # single-sample requests in flight: one full batch

    @classmethod
    def build(cls, ctx: LaneContext) -> Lane | None:
        return cls(ctx) if os.environ.get("BENCH_CELERY_BATCHES_PYTHON") else None

    def __init__(self, ctx: LaneContext) -> None:
        settings = ctx.settings
        queue = f"bench-cb-{ctx.run}"
        client = Celery("celery-batches-client", set_as_current=False)
        client.conf.update(
            broker_url=settings.broker,
            result_backend=settings.backend,
            task_serializer="msgpack",
            result_serializer="msgpack",
            accept_content=["msgpack", "json"],
            result_accept_content=["msgpack", "json"],
        )
        envelope = encode(request_input(ctx.model), binary=True)
        name = f"cb-{ctx.run}"
        process = WorkerProcess(
            name,
            "cpu",
            logdir=ctx.logdir,
            python=os.environ["BENCH_CELERY_BATCHES_PYTHON"],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            command=[
                "celery",
                "-A",
                PEER_MODULE,
                "worker",
                "-n",
                f"{name}@%h",
                "-Q",
                queue,
                "-P",
                "prefork",
                "-c",
                "1",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
        )
        super().__init__(
            ctx,
            lambda: client.send_task("celery_batches_peer.infer", args=(envelope,), queue=queue),
            LaneWorker(process),
        )

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.ctx.model, "samples_per_s": figures["throughput_per_s"]}
