"""``make demo``: start two workers, serve every model through Celery, check, shut down.

Runs on the embedded broker unless CELERY_BROKER_URL / CELERY_RESULT_BACKEND
point at RabbitMQ and Redis.  Two CPU workers pose as separate devices
(``cpu0`` and ``cpu1``); requests go to each worker's own queue and to the
shared ``cpu`` queue.  Every served output is compared with an in-process
forward pass on the same weights.  Exits non-zero on any mismatch.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from models.errors import InferenceError
from models.spec import ModelSpec
from routing.queues import direct_queue
from tasks.app import app
from tasks.client.results import outputs
from tasks.client.routes import wait_for_workers
from tasks.diagnostics import noop
from tasks.inference import infer
from tasks.ops.launcher import WorkerProcess, free_port
from tasks.wire.catalog import local_catalog
from tasks.wire.topology import remove_topology

__all__ = ["main", "sample_inputs"]


SENTENCES = (
    "Celery routes each request to the worker that holds its model warm.",
    "RabbitMQ keeps the messages durable.",
    "A GPU worker batches requests dynamically.",
    "Results land in Redis.",
    "Quorum queues replicate every message on three nodes before the publisher hears back.",
)


def sample_inputs(spec: ModelSpec, batch: int, seed: int) -> Any:
    """Inputs of the right shape and dtype for ``spec`` (deterministic per seed).

    A text model gets ``batch`` sentences; a model serving uint8 (``resnet50``) uint8 images.
    """
    rng = np.random.default_rng(seed)
    if spec.text is not None:
        return [SENTENCES[(seed + i) % len(SENTENCES)] for i in range(batch)]
    shape = (batch, *(8 if d == -1 else d for d in spec.sample_shape))
    if spec.value_range is not None:
        return rng.integers(*spec.value_range, size=shape, dtype=np.int64)
    if "uint8" in spec.served_dtypes:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape, dtype=np.float32)


def _show_metrics(console: Console, workers: list[WorkerProcess], ports: list[int]) -> None:
    """Scrape each worker's /metrics, as Prometheus would, and print the request counters."""
    from prometheus_client.parser import text_string_to_metric_families

    for w, port in zip(workers, ports, strict=True):
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        served = [
            f"{s.labels['model']}={s.value:.0f}"
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "infer_requests_total" and s.labels.get("outcome") == "success"
        ]
        console.print(f"{url} ({w.name}): infer_requests_total {' '.join(sorted(served))}")


def main() -> int:
    console = Console(width=None if sys.stdout.isatty() else 110)
    settings = app.infer_settings
    console.print(f"[bold]demo[/bold]: {settings.describe()}")
    specs = [entry.default for entry in local_catalog(settings).entries()]
    if not all(s.weights and Path(s.weights).exists() for s in specs):
        from models.loader import build_weights

        build_weights(specs)
    run = uuid.uuid4().hex[:6]
    # Own queues per run: a demo never picks up a message left by another run.
    shared = f"demo-{run}"
    logdir = Path(tempfile.mkdtemp(prefix="infer-demo-"))
    names = [f"cpu0-{run}", f"cpu1-{run}"]
    ports = [free_port(), free_port()]  # each worker's Prometheus /metrics
    workers = [
        WorkerProcess(
            name,
            "cpu",
            logdir=logdir,
            queues=[direct_queue(shared, name), shared],
            preload=preload,
            env={**os.environ, "INFER_METRICS_PORT": str(port), "INFER_METRICS_ADDR": "127.0.0.1"},
        )
        for name, preload, port in zip(
            names, (("mlp", "cnn"), ("transformer",)), ports, strict=True
        )
    ]
    failures = 0
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        for w in workers:  # the pool child preloads models before its first task
            noop.apply_async(queue=w.own_queue).get(timeout=120, interval=0.01)
        wait_for_workers(app.router, {w.hostname for w in workers})
        console.print(
            f"workers up and warm: {', '.join(w.hostname for w in workers)} (logs in {logdir})"
        )
        jobs: list[tuple[str, int, str | None, Any, Any, float]] = []
        seed = 0
        for spec in specs:
            # Two requests pinned to a worker's own queue, one left to the capability router.
            # Big images (resnet50: 150 KB each) in smaller batches, under the payload limit.
            sizes = (1, 2, 4) if spec.ref.startswith("resnet50") else (1, 4, 8)
            queues = (workers[0].own_queue, workers[1].own_queue, None)
            for batch, queue in zip(sizes, queues, strict=True):
                seed += 1
                x = sample_inputs(spec, batch, seed)
                sent = time.perf_counter()
                jobs.append(
                    (
                        spec.name,
                        batch,
                        queue,
                        x,
                        infer.apply_async((spec.name, x), queue=queue),  # None: routed
                        sent,
                    )
                )
        done = [(res.get(timeout=120, interval=0.005), time.perf_counter()) for *_, res, _ in jobs]
        table = Table(title="every model: apply_async -> broker -> worker -> result backend")
        for col in (
            "model",
            "batch",
            "queue",
            "worker",
            "device",
            "rtt ms",
            "queue ms",
            "compute ms",
            "match",
        ):
            table.add_column(col, justify="right" if col.endswith("ms") else "left")
        from models.runner import reference_forward  # imports torch: only once results are in

        for (name, batch, queue, x, _, sent), (got, arrived) in zip(jobs, done, strict=True):
            spec = local_catalog(settings).resolve(name)
            ok = np.allclose(outputs(got), reference_forward(spec, x), rtol=1e-4, atol=1e-5)
            failures += not ok
            t = got["timing"]
            table.add_row(
                name,
                str(batch),
                "router" if queue is None else queue.split(".")[-1].split("-")[0],
                got["worker"].split("-")[0],
                got["device"],
                f"{(arrived - sent) * 1000:.1f}",
                f"{t['queue_wait_ms']:.1f}",
                f"{t['compute_ms']:.2f}",
                "[green]yes[/green]" if ok else "[red]NO[/red]",
            )
        console.print(table)
        console.print(
            "rtt: all requests in flight at once, so it includes waiting behind the others"
        )
        _show_metrics(console, workers, ports)
        try:
            infer.apply_async(("resnet9000", [0.0]), queue=shared)
        except InferenceError as e:
            console.print(f"bad input refused before publishing: {type(e).__name__}: {e}")
    finally:
        for w in workers:
            w.stop()
        remove_topology(app, [*(w.own_queue for w in workers), shared])  # leave none behind
    stray = [w.name for w in workers if w.alive()]
    console.print(f"workers stopped; stray processes: {stray or 'none'}")
    if failures or stray:
        console.print(f"[red]demo failed: {failures} mismatches, stray {stray}[/red]")
        return 1
    console.print("[green]demo ok[/green]: every served output matches its in-process forward pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
