"""Lane ``scaling`` (``python -m benchmarks scaling``): saturated req/s and CPU per request by worker count.

How much does one more worker process buy, behind the project's router, on
this machine?  For each worker count ``n`` of ``--workers`` (default 1, 2
and 4) the lane starts a *fleet*: ``n`` real ``celery -A tasks worker``
processes (:class:`~tasks.ops.launcher.WorkerProcess`: prefork, ``-c 1``,
the model preloaded, no dynamic batching), each consuming its own direct
queue and the fleet's class queue, in a registry namespace of the fleet's
own, so that the router of that fleet's clients sees exactly its ``n``
workers.  Every fleet stays up for the whole run, idle while another is
measured, so the rounds interleave (1 2 4, 4 2 1, ...: the order flips each
round) instead of restarting workers.

Load: ``--clients`` client processes per fleet (default: one per worker, so
the load generator grows with the fleet, as an application's processes
would), this module run as a script (:func:`client_main`).  Each sends
``infer.apply_async((model, sample))`` of the stock task with no ``queue=``,
so the router picks every request's queue (sticky worker, spill to the best
other one at its in-flight limit, see :mod:`routing.router`), and keeps
``--in-flight`` x n / clients requests in flight (a closed loop: each result
that arrives lets the next request go, whatever order they arrive in,
:func:`closed_loop`).  A point: the parent says GO with a start ``t0`` (after
``--warm`` seconds of load) and an end ``t1`` (``--seconds`` later); the
clients load until ``t1``, then stop sending and drain what is in flight.
Only results that arrive between ``t0`` and ``t1`` count: req/s is their
number over ``t1 - t0``, the steady state, without ramp-up or drain.

CPU (:mod:`benchmarks.cpu`): the parent reads the CPU seconds of the fleet's
clients (``client``), its workers' main processes (``worker_main``), their
pool children (``worker_child``), RabbitMQ and Redis (where they run here) at
``t0`` and ``t1``; over the requests completed in that window they give
``cpu_ms_per_request``, over the window's length ``cores_busy`` (how many
cores those processes kept busy), beside ``machine_busy``, the whole
machine's busy cores (every process, other users' included): where those
two reach the cores the machine has, the cores have run out.

Summary: ``model``, ``device``, ``rounds``, ``seconds``, ``warm_s``,
``in_flight_per_worker``, ``cores`` (``cpu_count``: ``os.cpu_count()``;
``affinity``: the CPUs this process may run on, the ones its workers
inherit), ``workers`` (the counts), ``req_s`` and ``efficiency`` (per count:
the median of rounds, and ``req_s[n] / (n x req_s[1])``, see
:func:`efficiency`), ``points`` (per count: ``clients``, ``in_flight``,
``req_s``, ``efficiency``, ``marginal`` (:func:`marginal`), ``rtt_ms`` (client
round trip) and the replies' ``queue_wait_ms`` (publish to the task's start
in the pool child) and ``service_ms`` (the task's own work), each over every
round's window pooled, ``cpu_ms_per_request`` and
``cores_busy`` by process (median of rounds), ``machine_busy``, ``share``
(each worker's fraction of the requests served, largest first), ``router``
(the clients' router decisions over the windows), ``requests``, ``errors``,
``lost``, ``worker_rss_mb``) and ``per_round`` (``req_s.<n>``,
``efficiency.<n>``, ``cpu_ms_per_request.<n>``).

Ratios (:mod:`benchmarks.ratios`): ``scaling_rps_<n>w`` (req/s),
``scaling_efficiency_<n>w`` and ``scaling_cpu_ms_per_request_<n>w`` (total
CPU ms per request): always for 1, 2, 4 and 8 workers (None where not run),
plus any other count that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cpu import per_request_ms
from benchmarks.lanes.base import Lane, LaneContext, RoundConfig, run_alone
from benchmarks.lanes.client_fleet import READY_TIMEOUT_S, ClientFleet
from benchmarks.stats import percentiles, ratio
from routing.queues import direct_queue
from tasks.ops.launcher import WorkerProcess

__all__ = [
    "DEFAULT_WORKERS",
    "Options",
    "PointRound",
    "ScalingLane",
    "client_main",
    "closed_loop",
    "cores",
    "efficiency",
    "main",
    "marginal",
    "merge_reports",
    "parse_args",
    "parse_workers",
    "results_file",
    "summarise_point",
    "wait_oldest",
]

DEFAULT_WORKERS = (1, 2, 4)
ROUTER_COUNTS = ("decisions", "sticky_hits", "spills", "misses", "fallbacks", "errors")
DRAIN_S = 60.0  # a client waits this long after t1 for what it has in flight
POLL_S = 0.05  # a client's longest wait for a result before it looks again
TIMING = ("queue_wait_ms", "service_ms")  # of the reply's timing, kept per request


@dataclass(frozen=True)
class Options:
    """The lane's settings (its command line)."""

    workers: tuple[int, ...] = DEFAULT_WORKERS
    model: str = "mlp"
    device: str = "cpu"
    seconds: float = 8.0  # measured window of a point
    warm_s: float = 3.0  # load before the window opens
    rounds: int = 3
    in_flight: int = 8  # requests in flight per worker of the fleet
    clients: int = 0  # client processes per fleet; 0: one per worker

    def clients_for(self, n: int) -> int:
        return self.clients or n

    def window_for(self, n: int) -> int:
        """Requests in flight per client, so that the fleet has ``in_flight`` x n in all."""
        return max(1, math.ceil(self.in_flight * n / self.clients_for(n)))


