"""Round-trip lanes: the measured loop most lanes share, and its figures.

A round is a closed loop of ``requests`` round trips with one in flight
(latency), then ``window_requests`` more with ``window`` in flight
(throughput), timing each publish call on the way.  A Celery lane may add a
saturation phase (``--producers N``, :mod:`benchmarks.producers`).

Summary (its entry in the results file): ``rtt_ms`` (p50/p95/p99/mean of the
closed loop, median of rounds), ``throughput_per_s``, ``publish_us``,
``requests``, ``rounds``, ``worker_rss_mb``, ``saturated_req_s`` when measured,
the lane's own figures (:meth:`RoundTripLane.served`), and ``breakdown_ms``
when its task reports a timing breakdown.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, LaneWorker, RoundConfig
from benchmarks.producers import Saturation
from benchmarks.stats import median_of_rounds, percentiles

__all__ = ["CeleryTaskLane", "RoundTripLane", "RoundTrips"]


@dataclass
class RoundTrips:
    """The figures of one round."""

    rtt_ms: list[float] = field(default_factory=list)
    throughput_per_s: float = 0.0
    publish_us: float = 0.0
    saturated_per_s: float | None = None  # requests/s with `producers` clients at once
    breakdown_ms: dict[str, list[float]] = field(default_factory=dict)


class RoundTripLane(Lane):
    """Request/response round trips: subclasses give ``submit`` and ``wait``."""

    window: int | None = None  # requests in flight for throughput; None: the plan's

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.rounds: list[RoundTrips] = []

    def submit(self) -> Any:
        raise NotImplementedError

    def wait(self, pending: Any) -> Any:
        raise NotImplementedError

    def warm_up(self, n: int = 5) -> None:
        for _ in range(n):
            self.wait(self.submit())

    def run_round(self, cfg: RoundConfig) -> None:
        self.rounds.append(self.round_trips(cfg))

    def round_trips(self, cfg: RoundConfig) -> RoundTrips:
        out = RoundTrips()
        for _ in range(cfg.requests):
            started = time.perf_counter()
            value = self.wait(self.submit())
            out.rtt_ms.append((time.perf_counter() - started) * 1000.0)
            _collect_timing(out, value)
        in_flight: deque[Any] = deque()
        publish_s = 0.0
        started = time.perf_counter()
        window = self.window or cfg.window
        for _ in range(cfg.window_requests):
            if len(in_flight) >= window:
                self.wait(in_flight.popleft())
            t0 = time.perf_counter()
            in_flight.append(self.submit())
            publish_s += time.perf_counter() - t0
        while in_flight:
            self.wait(in_flight.popleft())
        out.throughput_per_s = cfg.window_requests / (time.perf_counter() - started)
        out.publish_us = publish_s / cfg.window_requests * 1e6
        return out

    def latency_ms(self) -> list[float]:
        return [ms for r in self.rounds for ms in r.rtt_ms]

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        """Figures of this lane's own (e.g. the model and samples/s), after the common ones."""
        return {}

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        rounds = self.rounds
        lane: dict[str, Any] = {
            "rtt_ms": median_of_rounds([percentiles(r.rtt_ms) for r in rounds]),
            "throughput_per_s": median_of_rounds([{"v": r.throughput_per_s} for r in rounds])["v"],
            "publish_us": median_of_rounds([{"v": r.publish_us} for r in rounds])["v"],
            "requests": sum(len(r.rtt_ms) for r in rounds),
            "rounds": len(rounds),
            "worker_rss_mb": worker_rss_mb,
        }
        saturated = [r.saturated_per_s for r in rounds if r.saturated_per_s is not None]
        if saturated:
            lane["saturated_req_s"] = median_of_rounds([{"v": v} for v in saturated])["v"]
        lane.update(self.served(lane))
        keys = rounds[0].breakdown_ms.keys()
        if keys:
            lane["breakdown_ms"] = {
                k: percentiles([ms for r in rounds for ms in r.breakdown_ms.get(k, [])])
                for k in keys
            }
        return lane


def _collect_timing(out: RoundTrips, value: Any) -> None:
    """Keep the timing breakdown a deployment task returns (``{"timing": {...}}``)."""
    timing = value.get("timing") if isinstance(value, dict) else None
    for key, ms in (timing or {}).items():
        if isinstance(ms, int | float):
            out.breakdown_ms.setdefault(key, []).append(float(ms))


class CeleryTaskLane(RoundTripLane):
    """Round trips of one Celery task through ``send()`` to a real worker process.

    ``saturation`` (see :mod:`benchmarks.producers`) adds a saturation phase
    to each round when the plan asks for producers.
    """

    saturation: Saturation | None = None

    def __init__(
        self,
        ctx: LaneContext,
        send: Callable[[], Any],
        worker: LaneWorker,
        saturation: Saturation | None = None,
    ) -> None:
        super().__init__(ctx)
        self.send = send
        self.worker = worker
        self.saturation = saturation

    def submit(self) -> Any:
        return self.send()

    def wait(self, pending: Any) -> Any:
        return pending.get(timeout=60)

    def round_trips(self, cfg: RoundConfig) -> RoundTrips:
        out = super().round_trips(cfg)
        if cfg.producers > 0 and self.saturation is not None:
            out.saturated_per_s = self.saturation.run(
                producers=cfg.producers, requests=max(cfg.window_requests, 2 * cfg.window)
            )
        return out

    def start(self) -> None:
        self.worker.start(self.name)

    def setup(self) -> None:
        self.worker.wait_ready()
        self.warm_up()  # the pool child starts, preloads and warms up

    def rss_mb(self) -> float | None:
        return self.worker.rss_mb()

    def close(self) -> None:
        self.worker.stop(self.name)
