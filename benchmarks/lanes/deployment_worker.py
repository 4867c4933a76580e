"""The deployment's batch-1 worker, one per run, shared by the lanes that measure it.

``deployment_noop``, ``deployment_infer`` and ``deployment_infer_chunked`` all
use this one ``celery -A tasks worker`` (the run's device, the model
preloaded): the first of them to start starts it, the last to close stops it.
It consumes its own direct queue and a class queue, and counts as ready once
the capability router's registry has its heartbeat, since the routed lanes
publish without ``queue=``.

:func:`batch1_capacity` is where ``deployment_infer`` leaves that worker's
saturated req/s of each round it runs, for lanes that scale their load to it
(``open_loop``).
"""

from __future__ import annotations

from benchmarks.lanes.base import LaneContext, LaneWorker
from routing.queues import direct_queue
from tasks import app
from tasks.client.routes import wait_for_workers
from tasks.ops.launcher import WorkerProcess

__all__ = ["batch1_capacity", "deployment_worker"]


def deployment_worker(ctx: LaneContext) -> LaneWorker:
    """This run's deployment worker (made on first ask)."""

    def make() -> LaneWorker:
        shared, name = f"bench-deploy-{ctx.run}", f"bench-{ctx.run}"
        process = WorkerProcess(
            name,
            ctx.device,
            logdir=ctx.logdir,
            queues=[direct_queue(shared, name), shared],
            preload=(ctx.model,),
        )
        return LaneWorker(process, ready=_routable)

    return ctx.shared("deployment_worker", make)


def batch1_capacity(ctx: LaneContext) -> list[tuple[float, str]]:
    """This run's batch-1 req/s, one ``(value, figure)`` per round ``deployment_infer`` ran.

    ``figure`` names where the value came from: ``deployment_infer.saturated_req_s``
    (the saturation phase, ``--producers``) or ``deployment_infer.throughput_per_s``.
    """
    return ctx.shared("batch1_capacity", list)


def _routable(process: WorkerProcess, timeout: float = 90.0) -> None:
    """Wait until the router's registry has the worker's heartbeat."""
    wait_for_workers(app.router, {process.hostname}, timeout)