def parse_workers(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: worker counts, sorted, each once (argparse type)."""
    try:
        counts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--workers takes worker counts separated by commas, like 1,2,4; got {text!r}"
        ) from e
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--workers needs counts of 1 or more; got {text!r}")
    return tuple(sorted(counts))


def efficiency(req_s: Mapping[int, float]) -> dict[int, float | None]:
    """Per worker count n: ``req_s[n] / (n x req_s[1])``; None without a 1-worker figure.

    1.0 is linear scaling: every added worker adds what the first one served.
    """
    one = req_s.get(1)
    return {n: ratio(v, n * one) if one else None for n, v in sorted(req_s.items())}


def marginal(req_s: Mapping[int, float]) -> dict[int, float | None]:
    """Per count: what each worker added since the previous count served, over ``req_s[1]``.

    From 0 workers (0 req/s) to the first count; None without a 1-worker figure.
    Near 0 (or below) where added workers bring nothing: the cores ran out.
    """
    one, prev, out = req_s.get(1), 0, {}
    for n in sorted(req_s):
        base = req_s[prev] if prev else 0.0
        out[n] = round((req_s[n] - base) / ((n - prev) * one), 3) if one else None
        prev = n
    return out


def cores() -> dict[str, Any]:
    """This machine's CPUs, and those this process (and the workers it starts) may run on."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(affinity) if affinity is not None else os.cpu_count(),
        "affinity_cpus": affinity,
    }


# ---------------------------------------------------------------------- the client process


def wait_oldest(oldest: Any, timeout: float) -> None:
    """Wait up to ``timeout`` s on ``oldest`` (results that arrive meanwhile fire their callbacks)."""
    from celery.exceptions import TimeoutError as ResultTimeout

    with contextlib.suppress(ResultTimeout):
        oldest.get(timeout=timeout, interval=timeout / 5, propagate=False)


