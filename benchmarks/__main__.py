"""Measure the deployment: round-trip latency and worker memory, as JSON and a table.

This is the issue-2 slice of the harness: lanes ``deployment_noop`` (a no-op
task through our app and settings) and ``deployment_infer`` (one small MLP
sample per request), closed loop with one request in flight, against the
broker and backend the environment configures (embedded when none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from memory_profiler import memory_usage
from rich.console import Console
from rich.progress import track
from rich.table import Table

from benchmarks.stats import percentiles
from tasks import app, infer, noop
from tasks.launcher import WorkerProcess

Submit = Callable[[], Any]


def closed_loop(submit: Submit, n: int, label: str) -> tuple[list[float], list[Any]]:
    """Round-trip times (ms) and results of ``n`` requests sent one after another."""
    times, results = [], []
    for _ in track(range(n), description=label, transient=True):
        started = time.perf_counter()
        results.append(submit().get(timeout=60, interval=0.0005))
        times.append((time.perf_counter() - started) * 1000.0)
    return times, results


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the prefork pool), via memory-profiler."""
    return round(float(memory_usage(proc=pid, include_children=True, max_usage=True)), 1)


def machine_info() -> dict[str, Any]:
    import celery
    import torch

    settings = app.infer_settings
    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "celery": celery.__version__,
        "broker": settings.broker.split(":", 1)[0],
        "backend": settings.backend.split(":", 1)[0],
        "serializer": settings.serializer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests (CI smoke run)")
    parser.add_argument("--json", type=Path, help="write the results file here")
    parser.add_argument("--device", default="auto", help="worker device: cpu, cuda:N or auto")
    args = parser.parse_args(argv)
    n = 60 if args.quick else 1000
    console = Console()
    console.print(f"benchmark on {app.infer_settings.describe()}")
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    logdir = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    worker = WorkerProcess(queue, args.device, logdir=logdir, queues=[queue], preload=("mlp",))
    x = np.random.default_rng(0).standard_normal(64, dtype=np.float32)
    lanes: dict[str, Any] = {}
    with worker:
        noop.apply_async(queue=queue).get(timeout=120)  # wait for the pool child's preload
        infer.apply_async(("mlp", x), queue=queue).get(timeout=60)
        noop_ms, _ = closed_loop(lambda: noop.apply_async(queue=queue), n, "deployment_noop")
        infer_ms, infer_results = closed_loop(
            lambda: infer.apply_async(("mlp", x), queue=queue), n, "deployment_infer"
        )
        worker_rss = rss_mb(worker.pid)
    client_rss = rss_mb(os.getpid())
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)
    for name, samples in (("deployment_noop", noop_ms), ("deployment_infer", infer_ms)):
        rtt = percentiles(samples)
        lanes[name] = {
            "rtt_ms": rtt,
            "throughput_per_s": round(1000.0 / rtt["mean"], 1),
            "requests": n,
        }
    lanes["deployment_infer"]["model"] = "mlp"
    lanes["deployment_infer"]["samples_per_s"] = lanes["deployment_infer"]["throughput_per_s"]
    lanes["deployment_infer"]["breakdown_ms"] = {
        key: percentiles([r["timing"][key] for r in infer_results])
        for key in ("queue_wait_ms", "compute_ms", "total_ms")
    }
    result = {
        "schema": 1,
        "machine": machine_info(),
        "lanes": lanes,
        "memory_mb": {"worker_rss": worker_rss, "client_rss": client_rss},
        "date": time.strftime("%Y-%m-%d"),
    }
    table = Table(title=f"closed loop, 1 in flight, {n} requests per lane")
    for col in ("lane", "p50 ms", "p95 ms", "p99 ms", "req/s"):
        table.add_column(col, justify="left" if col == "lane" else "right")
    for name, lane in lanes.items():
        r = lane["rtt_ms"]
        table.add_row(
            name,
            f"{r['p50']:.2f}",
            f"{r['p95']:.2f}",
            f"{r['p99']:.2f}",
            f"{lane['throughput_per_s']:.0f}",
        )
    console.print(table)
    console.print(f"worker RSS (parent + pool child) {worker_rss} MB; client RSS {client_rss} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
