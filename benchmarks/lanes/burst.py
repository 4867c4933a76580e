"""Lane ``burst`` (``python -m benchmarks burst``, ``make chaos``): 10,000 tasks at once, nothing lost.

Not part of the interleaved plan: it runs alone, one round, and its entry is
merged into an existing results file.  Two CPU workers consume one class
queue.  One client publishes every task as fast as publisher confirms allow (no
window: the whole burst queues up on RabbitMQ), then reads every result with
MGET.  Summary: publish time, drain time (first publish to last stored
result), per-task latency percentiles (publish to result stored, on this one
host's clock), throughput and the count of lost tasks, which must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig, delete_queues
from benchmarks.machine import machine_info
from benchmarks.stats import percentiles
from routing.queues import direct_queue
from tasks import app, infer
from tasks.ops.launcher import WorkerProcess

__all__ = ["BurstLane", "main"]


def _stored(ids: list[str]) -> dict[str, float]:
    """Completion time (epoch seconds) of each id whose SUCCESS/FAILURE is stored."""
    backend = app.backend
    done: dict[str, float] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        raws = backend.client.mget([backend.get_key_for_task(i) for i in chunk])
        for task_id, raw in zip(chunk, raws, strict=True):
            if raw is not None:
                meta = backend.decode_result(raw)
                if meta.get("status") in ("SUCCESS", "FAILURE"):
                    done[task_id] = datetime.fromisoformat(meta["date_done"]).timestamp()
    return done


class BurstLane(Lane):
    """``tasks`` MLP inferences published at once to two CPU workers; one burst per round."""

    name = "burst"

    def __init__(self, ctx: LaneContext, tasks: int = 10_000, timeout: float = 600.0) -> None:
        super().__init__(ctx)
        self.tasks, self.timeout = tasks, timeout
        self.queue = f"burst-{ctx.run}"
        env = dict(os.environ, INFER_REGISTRY_NAMESPACE=f"burst-{ctx.run}")
        self.workers = [
            WorkerProcess(
                f"burst{i}-{ctx.run}",
                "cpu",
                logdir=ctx.logdir,
                queues=[direct_queue(self.queue, f"burst{i}-{ctx.run}"), self.queue],
                preload=(ctx.model,),
                env=env,
            )
            for i in range(2)
        ]
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def setup(self) -> None:
        for w in self.workers:
            w.wait_ready()

    def run_round(self, cfg: RoundConfig) -> None:
        """One burst of ``tasks`` (the round's sizes do not apply)."""
        model, tasks = self.ctx.model, self.tasks
        x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
        sent: dict[str, float] = {}
        done: dict[str, float] = {}
        with Progress(transient=True) as progress:
            bar = progress.add_task("burst: publishing", total=tasks)
            first = time.time()
            for _ in range(tasks):
                task_id = str(uuid.uuid4())
                sent[task_id] = time.time()
                infer.apply_async((model, x), queue=self.queue, task_id=task_id)
                progress.advance(bar)
            published = time.time()
            progress.update(bar, description="burst: draining", completed=0)
            deadline = time.monotonic() + self.timeout
            while len(done) < tasks and time.monotonic() < deadline:
                done.update(_stored([i for i in sent if i not in done]))
                progress.update(bar, completed=len(done))
                time.sleep(0.25)
        last = max(done.values(), default=published)
        latencies = [(done[i] - sent[i]) * 1000.0 for i in done]
        self.result = {
            "tasks": tasks,
            "workers": len(self.workers),
            "model": model,
            "lost": tasks - len(done),
            "publish_s": round(published - first, 3),
            "drain_s": round(last - first, 3),
            "throughput_per_s": round(len(done) / max(last - first, 1e-9), 1),
            "latency_ms": percentiles(latencies) if len(latencies) > 1 else {},
        }

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        return self.result

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        delete_queues([self.queue, *(w.own_queue for w in self.workers)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks burst", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=Path("var/bench/latest.json"))
    args = parser.parse_args(argv)
    ctx = LaneContext(logdir=Path(tempfile.mkdtemp(prefix="burst-")), device="cpu", model="mlp")
    burst = BurstLane(ctx, args.tasks)
    try:
        burst.start()
        burst.setup()
        burst.run_round(RoundConfig(requests=args.tasks, window=args.tasks, window_requests=0))
    finally:
        burst.close()
    lane = burst.summary(None)
    settings = ctx.settings
    machine = machine_info(settings.broker, settings.backend, settings.serializer, "cpu")
    result: dict[str, Any] = {"schema": 1, "machine": machine, "lanes": {}}
    if args.json.exists():
        result = json.loads(args.json.read_text())
    result.setdefault("lanes", {})["burst"] = lane
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    lat = lane["latency_ms"]
    print(
        f"burst of {lane['tasks']}: lost {lane['lost']}, published in {lane['publish_s']} s, "
        f"drained in {lane['drain_s']} s ({lane['throughput_per_s']}/s); latency p50 "
        f"{lat.get('p50', 0):.0f} ms, p99 {lat.get('p99', 0):.0f} ms; wrote {args.json}"
    )
    return 0 if lane["lost"] == 0 else 1
