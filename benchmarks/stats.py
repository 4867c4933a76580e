"""Percentiles, medians across rounds, and CDFs: pure functions, unit-tested on known inputs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["cdf", "median_of_rounds", "percentiles", "ratio"]


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (inclusive method) and mean of ``samples_ms``, rounded to 3 decimals."""
    if len(samples_ms) < 2:
        raise ValueError("need at least two samples")
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 3),
        "p95": round(cuts[94], 3),
        "p99": round(cuts[98], 3),
        "mean": round(statistics.fmean(samples_ms), 3),
    }


def median_of_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise median of per-round figures (the keys of the first round)."""
    if not rounds:
        raise ValueError("no rounds")
    return {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` to 3 decimals, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def cdf(samples: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted samples and their cumulative fractions (1/n .. 1)."""
    xs = sorted(samples)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]
