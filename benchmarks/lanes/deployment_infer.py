"""Lane ``deployment_infer``: one CNN inference per request through the router, batch 1.

``infer.apply_async((model, x))`` with the run's one seeded sample, no
``queue=`` (the capability router picks the worker), to the run's deployment
worker (:mod:`benchmarks.lanes.deployment_worker`).  With ``--producers N`` it
adds a saturation phase on the worker's own queue.  Summary: the round-trip
figures of :mod:`benchmarks.lanes.roundtrip`, ``model`` and ``samples_per_s``
(one sample per request), and ``breakdown_ms`` (the worker's own timings,
e.g. ``compute_ms``).  Each round leaves the worker's saturated req/s (the
saturation phase's, else the window phase's) in
:func:`~benchmarks.lanes.deployment_worker.batch1_capacity` for ``open_loop``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.lanes.base import LaneContext, RoundConfig
from benchmarks.lanes.deployment_worker import batch1_capacity, deployment_worker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from benchmarks.producers import Saturation, request_input
from tasks import infer

__all__ = ["DeploymentInferLane"]


class DeploymentInferLane(CeleryTaskLane):
    name = "deployment_infer"

    def __init__(self, ctx: LaneContext) -> None:
        worker = deployment_worker(ctx)
        model, x = ctx.model, request_input(ctx.model)
        saturation = Saturation("infer", model, worker.process.own_queue)
        super().__init__(ctx, lambda: infer.apply_async((model, x)), worker, saturation)

    def run_round(self, cfg: RoundConfig) -> None:
        super().run_round(cfg)
        last = self.rounds[-1]
        if last.saturated_per_s is not None:
            figure = (last.saturated_per_s, f"{self.name}.saturated_req_s")
        else:
            figure = (last.throughput_per_s, f"{self.name}.throughput_per_s")
        batch1_capacity(self.ctx).append(figure)

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.ctx.model, "samples_per_s": figures["throughput_per_s"]}
