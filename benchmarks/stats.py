"""Percentiles and summaries of latency samples."""

from __future__ import annotations

import statistics

__all__ = ["percentiles"]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
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
