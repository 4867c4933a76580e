"""Benchmark lanes, one module each: what the lane measures, how it runs, how it summarises.

:mod:`benchmarks.lanes.base` holds the shape every lane has (:class:`Lane`)
and what the lanes of a run share (:class:`LaneContext`, :class:`LaneWorker`);
:mod:`benchmarks.lanes.roundtrip` the round-trip loop most lanes are made of.
Which lanes run, and in what order, is the plan's business (:mod:`benchmarks.run`).
"""

from benchmarks.lanes.base import Lane, LaneContext, LaneWorker, RoundConfig

__all__ = ["Lane", "LaneContext", "LaneWorker", "RoundConfig"]
