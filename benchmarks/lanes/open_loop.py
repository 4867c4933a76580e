"""Lane ``open_loop``: Poisson arrivals at a sweep of offered rates, batch-1 vs batching worker.

The other lanes are closed loops: a request is sent when an earlier one
comes back, so a slow reply delays the requests behind it and they are never
measured waiting (coordinated omission).  Here the arrivals are an open loop,
as in MLPerf's server scenario: the send times of a sweep point are drawn up
front (:func:`poisson_schedule`: exponential gaps, seeded), request *i* is
sent at its scheduled time whatever happened to the earlier ones, and its
latency runs from that scheduled time to its result, so a client that falls
behind, a queue that builds up, a worker that stalls all count.

Offered rates: :data:`FACTORS` x the batch-1 worker's capacity, fixed once,
in the first round.  The lane always measures a short closed-loop saturation
of its own first (a sliding window of :data:`CAPACITY_WINDOW`
``apply_async`` calls on that worker's own queue, ``max(64,
window_requests / 2)`` requests); where the ``deployment_infer`` lane ran
earlier in the same round it also takes that lane's saturated req/s of the
round (its ``saturated_req_s`` with ``--producers``, else its window-phase
``throughput_per_s``, one client with a window in flight), and uses the
larger of the two: one figure taken in a busy moment (seen: a first round at
a third of the later ones) would otherwise leave the whole sweep below
saturation.  ``capacity_source`` says which figure it used,
``capacity_figures`` gives both.  Each point sends
``max(16, rate x duration)`` requests; the sweep and its duration scale with
the plan's ``window_requests``: 7 points x 3 s (full), 5 x 0.5 s (``--quick``),
3 x 0.25 s (tinier plans).

Workers: ``infer``, the run's batch-1 deployment worker
(:mod:`benchmarks.lanes.deployment_worker`), and ``batched``, the run's
batching worker (the one ``deployment_infer_batched`` measures, out of the
router's sight); requests go to each worker's own queue.  In
each round the points run in ascending rate, both workers at each rate (which
goes first alternates by round), one after the other, each once the previous
one is drained; a few untimed requests to each worker open the round.

Sending: one loop in this process sleeps until the next scheduled time, then
publishes every request already due (at most :data:`MAX_BURST`): one or two
with ``infer.apply_async``, more as one ``infer.map`` (pipelined confirms), so
a client that falls behind catches up in bursts; ``sent_per_s`` records the
rate it achieved.  A thread waits for the results (``AsyncResult.get``) while
the loop sends; each result's arrival time is taken by an ``AsyncResult.then``
callback, so results that arrive out of order are timed when they arrive.
Every loop is bounded: a point sends at most its schedule, stops sending
:data:`TIMEOUT_S` after its last scheduled time, and a request without a
result by then counts as a timeout (its message expires after
:data:`TIMEOUT_S`, so no backlog outlives the point).  A request that fails,
or whose publish fails, counts as an error.

Summary: ``model``, ``capacity_req_s``, ``capacity_source``,
``capacity_figures``, ``factors``,
``duration_s``, ``p99_target_ms``, ``rounds``, ``workers``: per worker a list
of ``points`` (``factor``, ``offered_req_s``, ``sent_per_s`` and
``achieved_req_s`` (median of rounds; achieved: successful results / time
from the first scheduled send to the last result), ``latency_ms``
(p50/p95/p99/mean over every round's requests pooled: a p99 needs more
requests than one round has), ``requests``, ``errors``, ``timeouts`` (all
rounds), ``per_round``), and ``max_rate_p99_50ms`` per worker: the MLPerf
server figure, the highest achieved throughput among the points whose p99 is
at most :data:`P99_TARGET_MS` with no error and no timeout (None if none,
:func:`max_rate_within`).  ``per_round`` holds that figure per round, from
each round's own requests.  Ratio ``open_loop_batched_vs_infer_max_rate_p99``.
"""

from __future__ import annotations

import contextlib
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig
from benchmarks.lanes.deployment_worker import batch1_capacity, batching_worker, deployment_worker
from benchmarks.producers import request_input
from benchmarks.stats import percentiles
from tasks import infer

