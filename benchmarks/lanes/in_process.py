"""Lane ``in_process``: the compute limit, the CNN forward pass in this process.

No broker, no worker: the model loaded here (the run's device, the
deployment's torch threads and weights), timed at batch 1 and batch 64 over
about as many samples as a served round.  The deployment lanes' samples/s are
compared with it (``*_vs_in_process_batch*_samples``).  It loads torch into
this process on its first round, so the run reads the client's RSS first.
Summary: ``model``, ``batch`` (64), ``samples_per_s`` at that batch,
``by_batch`` (samples/s per batch size), ``rounds``, ``per_round``
(``{"by_batch.1": [one per round], ...}``).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig
from benchmarks.stats import median_of_rounds

__all__ = ["InProcessLane"]


class InProcessLane(Lane):
    """The CNN forward pass in this process at each batch size: the compute limit."""

    name = "in_process"
    batches = (1, 64)
    loads_torch_here = True

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.model: Any = None
        self.rounds: list[dict[str, float]] = []

    def _load(self) -> None:
        import torch

        from models.loader import load_model
        from models.runner import DTYPES, resolve_device, resolve_dtype
        from tasks.wire.catalog import local_catalog

        settings = self.ctx.settings
        assert settings.weights_dir is not None
        torch.set_num_threads(settings.torch_threads)
        self.spec = local_catalog(settings).resolve(self.ctx.model)
        self.device = resolve_device(self.ctx.device)
        self.dtype = resolve_dtype(None, self.spec, self.device)
        self.model = load_model(self.spec, self.device, DTYPES[self.dtype])
        self._rate(1, 5)

    def _rate(self, batch: int, iterations: int) -> float:
        import numpy as np

        from models.runner import forward

        x = np.random.default_rng(batch).standard_normal(
            (batch, *self.spec.sample_shape), dtype=np.float32
        )
        forward(self.model, x, self.device, self.dtype)
        started = time.perf_counter()
        for _ in range(iterations):
            forward(self.model, x, self.device, self.dtype)
        return batch * iterations / (time.perf_counter() - started)

    def run_round(self, cfg: RoundConfig) -> None:
        if self.model is None:
            self._load()
        by_batch: dict[str, float] = {}
        for batch in self.batches:
            # Enough iterations to cover about as many samples as a served round.
            iterations = max(3, min(cfg.requests, cfg.window_requests // batch))
            by_batch[str(batch)] = self._rate(batch, iterations)
        self.rounds.append(by_batch)

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        by_batch = median_of_rounds(self.rounds)
        top = str(max(self.batches))
        return {
            "model": self.ctx.model,
            "batch": int(top),
            "samples_per_s": by_batch[top],
            "by_batch": by_batch,
            "rounds": len(self.rounds),
            "per_round": {
                f"by_batch.{b}": [round(r[str(b)], 3) for r in self.rounds] for b in self.batches
            },
        }

    def close(self) -> None:
        self.model = None
