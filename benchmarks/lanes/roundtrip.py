"""Round-trip lanes: the measured loop most lanes share, and its figures.

A round is a closed loop of ``requests`` round trips with one in flight
(latency), then ``window_requests`` more with ``window`` in flight
(throughput), timing each publish call on the way.  A Celery lane may add a
saturation phase (``--producers N``, :mod:`benchmarks.producers`).

Summary (its entry in the results file): ``rtt_ms`` (p50/p95/p99/mean of the
closed loop, median of rounds), ``throughput_per_s``, ``publish_us``,
``requests``, ``rounds``, ``worker_rss_mb``, ``saturated_req_s`` when measured,
the lane's own figures (:meth:`RoundTripLane.served`), ``breakdown_ms``
when its task reports a timing breakdown, ``cpu_ms_per_request`` (the CPU ms
per request served of each process the lane involves, :mod:`benchmarks.cpu`:
``client``, ``worker_main``, ``worker_child``, ``rabbitmq``, ``redis`` where
found, and ``total``; median of rounds) and ``per_round`` (figure path, as in
``python -m benchmarks compare``, to its value in each round, e.g.
``{"rtt_ms.p50": [..], "throughput_per_s": [..]}``: the spread between rounds).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.cpu import CpuMeter, descendants, own, per_request_ms, round_ms
from benchmarks.lanes.base import Lane, LaneContext, LaneWorker, RoundConfig, services
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
    served: int = 0  # requests served in the round, every phase
    client_cpu_s: float = 0.0  # CPU of client processes other than this one (producers)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process group, over the round
    # The saturation phase alone (infer.map producers): per process group, and requests served.
    saturated_cpu_s: dict[str, float] = field(default_factory=dict)
    saturated_served: int = 0


class RoundTripLane(Lane):
    """Request/response round trips: subclasses give ``submit`` and ``wait``."""

    window: int | None = None  # requests in flight for throughput; None: the plan's

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.rounds: list[RoundTrips] = []
        self._meter: CpuMeter | None = None

    def submit(self) -> Any:
        raise NotImplementedError

    def wait(self, pending: Any) -> Any:
        raise NotImplementedError

    def warm_up(self, n: int = 5) -> None:
        for _ in range(n):
            self.wait(self.submit())

    def peer_process(self) -> psutil.Process | None:
        """Its peer's main process (worker, echo consumer) for CPU accounting; None: none."""
        return None

    def cpu_meter(self) -> CpuMeter:
        """The processes this lane involves, by role (made on the first round)."""
        if self._meter is None:
            self._meter = self.new_cpu_meter()
        return self._meter

    def new_cpu_meter(self) -> CpuMeter:
        """A meter over this lane's processes: this client, its peer's main and child, the servers."""
        peer = self.peer_process()
        shared = services(self.ctx)
        groups = {"client": own(psutil.Process())}
        if peer is not None:
            groups |= {"worker_main": own(peer), "worker_child": descendants(peer)}
        return CpuMeter(
            groups | {"rabbitmq": own(shared["rabbitmq"]), "redis": own(shared["redis"])}
        )

    def run_round(self, cfg: RoundConfig) -> None:
        meter = self.cpu_meter()
        meter.start()
        out = self.round_trips(cfg)
        out.cpu_s = meter.stop({"client": out.client_cpu_s})
        self.rounds.append(out)

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
        out.served = cfg.requests + cfg.window_requests
        return out

    def latency_ms(self) -> list[float]:
        return [ms for r in self.rounds for ms in r.rtt_ms]

    def saturation_in_flight(self) -> int | None:
        """Requests in flight in this lane's saturation phase (None: it has none)."""
        return None

    def served(self, figures: dict[str, Any]) -> dict[str, Any]:
        """Figures of this lane's own (e.g. the model and samples/s), after the common ones."""
        return {}

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        rounds = self.rounds
        rtt = [percentiles(r.rtt_ms) for r in rounds]
        lane: dict[str, Any] = {
            "rtt_ms": median_of_rounds(rtt),
            "throughput_per_s": median_of_rounds([{"v": r.throughput_per_s} for r in rounds])["v"],
            "publish_us": median_of_rounds([{"v": r.publish_us} for r in rounds])["v"],
            "requests": sum(len(r.rtt_ms) for r in rounds),
            "rounds": len(rounds),
            "worker_rss_mb": worker_rss_mb,
        }
        saturated = [r.saturated_per_s for r in rounds if r.saturated_per_s is not None]
        if saturated:
            lane["saturated_req_s"] = median_of_rounds([{"v": v} for v in saturated])["v"]
            lane["saturation_in_flight"] = self.saturation_in_flight()
        lane.update(self.served(lane))
        keys = rounds[0].breakdown_ms.keys()
        if keys:
            lane["breakdown_ms"] = {
                k: percentiles([ms for r in rounds for ms in r.breakdown_ms.get(k, [])])
                for k in keys
            }
        cpu = [(r.cpu_s, r.served) for r in rounds if r.cpu_s and r.served]
        if cpu:
            lane["cpu_ms_per_request"] = per_request_ms(cpu)
        saturated_cpu = [
            (r.saturated_cpu_s, r.saturated_served)
            for r in rounds
            if r.saturated_cpu_s and r.saturated_served
        ]
        if saturated_cpu:  # the saturation phase alone: the producers' CPU as the client's
            lane["saturated_cpu_ms_per_request"] = per_request_ms(saturated_cpu)
        per_round: dict[str, list[float]] = {
            "rtt_ms.p50": [p["p50"] for p in rtt],
            "rtt_ms.p95": [p["p95"] for p in rtt],
            "throughput_per_s": [round(r.throughput_per_s, 3) for r in rounds],
            "publish_us": [round(r.publish_us, 3) for r in rounds],
        }
        if lane.get("samples_per_s") == lane["throughput_per_s"]:  # one sample per request
            per_round["samples_per_s"] = per_round["throughput_per_s"]
        if saturated:
            per_round["saturated_req_s"] = [round(v, 3) for v in saturated]
        if cpu:
            per_round["cpu_ms_per_request.total"] = [
                round(round_ms(c, n)["total"], 3) for c, n in cpu
            ]
        if saturated_cpu:
            per_round["saturated_cpu_ms_per_request.total"] = [
                round(round_ms(c, n)["total"], 3) for c, n in saturated_cpu
            ]
        lane["per_round"] = per_round
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
            meter = self.new_cpu_meter()
            meter.start()
            phase = self.saturation.run(
                producers=cfg.producers, requests=max(cfg.window_requests, 2 * cfg.window)
            )
            # This process only waits during the phase: the producers are the client.
            out.saturated_cpu_s = meter.stop({"client": phase.client_cpu_s})
            out.saturated_served = phase.served
            out.saturated_per_s = phase.req_s
            out.served += phase.served
            out.client_cpu_s += phase.client_cpu_s
        return out

    def saturation_in_flight(self) -> int | None:
        return self.saturation.window if self.saturation is not None else None

    def peer_process(self) -> psutil.Process | None:
        return psutil.Process(self.worker.process.pid) if self.worker.process.alive() else None

    def start(self) -> None:
        self.worker.start(self.name)

    def setup(self) -> None:
        self.worker.wait_ready()
        self.warm_up()  # the pool child starts, preloads and warms up

    def rss_mb(self) -> float | None:
        return self.worker.rss_mb()

    def close(self) -> None:
        self.worker.stop(self.name)
