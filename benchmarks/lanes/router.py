"""Lane ``router``: the capability router's decision cost and sticky hit rate, in process.

Two measurements with synthetic registries (no broker):

- decision time with 64 workers x 16 models: requests for random models with
  random requirements, each worker holding 4 models and a random load;
- sticky hit rate in steady state for 8 models over 4 workers under load:
  one request arrives per step and routes; each worker finishes one request
  with probability 0.5 per step (capacity 2 per step: 50% utilisation, with
  bursts that fill a worker to its in-flight limit and spill), and affinity
  is measured as a deployment would see it.

Seeded, so every run simulates the same steps.  Summary: ``decision_us_p99``,
``sticky_hit_rate`` (medians of rounds), ``registry`` (what was simulated),
``rounds``, ``per_round`` (each round's two figures).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig
from benchmarks.stats import median_of_rounds, percentiles
from routing.capabilities import TaskRequirements, WorkerCapabilities
from routing.queues import direct_queue
from routing.router import CapabilityRouter
from routing.sticky import StickyCache

__all__ = ["RouterLane", "synthetic_workers"]


def synthetic_workers(
    n_workers: int, n_models: int, loaded_per_worker: int, rng: random.Random
) -> dict[str, WorkerCapabilities]:
    """A registry snapshot of ``n_workers`` GPUs, each holding ``loaded_per_worker`` of the models."""
    models = [f"m{i}" for i in range(n_models)]
    workers = {}
    for i in range(n_workers):
        name = f"gpu{i}@bench"
        workers[name] = WorkerCapabilities(
            name=name,
            queue=direct_queue("gpu", f"gpu{i}"),
            device_kind="cuda",
            device_name="sim",
            device_index=0,
            total_memory_mb=80_000,
            free_memory_mb=rng.randrange(1_000, 80_000),
            compute_capability=rng.choice([(8, 0), (9, 0)]),
            dtypes=("fp32", "fp16", "bf16"),
            models_loaded=tuple(rng.sample(models, loaded_per_worker)),
            in_flight=rng.randrange(0, 4),
            max_in_flight=4,
            heartbeat=0.0,
            device_class_queue="gpu",
        )
    return workers


def _requirements(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskRequirements:
    return TaskRequirements(model=str(args[0]), model_memory_mb=512)


class RouterLane(Lane):
    name = "router"

    def __init__(self, ctx: LaneContext, seed: int = 0) -> None:
        super().__init__(ctx)
        self.rng = random.Random(seed)  # noqa: S311 - a seeded simulation, not cryptography
        self.rounds: list[dict[str, float]] = []

    def run_round(self, cfg: RoundConfig) -> None:
        n = max(1000, cfg.window_requests * 5)
        self.rounds.append(
            {"decision_p99_us": self._decision_p99(n), "sticky_hit_rate": self._hit_rate(n)}
        )

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        figures = median_of_rounds(self.rounds)
        return {
            "decision_us_p99": figures["decision_p99_us"],
            "sticky_hit_rate": figures["sticky_hit_rate"],
            "registry": "64 workers x 16 models (decisions); 8 models over 4 workers (hit rate)",
            "rounds": len(self.rounds),
            "per_round": {
                "decision_us_p99": [r["decision_p99_us"] for r in self.rounds],
                "sticky_hit_rate": [round(r["sticky_hit_rate"], 6) for r in self.rounds],
            },
        }

    def _decision_p99(self, n: int) -> float:
        workers = synthetic_workers(64, 16, 4, self.rng)
        router = CapabilityRouter(lambda: workers, _requirements, StickyCache(max_size=4096))
        reqs = [
            TaskRequirements(
                model=f"m{self.rng.randrange(16)}",
                model_memory_mb=512,
                dtype=self.rng.choice([None, "bf16", "fp16"]),
                device=self.rng.choice(["any", "cuda"]),
            )
            for _ in range(256)
        ]
        for i in range(n):
            router.decide(reqs[i % len(reqs)])
        return percentiles(list(router.stats.decision_us))["p99"]

    def _hit_rate(self, n: int) -> float:
        workers = synthetic_workers(4, 8, 2, self.rng)
        workers = {k: replace(w, in_flight=0, free_memory_mb=60_000) for k, w in workers.items()}
        router = CapabilityRouter(lambda: workers, _requirements, StickyCache())
        warmup = n // 10
        hits_before = decisions_before = 0
        for step in range(n):
            if step == warmup:
                hits_before, decisions_before = router.stats.sticky_hits, router.stats.decisions
            chosen = router.decide(
                TaskRequirements(model=f"m{self.rng.randrange(8)}", model_memory_mb=512)
            )
            workers[chosen.name] = replace(
                workers[chosen.name], in_flight=workers[chosen.name].in_flight + 1
            )
            for name, w in workers.items():
                if w.in_flight and self.rng.random() < 0.5:
                    workers[name] = replace(w, in_flight=w.in_flight - 1)
        hits = router.stats.sticky_hits - hits_before
        return hits / (router.stats.decisions - decisions_before)
