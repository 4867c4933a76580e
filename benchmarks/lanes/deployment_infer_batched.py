"""Lane ``deployment_infer_batched``: dynamic batching, many single-sample requests in flight.

The run's batching worker (:func:`benchmarks.lanes.deployment_worker.batching_worker`,
out of the router's sight); requests go to its own queue, ``window``
(64, one full batch) in flight.  With ``--producers N`` it adds a saturation
phase on that queue, with twice as many requests in flight as the worker
reserves (its prefetch: ``INFER_BATCH_RESERVE`` x the largest batch, 128), so
that its prefetch refills from messages already waiting on the broker.  Summary: the round-trip figures of
:mod:`benchmarks.lanes.roundtrip`, ``model``, ``samples_per_s`` (one sample per
request), ``window``, and ``breakdown_ms``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.lanes.base import LaneContext
from benchmarks.lanes.deployment_worker import batching_worker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from benchmarks.producers import SATURATION_IN_FLIGHT, Saturation, request_input
from tasks import infer
from tasks.app import prefetch_multiplier

__all__ = ["BatchedInferLane"]


class BatchedInferLane(CeleryTaskLane):
    name = "deployment_infer_batched"
    window = 64  # single-sample requests in flight: one full batch

    def __init__(self, ctx: LaneContext) -> None:
        worker = batching_worker(ctx)
        process = worker.process
        model, x, queue = ctx.model, request_input(ctx.model), process.own_queue
        # Saturated with twice what the worker reserves (2 x the largest batch) in flight: its
        # prefetch refills from messages already on the broker, so the load does not limit
        # the lane (measured here, one producer: 128 in flight ~970 req/s, 256 ~1,040, 512 ~1,075).
        reserve = prefetch_multiplier(replace(ctx.settings, batching=True))
        super().__init__(
            ctx,
            lambda: infer.apply_async((model, x), queue=queue),
            worker,
            Saturation("infer", model, queue, window=max(SATURATION_IN_FLIGHT, 2 * reserve)),
        )

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.ctx.model,
            "samples_per_s": figures["throughput_per_s"],
            "window": self.window,
        }
