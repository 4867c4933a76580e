"""Lane ``deployment_noop``: our deployment's own overhead, a no-op task through the router.

``tasks.noop`` (``apply_async()``, no ``queue=``: the capability router picks
the worker) to the run's deployment worker
(:mod:`benchmarks.lanes.deployment_worker`).  With ``--producers N`` it adds
a saturation phase on the worker's own queue.  Summary: the round-trip figures
of :mod:`benchmarks.lanes.roundtrip` (``breakdown_ms``: the queue wait the task
reports), then ``router_stats``: the real router's counts and decision times
in this process, over every routed lane of the run.
"""

from __future__ import annotations

from typing import Any

from benchmarks.lanes.base import LaneContext
from benchmarks.lanes.deployment_worker import deployment_worker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from benchmarks.producers import Saturation
from tasks import app, noop

__all__ = ["DeploymentNoopLane"]


class DeploymentNoopLane(CeleryTaskLane):
    name = "deployment_noop"

    def __init__(self, ctx: LaneContext) -> None:
        worker = deployment_worker(ctx)
        saturation = Saturation("noop", ctx.model, worker.process.own_queue)
        super().__init__(ctx, lambda: noop.apply_async(), worker, saturation)

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        return {**super().summary(worker_rss_mb), "router_stats": app.router.stats.as_dict()}
