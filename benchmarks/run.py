"""The plan and the interleaved loop: every lane in one process, A B C A B C ..., one results file.

The plan says which lanes run (:data:`LANES`, in this order), how many rounds
and how big each round is.  Each lane (``benchmarks/lanes/``, one file each)
owns how it runs and its entry under ``lanes``; the ratios between lanes are
:mod:`benchmarks.ratios`.  The results file (the contract in DESIGN.md)::

    {"schema": 1, "date", "machine", "plan", "lanes": {name: ...}, "ratios": {...},
     "memory_mb": {"client_rss", "<lane>_worker_rss", ...}}

Adding a lane: its module under ``benchmarks/lanes/`` and one line in :data:`LANES`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from benchmarks.lanes.amqp_floor import AmqpFloorLane
from benchmarks.lanes.base import Lane, LaneContext, RoundConfig, rss_mb
from benchmarks.lanes.celery_batches import CeleryBatchesLane
from benchmarks.lanes.celery_vanilla import CeleryBaselineLane, CeleryDefaultLane, CeleryTunedLane
from benchmarks.lanes.deployment_infer import DeploymentInferLane
from benchmarks.lanes.deployment_infer_batched import BatchedInferLane
from benchmarks.lanes.deployment_infer_chunked import ChunkedInferLane
from benchmarks.lanes.deployment_noop import DeploymentNoopLane
from benchmarks.lanes.dramatiq import DramatiqLane
from benchmarks.lanes.in_process import InProcessLane
from benchmarks.lanes.model_gain import ModelGainLane
from benchmarks.lanes.open_loop import OpenLoopLane
from benchmarks.lanes.publish import PublishLane
from benchmarks.lanes.router import RouterLane
from benchmarks.machine import machine_info
from benchmarks.producers import SATURATION_IN_FLIGHT
from benchmarks.ratios import ratios
from tasks import app

__all__ = ["LANES", "MODEL", "Plan", "build_lanes", "run"]

MODEL = "cnn"  # every inference lane serves this model, except model_gain (its own models)

# The lanes of a run, in the order they run each round (and appear in the results file).
LANES: tuple[type[Lane], ...] = (
    AmqpFloorLane,
    CeleryBaselineLane,
    CeleryDefaultLane,
    CeleryTunedLane,
    DeploymentNoopLane,
    DeploymentInferLane,
    BatchedInferLane,
    ChunkedInferLane,
    CeleryBatchesLane,  # only where BENCH_CELERY_BATCHES_PYTHON names its environment
    DramatiqLane,  # only where dramatiq is installed ('.[peers]')
    RouterLane,
    PublishLane,
    InProcessLane,
    OpenLoopLane,  # after deployment_infer: takes the batch-1 capacity from its first round
    ModelGainLane,  # resnet50 and minilm (the others serve MODEL): its own four workers
)


@dataclass(frozen=True)
class Plan:
    rounds: int
    round: RoundConfig
    device: str
    lanes: tuple[str, ...] | None = None  # None: every lane

    @classmethod
    def quick(cls, device: str) -> Plan:
        return cls(3, RoundConfig(requests=100, window=8, window_requests=200), device)

    @classmethod
    def full(cls, device: str) -> Plan:
        return cls(5, RoundConfig(requests=1000, window=16, window_requests=2000), device)


def build_lanes(plan: Plan, ctx: LaneContext) -> list[Lane]:
    """The plan's lanes that can run here, in plan order (``plan.lanes``: a subset by name)."""
    chosen = [cls for cls in LANES if plan.lanes is None or cls.name in plan.lanes]
    return [lane for cls in chosen if (lane := cls.build(ctx)) is not None]


def _close_all(lanes: list[Lane]) -> None:
    """Close every lane, even when one fails to (its peers would outlive the run and take
    routed requests of later runs); say which failed, on stderr.

    A failed close does not fail the run: its rounds are measured by then, and a
    full run's results must not be lost to one lane's cleanup.
    """
    for lane in lanes:
        try:
            lane.close()
        except Exception as exc:  # e.g. the broker dropped the lane's connection
            print(
                f"benchmarks: closing lane {lane.name} failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


def run(plan: Plan) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Run the plan; return the results file content and the pooled latency samples."""
    settings = app.infer_settings
    if settings.embedded or not settings.broker.startswith(("amqp", "pyamqp")):
        raise SystemExit(
            "the benchmark compares against raw AMQP, so it needs RabbitMQ and Redis: set "
            "CELERY_BROKER_URL=amqp://... and CELERY_RESULT_BACKEND=redis://... (make bench sets "
            "the local defaults)"
        )
    ctx = LaneContext(Path(tempfile.mkdtemp(prefix="infer-bench-")), plan.device, MODEL)
    lanes = build_lanes(plan, ctx)
    memory: dict[str, float | None] = {}
    client_rss: float | None = None
    try:
        for lane in lanes:  # every peer boots at once ...
            lane.start()
        for lane in lanes:  # ... then each is waited for and warmed up
            lane.setup()
        with Progress(transient=True) as progress:
            job = progress.add_task("benchmark", total=plan.rounds * len(lanes))
            for r in range(plan.rounds):
                for lane in lanes:
                    if lane.loads_torch_here and client_rss is None:
                        # Before a lane loads torch here; without the lanes' worker subprocesses.
                        client_rss = rss_mb(os.getpid(), children=False)
                    progress.update(job, description=f"round {r + 1}/{plan.rounds} {lane.name}")
                    lane.run_round(plan.round)
                    progress.advance(job)
        for lane in lanes:
            memory[lane.name] = lane.rss_mb()
    finally:
        _close_all(lanes)
    if client_rss is None:
        client_rss = rss_mb(os.getpid(), children=False)
    results = {lane.name: lane.summary(memory.get(lane.name)) for lane in lanes}
    samples = {lane.name: lane.latency_ms() for lane in lanes if lane.latency_ms()}
    return {
        "schema": 1,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(
            settings.broker, settings.backend, settings.serializer, plan.device
        ),
        "plan": {
            "rounds": plan.rounds,
            "requests": plan.round.requests,
            "window": plan.round.window,
            "window_requests": plan.round.window_requests,
            "producers": plan.round.producers,
            "saturation_in_flight": SATURATION_IN_FLIGHT if plan.round.producers else None,
            "model": MODEL,
        },
        "lanes": results,
        "ratios": ratios(results),
        "memory_mb": {
            "client_rss": client_rss,
            **{f"{k}_worker_rss": v for k, v in memory.items() if v},
        },
    }, samples
