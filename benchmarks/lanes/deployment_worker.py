"""The deployment's workers, one of each per run, shared by the lanes that measure them.

``deployment_noop`` and ``deployment_infer`` use the batch-1 worker
(:func:`deployment_worker`); ``deployment_infer_batched`` and
``deployment_infer_chunked`` use the batching worker (:func:`batching_worker`,
``INFER_BATCHING``: the consumer strategy that sends each batch to the pool as
one job; a 64-sample chunk is a full batch of its own, and the chunks behind
it wait in the worker instead of a round trip away).  Each is one ``celery -A
tasks worker`` (the run's device, the model preloaded): the first lane to start
it starts it, the last to close stops it.  The batch-1 worker consumes its own
direct queue and a class queue, and counts as ready once the capability
router's registry has its heartbeat, since the routed lanes publish without
``queue=``; the batching worker is out of the router's sight (its own
registry namespace), so the routed lanes keep measuring the batch-1 worker.

:func:`batch1_capacity` is where ``deployment_infer`` leaves that worker's
saturated req/s of each round it runs, for lanes that scale their load to it
(``open_loop``).
"""

from __future__ import annotations

import os

from benchmarks.lanes.base import LaneContext, LaneWorker
from routing.queues import direct_queue
from tasks import app
from tasks.client.routes import wait_for_workers
from tasks.ops.launcher import WorkerProcess

__all__ = ["batch1_capacity", "batching_worker", "deployment_worker"]


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


def batching_worker(ctx: LaneContext) -> LaneWorker:
    """This run's batching worker (made on first ask); requests go to its own queue."""

    def make() -> LaneWorker:
        name = f"bench-b-{ctx.run}"
        process = WorkerProcess(
            name,
            ctx.device,
            logdir=ctx.logdir,
            batching=True,
            preload=(ctx.model,),
            queues=[direct_queue(name, name), name],
            env=dict(os.environ, INFER_REGISTRY_NAMESPACE=f"bench-batched-{ctx.run}"),
        )
        return LaneWorker(process)

    return ctx.shared("batching_worker", make)


def batch1_capacity(ctx: LaneContext) -> list[tuple[float, str]]:
    """This run's batch-1 req/s, one ``(value, figure)`` per round ``deployment_infer`` ran.

    ``figure`` names where the value came from: ``deployment_infer.saturated_req_s``
    (the saturation phase, ``--producers``) or ``deployment_infer.throughput_per_s``.
    """
    return ctx.shared("batch1_capacity", list)


def _routable(process: WorkerProcess, timeout: float = 90.0) -> None:
    """Wait until the router's registry has the worker's heartbeat."""
    wait_for_workers(app.router, {process.hostname}, timeout)