def closed_loop(
    submit: Callable[[], Any],
    window: int,
    t0: float,
    t1: float,
    wait: Callable[[Any, float], None] = wait_oldest,
    clock: Callable[[], float] = time.time,
    drain_s: float = DRAIN_S,
    poll_s: float = POLL_S,
) -> dict[str, Any]:
    """Keep ``window`` requests in flight until ``t1``, then drain; count what arrives in [t0, t1].

    ``submit()`` publishes one request and returns its AsyncResult; its
    ``then`` callback marks its arrival, which frees its slot at once, in
    whatever order results arrive.  ``wait(oldest, timeout)`` blocks until a
    result may have arrived (the client reads one result message of any
    request, :func:`client_main`; the default waits on the oldest).  Returns
    ``sent``, ``completed`` and ``rtt_ms`` (successes arriving in the window:
    publish to arrival), ``served_by`` (worker -> successes in the window,
    from the reply), ``timing_ms`` (the replies' :data:`TIMING`), ``errors``
    (failures, any time) and ``lost`` (no result ``drain_s`` after ``t1``).
    """
    pending: dict[str, tuple[float, Any]] = {}  # id -> (sent at, result), oldest first
    arrived: deque[tuple[Any, float]] = deque()
    out: dict[str, Any] = {"sent": 0, "completed": 0, "errors": 0, "lost": 0}
    rtt: list[float] = []
    served_by: dict[str, int] = {}
    timing: dict[str, list[float]] = {k: [] for k in TIMING}

    def on_ready(result: Any) -> None:
        arrived.append((result, clock()))

    while True:
        while arrived:
            result, at = arrived.popleft()
            entry = pending.pop(result.id, None)
            if entry is None:
                continue
            if not result.successful():
                out["errors"] += 1
            elif t0 <= at <= t1:
                out["completed"] += 1
                rtt.append(round((at - entry[0]) * 1000.0, 3))
                reply = result.result if isinstance(result.result, dict) else {}
                worker = str(reply.get("worker"))
                served_by[worker] = served_by.get(worker, 0) + 1
                for key, ms in (reply.get("timing") or {}).items():
                    if key in timing and isinstance(ms, int | float):
                        timing[key].append(round(float(ms), 3))
        now = clock()
        while now < t1 and len(pending) < window:
            result = submit()
            result.then(on_ready)
            pending[result.id] = (now, result)
            out["sent"] += 1
            now = clock()
        if not pending and now >= t1:
            break
        if now >= t1 + drain_s:
            out["lost"] = len(pending)
            break
        if pending and not arrived:
            wait(next(iter(pending.values()))[1], poll_s)
    return {**out, "rtt_ms": rtt, "served_by": served_by, "timing_ms": timing}


def client_main(argv: list[str] | None = None) -> int:
    """One client process of a fleet: warm up, print READY, then one report per ``GO t0 t1`` line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lanes.scaling", description="a client of the scaling lane"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--window", type=int, required=True, help="requests in flight")
    parser.add_argument("--hosts", required=True, help="the fleet's worker hostnames, a,b,...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tasks import app, infer
    from tasks.client.routes import wait_for_workers
    from tasks.ops.demo import sample_inputs
    from tasks.wire.catalog import local_catalog

    router = app.router  # this process's, over the fleet's namespace (INFER_REGISTRY_NAMESPACE)
    wait_for_workers(router, set(args.hosts.split(",")), READY_TIMEOUT_S)
    sample = sample_inputs(local_catalog(app.infer_settings).resolve(args.model), 1, args.seed)[0]

    def submit() -> Any:
        return infer.apply_async((args.model, sample))  # no queue=: the router decides

    consumer = getattr(app.backend, "result_consumer", None)  # Redis: its pub/sub reader

    def wait(oldest: Any, timeout: float) -> None:
        """One result message, whichever request's it is (else wait on the oldest)."""
        if consumer is None:
            wait_oldest(oldest, timeout)
        else:
            consumer.drain_events(timeout=timeout)

    for result in [submit() for _ in range(args.window)]:  # connections, the workers' first
        result.get(timeout=60)
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["GO"]:
            break
        before = router.stats.as_dict()
        report = closed_loop(submit, args.window, float(words[1]), float(words[2]), wait)
        after = router.stats.as_dict()
        report["router"] = {k: after[k] - before[k] for k in ROUTER_COUNTS}
        print(json.dumps(report), flush=True)
    return 0


# ---------------------------------------------------------------------- the parent


