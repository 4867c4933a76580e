"""Lane ``deployment_infer_batched``: dynamic batching, many single-sample requests in flight.

A worker of its own with the batching consumer (threads pool, ``batching=True``),
out of the router's sight (its own registry namespace), so the routed lanes
keep measuring the batch-1 worker; requests go to its own queue, ``window``
(64, one full batch) in flight.  With ``--producers N`` it adds a saturation
phase on that queue.  Summary: the round-trip figures of
:mod:`benchmarks.lanes.roundtrip`, ``model``, ``samples_per_s`` (one sample per
request), ``window``, and ``breakdown_ms``.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.lanes.base import LaneContext, LaneWorker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from benchmarks.producers import Saturation, request_input
from routing.queues import direct_queue
from tasks import infer
from tasks.ops.launcher import WorkerProcess

__all__ = ["BatchedInferLane"]


class BatchedInferLane(CeleryTaskLane):
    name = "deployment_infer_batched"
    window = 64  # single-sample requests in flight: one full batch

    def __init__(self, ctx: LaneContext) -> None:
        name = f"bench-b-{ctx.run}"
        process = WorkerProcess(
            name,
            ctx.device,
            logdir=ctx.logdir,
            batching=True,
            preload=(ctx.model,),
            queues=[direct_queue(name, name), name],
            # Out of the router's sight, so the routed lanes keep measuring the batch-1 worker.
            env=dict(os.environ, INFER_REGISTRY_NAMESPACE=f"bench-batched-{ctx.run}"),
        )
        model, x, queue = ctx.model, request_input(ctx.model), process.own_queue
        super().__init__(
            ctx,
            lambda: infer.apply_async((model, x), queue=queue),
            LaneWorker(process),
            Saturation("infer", model, queue),
        )

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.ctx.model,
            "samples_per_s": figures["throughput_per_s"],
            "window": self.window,
        }
