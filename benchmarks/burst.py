"""``python -m benchmarks burst`` (``make chaos``): 10,000 tasks at once, nothing lost.

Two CPU workers consume one class queue.  One client publishes every task as
fast as publisher confirms allow (no window: the whole burst queues up on
RabbitMQ), then reads every result with MGET.  Recorded as lane ``burst`` in
the benchmark JSON (merged into an existing file): publish time, drain time
(first publish to last stored result), per-task latency percentiles
(publish to result stored, on this one host's clock), throughput and the
count of lost tasks, which must be 0.
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

from benchmarks.machine import machine_info
from benchmarks.stats import percentiles
from routing.queues import direct_queue
from tasks import app, infer
from tasks.ops.launcher import WorkerProcess
from tasks.wire.queues import remove_topology

__all__ = ["main", "run_burst"]


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


def run_burst(tasks: int, timeout: float = 600.0) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    queue = f"burst-{run}"
    logdir = Path(tempfile.mkdtemp(prefix="burst-"))
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=f"burst-{run}")
    workers = [
        WorkerProcess(
            f"burst{i}-{run}",
            "cpu",
            logdir=logdir,
            queues=[direct_queue(queue, f"burst{i}-{run}"), queue],
            preload=("mlp",),
            env=env,
        )
        for i in range(2)
    ]
    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    sent: dict[str, float] = {}
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        with Progress(transient=True) as progress:
            bar = progress.add_task("burst: publishing", total=tasks)
            first = time.time()
            for _ in range(tasks):
                task_id = str(uuid.uuid4())
                sent[task_id] = time.time()
                infer.apply_async(("mlp", x), queue=queue, task_id=task_id)
                progress.advance(bar)
            published = time.time()
            progress.update(bar, description="burst: draining", completed=0)
            done: dict[str, float] = {}
            deadline = time.monotonic() + timeout
            while len(done) < tasks and time.monotonic() < deadline:
                done.update(_stored([i for i in sent if i not in done]))
                progress.update(bar, completed=len(done))
                time.sleep(0.25)
    finally:
        for w in workers:
            w.stop()
        remove_topology(app, [queue, *(w.own_queue for w in workers)])
    last = max(done.values(), default=published)
    latencies = [(done[i] - sent[i]) * 1000.0 for i in done]
    return {
        "tasks": tasks,
        "workers": len(workers),
        "model": "mlp",
        "lost": tasks - len(done),
        "publish_s": round(published - first, 3),
        "drain_s": round(last - first, 3),
        "throughput_per_s": round(len(done) / max(last - first, 1e-9), 1),
        "latency_ms": percentiles(latencies) if len(latencies) > 1 else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks burst", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=Path("var/bench/latest.json"))
    args = parser.parse_args(argv)
    lane = run_burst(args.tasks)
    settings = app.infer_settings
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