__all__ = [
    "FACTORS",
    "P99_TARGET_MS",
    "OpenLoopLane",
    "PointRound",
    "max_rate_within",
    "poisson_schedule",
    "summarise_points",
    "sweep",
]

# Offered rates, as multiples of the batch-1 capacity: full, --quick, tinier plans.
FACTORS = {
    "full": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    "quick": (0.25, 0.5, 1.0, 1.5, 3.0),
    "tiny": (0.25, 1.0, 3.0),
}
P99_TARGET_MS = 50.0  # MLPerf's server-scenario bound for the max-rate figure
TIMEOUT_S = 30.0  # after a point's last scheduled send: no result by then is a timeout
MIN_POINT_REQUESTS = 16
MAX_POINT_REQUESTS = 20_000
MAX_BURST = 32  # requests due at once published together
MAP_FROM = 3  # bursts of this many or more go as one infer.map
CAPACITY_WINDOW = 16  # requests in flight when the lane measures the capacity itself
WORKERS = ("infer", "batched")


def poisson_schedule(rate: float, n: int, seed: int) -> list[float]:
    """``n`` send times (seconds from the start) of a Poisson process of ``rate`` per second.

    Exponential gaps with mean ``1 / rate``, drawn from ``numpy.random.default_rng(seed)``:
    the same arguments give the same schedule.
    """
    import numpy as np

    if rate <= 0 or n < 1:
        raise ValueError(f"need rate > 0 and n >= 1, got rate={rate}, n={n}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return [float(t) for t in np.cumsum(gaps)]


def sweep(cfg: RoundConfig) -> tuple[tuple[float, ...], float]:
    """The plan's sweep: capacity factors and the seconds each point's schedule spans."""
    size = (
        "full" if cfg.window_requests >= 1000 else "quick" if cfg.window_requests >= 100 else "tiny"
    )
    return FACTORS[size], min(3.0, max(0.25, cfg.window_requests / 400))


def point_requests(rate: float, duration_s: float) -> int:
    """How many requests a point of ``rate`` sends over ``duration_s`` (bounded both ways)."""
    return min(MAX_POINT_REQUESTS, max(MIN_POINT_REQUESTS, round(rate * duration_s)))


@dataclass
class PointRound:
    """One sweep point of one worker in one round."""

    factor: float
    offered_req_s: float
    latency_ms: list[float] = field(default_factory=list)  # successful requests, from schedule
    requests: int = 0
    errors: int = 0  # failed, expired, or never published
    timeouts: int = 0  # no result within TIMEOUT_S of the last scheduled send
    sent_per_s: float = 0.0
    achieved_req_s: float = 0.0


def _p99_ok(p99: float | None, failures: int, target_ms: float) -> bool:
    return p99 is not None and p99 <= target_ms and failures == 0


def max_rate_within(
    points: Sequence[dict[str, Any]], target_ms: float = P99_TARGET_MS
) -> float | None:
    """The highest ``achieved_req_s`` among ``points`` whose p99 <= ``target_ms`` (None if none).

    A point counts only with a p99 (``latency_ms.p99``) and no error or timeout.
    """
    good = [
        float(p["achieved_req_s"])
        for p in points
        if _p99_ok(
            (p.get("latency_ms") or {}).get("p99"),
            p.get("errors", 0) + p.get("timeouts", 0),
            target_ms,
        )
    ]
    return max(good) if good else None


def _latency(samples: list[float]) -> dict[str, float] | None:
    return percentiles(samples) if len(samples) >= 2 else None


def summarise_points(rounds: Sequence[Sequence[PointRound]]) -> list[dict[str, Any]]:
    """Each point over the rounds (``rounds[r][i]``: point ``i`` of round ``r``)."""
    out = []
    for i, first in enumerate(rounds[0]):
        each = [r[i] for r in rounds]
        pooled = [ms for p in each for ms in p.latency_ms]
        per_round_p99 = [(_latency(p.latency_ms) or {}).get("p99") for p in each]
        out.append(
            {
                "factor": first.factor,
                "offered_req_s": round(first.offered_req_s, 3),
                "sent_per_s": round(statistics.median(p.sent_per_s for p in each), 3),
                "achieved_req_s": round(statistics.median(p.achieved_req_s for p in each), 3),
                "latency_ms": _latency(pooled),
                "requests": sum(p.requests for p in each),
                "errors": sum(p.errors for p in each),
                "timeouts": sum(p.timeouts for p in each),
                "per_round": {
                    "achieved_req_s": [round(p.achieved_req_s, 3) for p in each],
                    "latency_ms.p99": per_round_p99,
                },
            }
        )
    return out


def _round_max_rate(points: Sequence[PointRound]) -> float | None:
    """One round's max rate with p99 <= target, from that round's own requests."""
    return max_rate_within(
        [
            {
                "achieved_req_s": p.achieved_req_s,
                "latency_ms": _latency(p.latency_ms),
                "errors": p.errors,
                "timeouts": p.timeouts,
            }
            for p in points
        ]
    )


class _Collector(threading.Thread):
    """Waits for each result handed to it, until ``deadline`` (``perf_counter``)."""

    def __init__(self, deadline: float) -> None:
        super().__init__(daemon=True, name="open-loop-collector")
        self.deadline = deadline
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self) -> None:
        while (result := self.inbox.get()) is not None:
            left = self.deadline - time.perf_counter()
            if left <= 0:
                continue  # past the deadline: a timeout, counted by the sender
            with contextlib.suppress(Exception):  # a timeout, or the backend's: judged by state
                result.get(timeout=left, propagate=False)


