"""Lanes ``celery_baseline``, ``celery_default``, ``celery_tuned``: vanilla Celery, not our app.

A no-op task of a stock Celery app (:mod:`benchmarks.vanilla`, which spells out
each profile) on the same broker and backend, its worker started with that
profile's command line.  ``deployment_noop / celery_baseline`` isolates what our
own code adds; ``default`` and ``tuned`` place stock Celery around it.
``tuned`` takes its results over ``rpc://``: with Redis results, Celery 5.7.0's
client stalled for ~10 s at a time with 16 in flight (details in
:mod:`benchmarks.vanilla`).  Summary: the round-trip figures of
:mod:`benchmarks.lanes.roundtrip`.
"""

from __future__ import annotations

import os

from celery import Celery

from benchmarks import vanilla
from benchmarks.lanes.base import LaneContext, LaneWorker
from benchmarks.lanes.roundtrip import CeleryTaskLane
from tasks.ops.launcher import WorkerProcess

__all__ = ["CeleryBaselineLane", "CeleryDefaultLane", "CeleryTunedLane", "VanillaCeleryLane"]


class VanillaCeleryLane(CeleryTaskLane):
    """Round trips of ``vanilla.noop`` to a vanilla Celery worker of one ``profile``."""

    profile: str

    def __init__(self, ctx: LaneContext) -> None:
        settings = ctx.settings
        broker, backend = settings.broker, settings.backend
        node = f"vanilla-{self.profile}-{ctx.run}"
        queue = f"bench-vanilla-{self.profile}-{ctx.run}"
        conf = vanilla.config(self.profile, broker, backend, settings.serializer)
        client = Celery(f"vanilla-{self.profile}", set_as_current=False)
        client.conf.update(conf)
        env = dict(os.environ, BENCH_VANILLA_PROFILE=self.profile)
        if conf["result_backend"] != backend:
            # Celery reads CELERY_RESULT_BACKEND before its configuration: keep it
            # out of this peer's worker, and name the backend on the client app.
            env.pop("CELERY_RESULT_BACKEND", None)
            client.backend_cls = conf["result_backend"]
        task = client.task(name="vanilla.noop")(vanilla.noop.run)
        worker = WorkerProcess(
            node,
            "cpu",
            logdir=ctx.logdir,
            env=env,
            command=vanilla.worker_command(self.profile, node, queue),
        )
        super().__init__(ctx, lambda: task.apply_async(queue=queue), LaneWorker(worker))


class CeleryBaselineLane(VanillaCeleryLane):
    """Stock Celery with the deployment's durability and nothing else."""

    name = "celery_baseline"
    profile = "baseline"


class CeleryDefaultLane(VanillaCeleryLane):
    """Stock Celery defaults, same broker and backend."""

    name = "celery_default"
    profile = "default"


class CeleryTunedLane(VanillaCeleryLane):
    """The fastest stock Celery configuration found on this broker."""

    name = "celery_tuned"
    profile = "tuned"
