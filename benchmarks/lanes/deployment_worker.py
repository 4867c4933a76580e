"""The deployment's batch-1 worker, one per run, shared by the lanes that measure it.

``deployment_noop``, ``deployment_infer`` and ``deployment_infer_chunked`` all
use this one ``celery -A tasks worker`` (the run's device, the model
preloaded): the first of them to start starts it, the last to close stops it.
It consumes its own direct queue and a class queue, and counts as ready once
the capability router's registry has its heartbeat, since the routed lanes
publish without ``queue=``.
"""

from __future__ import annotations

from benchmarks.lanes.base import LaneContext, LaneWorker
from routing.queues import direct_queue
from tasks import app
from tasks.client.routes import wait_for_workers
from tasks.ops.launcher import WorkerProcess

__all__ = ["deployment_worker"]


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


def _routable(process: WorkerProcess, timeout: float = 90.0) -> None:
    """Wait until the router's registry has the worker's heartbeat."""
    wait_for_workers(app.router, {process.hostname}, timeout)