class OpenLoopLane(Lane):
    """A Poisson sweep of offered rates against the batch-1 and the batching worker."""

    name = "open_loop"

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.infer_worker = deployment_worker(ctx)
        self.batched_worker = batching_worker(ctx)  # the one deployment_infer_batched measures
        self.sample: Any = None
        self.capacity: tuple[float, str] | None = None  # (req/s, the figure it came from)
        self.capacity_figures: dict[str, float] = {}
        self.factors: tuple[float, ...] = ()
        self.duration_s = 0.0
        self.rounds: list[dict[str, list[PointRound]]] = []

    def _queue(self, worker: str) -> str:
        lane_worker = self.infer_worker if worker == "infer" else self.batched_worker
        return lane_worker.process.own_queue

    def start(self) -> None:
        self.infer_worker.start(self.name)
        self.batched_worker.start(self.name)

    def setup(self) -> None:
        self.infer_worker.wait_ready()
        self.batched_worker.wait_ready()
        self.sample = request_input(self.ctx.model)
        for worker in WORKERS:  # connections, the confirm channel path, the pool's first requests
            self._publish(worker, 1)[0].get(timeout=60)
            for result in self._publish(worker, MAP_FROM):
                result.get(timeout=60)

    def _publish(self, worker: str, k: int) -> list[Any]:
        """``k`` requests to ``worker``'s own queue, sent now; their AsyncResults."""
        model, queue_name = self.ctx.model, self._queue(worker)
        if k < MAP_FROM:
            return [
                infer.apply_async((model, self.sample), queue=queue_name, expires=TIMEOUT_S)
                for _ in range(k)
            ]
        mapped = infer.map(model, [self.sample] * k, queue=queue_name, expires=TIMEOUT_S)
        return list(mapped.results)

    def _capacity(self, cfg: RoundConfig) -> dict[str, float]:
        """The batch-1 worker's req/s: measured here, and ``deployment_infer``'s of this round."""
        figures = {
            "measured": self._measure_capacity(max(4 * CAPACITY_WINDOW, cfg.window_requests // 2))
        }
        recorded = batch1_capacity(self.ctx)
        if len(recorded) > len(self.rounds):  # deployment_infer ran earlier in this round
            value, figure = recorded[-1]
            figures[figure] = value
        return figures

    def _measure_capacity(self, n: int) -> float:
        """Req/s of ``n`` requests to the batch-1 worker, :data:`CAPACITY_WINDOW` in flight."""
        in_flight: deque[Any] = deque()
        started = time.perf_counter()
        for _ in range(n):
            if len(in_flight) >= CAPACITY_WINDOW:
                in_flight.popleft().get(timeout=60)
            in_flight.extend(self._publish("infer", 1))
        while in_flight:
            in_flight.popleft().get(timeout=60)
        return n / (time.perf_counter() - started)

    def run_point(self, worker: str, factor: float, rate: float, seed: int) -> PointRound:
        """Send one Poisson schedule of ``rate`` to ``worker``; its latencies and counts."""
        offsets = poisson_schedule(rate, point_requests(rate, self.duration_s), seed)
        out = PointRound(factor, rate, requests=len(offsets))
        arrived: dict[str, float] = {}

        def on_ready(result: Any) -> None:
            arrived[result.id] = time.perf_counter()

        t0 = time.perf_counter() + 0.005
        deadline = t0 + offsets[-1] + TIMEOUT_S
        collector = _Collector(deadline)
        collector.start()
        sent: list[tuple[float, Any]] = []  # (scheduled perf_counter, result)
        i = 0
        try:
            while i < len(offsets):
                now = time.perf_counter()
                if now >= deadline:  # far behind: the rest are never sent
                    out.errors += len(offsets) - i
                    break
                if t0 + offsets[i] > now:
                    time.sleep(min(t0 + offsets[i] - now, 0.05))
                    continue
                k = 1
                while k < MAX_BURST and i + k < len(offsets) and t0 + offsets[i + k] <= now:
                    k += 1
                try:
                    results = self._publish(worker, k)
                except Exception:  # PublishFailed, a connection error: the burst fails
                    out.errors += k
                    results = []
                for j, result in enumerate(results):
                    result.then(on_ready)
                    sent.append((t0 + offsets[i + j], result))
                    collector.inbox.put(result)
                i += k
            send_end = time.perf_counter()
        finally:
            collector.inbox.put(None)
            collector.join(timeout=max(0.0, deadline - time.perf_counter()) + 10.0)
        out.sent_per_s = len(sent) / max(send_end - t0, 1e-9)
        last = t0
        for scheduled, result in sent:
            at = arrived.get(result.id)
            if at is None:
                out.timeouts += 1
                result.backend.remove_pending_result(result)
            elif result.successful():
                out.latency_ms.append((at - scheduled) * 1000.0)
                last = max(last, at)
            else:
                out.errors += 1
        if out.latency_ms:
            out.achieved_req_s = len(out.latency_ms) / max(last - t0, 1e-9)
        return out

    def run_round(self, cfg: RoundConfig) -> None:
        if self.capacity is None:
            self.capacity_figures = self._capacity(cfg)
            self.capacity = max((v, k) for k, v in self.capacity_figures.items())
            self.factors, self.duration_s = sweep(cfg)
        r = len(self.rounds)
        order = WORKERS if r % 2 == 0 else WORKERS[::-1]
        for worker in order:  # untimed: whatever the lane before left running settles first
            for result in self._publish(worker, MAP_FROM):
                result.get(timeout=60)
        points: dict[str, list[PointRound]] = {w: [] for w in WORKERS}
        for index, factor in enumerate(self.factors):
            for worker in order:
                seed = 1000 * r + 10 * index + WORKERS.index(worker)
                rate = factor * self.capacity[0]
                points[worker].append(self.run_point(worker, factor, rate, seed))
                time.sleep(0.1)  # let the worker go idle before the next point
        self.rounds.append(points)

    def rss_mb(self) -> float | None:
        return self.batched_worker.rss_mb()

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        assert self.capacity is not None
        workers = {w: summarise_points([r[w] for r in self.rounds]) for w in WORKERS}
        return {
            "model": self.ctx.model,
            "capacity_req_s": round(self.capacity[0], 3),
            "capacity_source": self.capacity[1],
            "capacity_figures": {k: round(v, 3) for k, v in self.capacity_figures.items()},
            "factors": list(self.factors),
            "duration_s": self.duration_s,
            "p99_target_ms": P99_TARGET_MS,
            "rounds": len(self.rounds),
            "worker_rss_mb": worker_rss_mb,
            "workers": {w: {"points": points} for w, points in workers.items()},
            "max_rate_p99_50ms": {w: max_rate_within(points) for w, points in workers.items()},
            "per_round": {
                f"max_rate_p99_50ms.{w}": [_round_max_rate(r[w]) for r in self.rounds]
                for w in WORKERS
            },
        }

    def close(self) -> None:
        self.infer_worker.stop(self.name)
        self.batched_worker.stop(self.name)
