"""Lane ``deployment_infer_chunked``: served samples/s of ``infer_many`` at batch 64.

Client-side batching with Celery's canvas: ``infer_many`` splits many seeded
inputs into batches of 64 and sends them to the batching worker's own queue
(:mod:`benchmarks.lanes.deployment_worker`; each chunk is a full batch of its
own, and the worker holds the chunks behind it, so its pool child goes from one
to the next without a broker round trip).  Compare with ``in_process`` at
the same batch size (``chunked_vs_in_process_batch64_samples``).  Summary:
``model``, ``batch``, ``samples_per_s`` (median of rounds), ``rounds``,
``per_round`` (``{"samples_per_s": [one per round]}``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig
from benchmarks.lanes.deployment_worker import batching_worker
from tasks import infer_many

__all__ = ["ChunkedInferLane"]


class ChunkedInferLane(Lane):
    """``infer_many`` over many inputs at one batch size: served samples/s with canvas batching."""

    name = "deployment_infer_chunked"
    batch = 64

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.worker = batching_worker(ctx)
        self.rates: list[float] = []

    def start(self) -> None:
        self.worker.start(self.name)

    def setup(self) -> None:
        self.worker.wait_ready()
        self._run(self.batch * 2)

    def _run(self, n: int) -> float:
        import numpy as np

        from tasks.wire.catalog import local_catalog

        shape = local_catalog(self.ctx.settings).resolve(self.ctx.model).sample_shape
        x = np.random.default_rng(n).standard_normal((n, *shape), dtype=np.float32)
        started = time.perf_counter()
        infer_many(
            self.ctx.model, x, batch_size=self.batch, queue=self.worker.process.own_queue
        ).get(timeout=600)
        return n / (time.perf_counter() - started)

    def run_round(self, cfg: RoundConfig) -> None:
        n = max(4, cfg.window_requests // self.batch) * self.batch
        self.rates.append(self._run(n))

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        return {
            "model": self.ctx.model,
            "batch": self.batch,
            "samples_per_s": round(statistics.median(self.rates), 3),
            "rounds": len(self.rates),
            "per_round": {"samples_per_s": [round(r, 3) for r in self.rates]},
        }

    def close(self) -> None:
        self.worker.stop(self.name)