@dataclass
class PointRound:
    """One point (a fleet of ``workers``) of one round: every client's report merged."""

    workers: int
    window_s: float
    completed: int = 0
    errors: int = 0
    lost: int = 0
    rtt_ms: list[float] = field(default_factory=list)
    timing_ms: dict[str, list[float]] = field(default_factory=dict)  # the replies' (TIMING)
    served_by: dict[str, int] = field(default_factory=dict)
    router: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # by role, over the window
    machine_busy_s: float = 0.0  # the whole machine's busy CPU seconds over the window

    @property
    def req_s(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0


def merge_reports(
    workers: int,
    window_s: float,
    reports: Sequence[Mapping[str, Any]],
    cpu_s: Mapping[str, float],
    machine_busy_s: float,
) -> PointRound:
    """The clients' reports of one point, with the CPU the parent read over its window."""
    point = PointRound(workers, window_s, cpu_s=dict(cpu_s), machine_busy_s=machine_busy_s)
    for report in reports:
        point.completed += int(report["completed"])
        point.errors += int(report["errors"])
        point.lost += int(report["lost"])
        point.rtt_ms += report["rtt_ms"]
        for key, values in report.get("timing_ms", {}).items():
            point.timing_ms.setdefault(key, []).extend(values)
        for worker, count in report["served_by"].items():
            point.served_by[worker] = point.served_by.get(worker, 0) + int(count)
        for key, count in report.get("router", {}).items():
            point.router[key] = point.router.get(key, 0) + int(count)
    return point


def summarise_point(rounds: Sequence[PointRound]) -> dict[str, Any]:
    """One worker count over the rounds: medians of rounds, latencies and shares pooled.

    ``share`` lists each worker's fraction of the successes in the windows,
    largest first, with a 0 for a worker of the fleet that served none.
    """
    n = rounds[0].workers
    served: dict[str, int] = {}
    router: dict[str, int] = {}
    for r in rounds:
        for worker, count in r.served_by.items():
            served[worker] = served.get(worker, 0) + count
        for key, count in r.router.items():
            router[key] = router.get(key, 0) + count
    total = sum(served.values())
    share = sorted((round(c / total, 3) for c in served.values()), reverse=True) if total else []
    share += [0.0] * max(0, n - len(share))
    rtt = [ms for r in rounds for ms in r.rtt_ms]
    busy = [
        {
            **{k: v / r.window_s for k, v in r.cpu_s.items()},
            "total": sum(r.cpu_s.values()) / r.window_s,
        }
        for r in rounds
    ]
    keys = list(dict.fromkeys(k for b in busy for k in b))
    return {
        "workers": n,
        "req_s": round(statistics.median(r.req_s for r in rounds), 3),
        "rtt_ms": _pooled(rtt),
        **{key: _pooled([ms for r in rounds for ms in r.timing_ms.get(key, [])]) for key in TIMING},
        "cpu_ms_per_request": per_request_ms([(r.cpu_s, r.completed) for r in rounds]),
        "cores_busy": {k: round(statistics.median(b.get(k, 0.0) for b in busy), 3) for k in keys},
        "machine_busy": round(statistics.median(r.machine_busy_s / r.window_s for r in rounds), 3),
        "share": share,
        "router": router,
        "requests": sum(r.completed for r in rounds),
        "errors": sum(r.errors for r in rounds),
        "lost": sum(r.lost for r in rounds),
    }


def _pooled(samples: list[float]) -> dict[str, float] | None:
    return percentiles(samples) if len(samples) >= 2 else None


class _Fleet(ClientFleet):
    """``n`` workers in a namespace and class queue of their own, and the clients that load them."""

    def __init__(self, ctx: LaneContext, n: int, options: Options) -> None:
        self.n, self.options = n, options
        queue = f"bench-scale{n}-{ctx.run}"  # the class queue; also the registry namespace
        env = dict(os.environ, INFER_REGISTRY_NAMESPACE=queue, INFER_BATCHING="false")
        workers = [
            WorkerProcess(
                name,
                options.device,
                logdir=ctx.logdir,
                queues=[direct_queue(queue, name), queue],
                preload=(options.model,),
                env=env,
            )
            for name in (f"bench-s{n}w{i}-{ctx.run}" for i in range(n))
        ]
        super().__init__(ctx, "scaling", queue, env, workers)

    def start_clients(self) -> None:
        hosts = ",".join(w.hostname for w in self.workers)
        argv = ["benchmarks.lanes.scaling", "--model", self.options.model]
        argv += ["--window", str(self.options.window_for(self.n)), "--hosts", hosts]
        self.spawn(
            argv, self.options.clients_for(self.n), lambda i: f"scaling-client-{self.n}w-{i}.log"
        )

    def measure(self) -> PointRound:
        """One point: GO to every client, CPU read over [t0, t1], their reports merged."""
        t0 = time.time() + self.options.warm_s
        t1 = t0 + self.options.seconds
        self.send([f"GO {t0!r} {t1!r}"] * len(self.clients))
        cpu_s, machine = self.cpu_over(t0, t1)
        reports = self.reports(t1 + DRAIN_S + 30.0, "report")
        return merge_reports(self.n, t1 - t0, reports, cpu_s, machine)


class ScalingLane(Lane):
    """A fleet of n workers per count, each saturated through the router in turn."""

    name = "scaling"

    def __init__(self, ctx: LaneContext, options: Options = Options()) -> None:
        super().__init__(ctx)
        self.options = options
        self.fleets = {n: _Fleet(ctx, n, options) for n in options.workers}
        self.rounds: dict[int, list[PointRound]] = {n: [] for n in options.workers}
        self.rss: dict[int, tuple[float | None, float | None]] = {}

    def start(self) -> None:
        for fleet in self.fleets.values():
            fleet.start()

    def setup(self) -> None:
        for fleet in self.fleets.values():
            for w in fleet.workers:
                w.wait_ready(READY_TIMEOUT_S)
        for fleet in self.fleets.values():
            fleet.start_clients()
        for fleet in self.fleets.values():
            fleet.wait_clients()

    def run_round(self, cfg: RoundConfig) -> None:
        """Every count once, in the options' order on even rounds and reversed on odd ones."""
        r = len(next(iter(self.rounds.values())))
        order = self.options.workers if r % 2 == 0 else self.options.workers[::-1]
        for n in order:
            point = self.fleets[n].measure()
            self.rounds[n].append(point)
            print(
                f"scaling: round {r + 1}, {n} worker(s): {point.req_s:,.1f} req/s, "
                f"{sum(point.cpu_s.values()) * 1000 / max(point.completed, 1):.2f} CPU ms/request, "
                f"machine {point.machine_busy_s / point.window_s:.2f} cores busy",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(0.5)  # the fleet's queues are drained: the clients waited for every result

    def rss_mb(self) -> float | None:
        self.rss = {n: fleet.rss() for n, fleet in self.fleets.items()}
        values = [w for w, _ in self.rss.values() if w is not None]
        return max(values, default=None)

    def client_rss_mb(self) -> float | None:
        return max((c for _, c in self.rss.values() if c is not None), default=None)

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        counts = [n for n in self.options.workers if self.rounds[n]]
        points = {n: summarise_point(self.rounds[n]) for n in counts}
        req_s = {n: points[n]["req_s"] for n in counts}
        eff, added = efficiency(req_s), marginal(req_s)
        per_round: dict[str, list[Any]] = {}
        for n in counts:
            opts = self.options
            points[n] = {
                "workers": n,
                "clients": opts.clients_for(n),
                "in_flight": opts.window_for(n) * opts.clients_for(n),
                **{k: v for k, v in points[n].items() if k != "workers"},
                "efficiency": eff[n],
                "marginal": added[n],
                "worker_rss_mb": self.rss.get(n, (None, None))[0],
            }
            per_round[f"req_s.{n}"] = [round(r.req_s, 3) for r in self.rounds[n]]
            per_round[f"cpu_ms_per_request.{n}"] = [
                round(sum(r.cpu_s.values()) * 1000.0 / r.completed, 3) if r.completed else None
                for r in self.rounds[n]
            ]
        if 1 in counts:
            ones = self.rounds[1]
            for n in counts:
                per_round[f"efficiency.{n}"] = [
                    ratio(r.req_s, n * one.req_s)
                    for one, r in zip(ones, self.rounds[n], strict=False)
                ]
        return {
            "model": self.options.model,
            "device": self.options.device,
            "rounds": len(self.rounds[counts[0]]) if counts else 0,
            "seconds": self.options.seconds,
            "warm_s": self.options.warm_s,
            "in_flight_per_worker": self.options.in_flight,
            "cores": cores(),
            "workers": counts,
            "req_s": {str(n): v for n, v in req_s.items()},
            "efficiency": {str(n): v for n, v in eff.items()},
            "points": {str(n): p for n, p in points.items()},
            "per_round": per_round,
        }

    def close(self) -> None:
        for fleet in self.fleets.values():
            try:
                fleet.close()
            except Exception as exc:  # the other fleets still stop
                print(f"scaling: closing the {fleet.n}-worker fleet failed: {exc}", file=sys.stderr)


def results_file(
    summary: dict[str, Any],
    options: Options,
    machine: dict[str, Any],
    client_rss: float | None,
    date: str | None = None,
) -> dict[str, Any]:
    """The results file of a run of this lane alone (the contract in DESIGN.md)."""
    from benchmarks.ratios import ratios

    lanes = {"scaling": summary}
    worker_rss = [p["worker_rss_mb"] for p in summary["points"].values() if p["worker_rss_mb"]]
    return {
        "schema": 1,
        "date": date or time.strftime("%Y-%m-%d"),
        "machine": machine,
        "plan": {
            "lane": "scaling",
            "rounds": options.rounds,
            "workers": list(options.workers),
            "model": options.model,
            "device": options.device,
            "seconds": options.seconds,
            "warm_s": options.warm_s,
            "in_flight_per_worker": options.in_flight,
            "clients": options.clients or "one per worker",
        },
        "lanes": lanes,
        "ratios": ratios(lanes),
        "memory_mb": {
            "client_rss": client_rss,
            "scaling_worker_rss": max(worker_rss, default=None),
        },
    }


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path]:
    """The lane's command line: its :class:`Options` and the results file's path."""
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks scaling", description=(__doc__ or "").split("\n\n")[1]
    )
    parser.add_argument(
        "--workers", type=parse_workers, default=defaults.workers, help="worker counts, e.g. 1,2,4"
    )
    parser.add_argument("--model", default=defaults.model, help="the model every request asks for")
    parser.add_argument("--device", default=defaults.device, help="the workers' device")
    parser.add_argument(
        "--seconds", type=float, default=defaults.seconds, help="measured s a point"
    )
    parser.add_argument("--warm", type=float, default=defaults.warm_s, help="s of load before it")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument(
        "--in-flight", type=int, default=defaults.in_flight, help="requests in flight per worker"
    )
    parser.add_argument("--clients", type=int, default=0, help="client processes a point (0: n)")
    parser.add_argument("--json", type=Path, default=Path("var/bench/scaling.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.in_flight < 1 or args.clients < 0:
        parser.error(
            "--rounds and --in-flight need 1 or more, --clients 0 (one per worker) or more"
        )
    if args.seconds <= 0 or args.warm < 0:
        parser.error("--seconds needs more than 0, --warm 0 or more")
    options = Options(
        workers=args.workers,
        model=args.model,
        device=args.device,
        seconds=args.seconds,
        warm_s=args.warm,
        rounds=args.rounds,
        in_flight=args.in_flight,
        clients=args.clients,
    )
    return options, args.json


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks scaling [--workers 1,2,4] [--model mlp] ... --json PATH``."""
    options, path = parse_args(argv)
    from benchmarks.plots import scaling_plot

    summary = run_alone("scaling", options, path, ScalingLane, results_file, scaling_plot)
    points = summary["points"].values()
    return 0 if all(p["errors"] == 0 and p["lost"] == 0 for p in points) else 1


if __name__ == "__main__":  # a client process (the lane itself: python -m benchmarks scaling)
    sys.exit(client_main())
