"""Lane ``overload`` (``python -m benchmarks overload``): goodput past capacity, admission on and off.

What does a fleet deliver when callers send more than it can serve, each
request with a deadline?  The lane starts two identical *fleets*, one per
mode: ``--workers`` real ``celery -A tasks worker`` processes with dynamic
batching (``INFER_BATCHING``, as the other deployment lanes' batching worker;
``--model`` preloaded; each consuming its own direct queue and its fleet's
class queue, in a registry namespace of the fleet's own), and ``--clients``
client processes (this module run as a script, :func:`client_main`), with
admission control on (``INFER_ADMISSION=true``) in one fleet and off in the
other.  A fleet of its own per mode keeps one mode's overload out of the
other's measured service rate, which each worker advertises from its last
``INFER_SERVICE_RATE_WINDOW_S``; the two take turns, so they share the
machine's conditions.  Every request is a stock ``infer.apply_async((model,
sample), expires=<deadline>)`` with no ``queue=``: the router picks the
queue and, with admission on, refuses (:class:`~models.errors.Overloaded`,
nothing published) a request whose expected wait does not fit its deadline.

1. **Capacity**: per fleet, a closed-loop saturation (no deadline,
   ``--in-flight`` requests in flight in all, default twice what the fleet's
   workers reserve, :func:`saturation_window`): the results that arrive in
   ``--capacity-seconds`` after ``--warm`` seconds of load, per second
   (:func:`benchmarks.lanes.scaling.closed_loop`).  The levels offer
   multiples of the two fleets' mean, the first round's.
2. **Levels**: for each factor of ``--levels`` (0.5, 1, 2, 4) an open loop at
   factor x capacity req/s for ``--seconds`` (20), every request with a
   ``--deadline-ms`` (500) deadline, on each fleet in turn (which goes first
   alternates by level and round), each once the one before has every result
   back and a heartbeat has shown its drained fleet.  The send times are a
   seeded Poisson process (:func:`~benchmarks.lanes.open_loop.poisson_schedule`),
   split over the clients; request *i* is sent at its time whatever happened
   to the earlier ones, and its deadline runs from when it is sent.

The default model is ``minilm`` (real sentence-embedding weights): its
forward pass, not the per-message overhead, bounds a worker, as on a GPU, and
its capacity is low enough (about 200 req/s on 2 cores) that one client
process can offer 4x of it.  ``cnn`` serves about 450 req/s here, and 4x
that is more ``apply_async`` calls than the two cores that also run the
worker, RabbitMQ and Redis can make (``attempted_per_s`` shows it).

The load generator (:func:`open_loop`, one per client process): its main
thread sleeps until the next send time, then sends every request due,
pipelined on one channel in confirm mode kept open for the whole level
(:func:`tasks.client.publish.confirming_producer`: a publish does not wait
for its confirm); a request due more than :data:`LAG_LIMIT_S` ago is skipped
(``unsent``) rather than sent late.  A second thread reads the result
messages (the Redis backend's pub/sub; each request's ``AsyncResult.then``
callback takes the time), so a reply is timed when it reaches the caller,
however busy sending is.  A refused request costs the router's decision, an
admitted one a publish; ``attempted_per_s`` (what the generator achieved
against ``offered_req_s``), ``lag_ms`` (how far behind its schedule it sent)
and the clients' CPU say whether it kept up.

Each request's outcome (:func:`classify`), by when its result reached the
caller:

- ``good``: a reply delivered by its deadline (goodput: good per second of
  the level);
- ``late``: a reply delivered after its deadline (computed before it, since
  a worker never computes a request past its deadline; delivered after);
- ``expired``: ``DeadlineExceeded`` from a worker (dropped, never computed);
- ``refused``: an error raised at submit, by class (``Overloaded`` from
  admission control; ``untyped_refusals`` counts those that are not the
  project's :class:`~models.errors.InferenceError`: must be 0);
- ``failed``: any other error from a worker; ``lost``: no result within
  :data:`DRAIN_S` after the level; ``unsent``: skipped by a lagging client.

Fractions are of the requests scheduled (all of the above).
``computed_after_deadline`` checks the worker's promise from the replies'
timing (:func:`compute_window`): a reply's forward pass started no earlier
than its batch's start (send + ``queue_wait_ms`` + ``batch_wait_ms``) and no
later than its batch's end minus its ``compute_ms`` (send + ``total_ms`` -
``compute_ms``), the send stamp lying between the client's clock just before
and just after ``apply_async``.  A reply whose earliest start is past its
deadline was computed after it (must be 0); ``compute_start_undetermined``
counts those whose window straddles the deadline.

Also per level: cores busy by process (the fleet's clients, its workers'
main processes and pool children, RabbitMQ, Redis; ``psutil``, over the
send window) beside the whole machine's (other users' processes included),
the clients' router decisions (``overloaded``, ``rerouted``), what the
workers advertised to the clients' router (``service_rate``, ``backlog``,
heartbeat age, read every :data:`SAMPLE_S`: admission control's inputs), and
``timeline``, each outcome's count by the second of its send.  ``--trace
DIR`` also writes every request of every level (its timing, its outcome)
and the advertised figures over time, one JSON file per client and level.

Summary: ``model``, ``device``, ``workers``, ``clients``, ``levels``,
``seconds``, ``deadline_ms``, ``rounds``, ``capacity_req_s`` and
``capacity_figures`` (per fleet), ``capacity_window``, ``settings`` (the
admission, heartbeat and batching settings), ``cores``, per mode a list of
``points`` (:func:`summarise_point`), ``goodput_4x_vs_1x`` per mode,
``computed_after_deadline`` and ``untyped_refusals`` (totals), ``per_round``.
Ratios (:mod:`benchmarks.ratios`): ``overload_goodput_4x_vs_1x`` (admission
on), ``overload_goodput_4x_vs_1x_no_admission`` and
``overload_goodput_4x_admission_vs_no_admission``.  The command exits 1 when
a request was computed after its deadline, refused untyped, or lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig, run_alone
from benchmarks.lanes.client_fleet import READY_TIMEOUT_S, ClientFleet
from benchmarks.lanes.open_loop import poisson_schedule
from benchmarks.lanes.scaling import cores
from benchmarks.stats import percentiles, ratio
from routing.queues import direct_queue
from tasks.ops.launcher import WorkerProcess

__all__ = [
    "DEADLINE_MS",
    "LEVELS",
    "MODES",
    "Options",
    "OverloadLane",
    "PointRound",
    "Sent",
    "classify",
    "client_main",
    "compute_window",
    "goodput_ratio",
    "main",
    "merge_reports",
    "open_loop",
    "parse_args",
    "parse_levels",
    "results_file",
    "saturation_window",
    "schedule",
    "summarise_point",
]

LEVELS = (0.5, 1.0, 2.0, 4.0)  # offered load, multiples of the fleet's measured capacity
MODES = ("admission", "no_admission")  # INFER_ADMISSION=true / false in the clients
DEADLINE_MS = 500.0
DRAIN_S = 120.0  # after its last send, a client waits this long for results (then: lost)
LAG_LIMIT_S = 1.0  # a request due this long ago is skipped (unsent): the client catches up
POLL_S = 0.05  # longest read of result messages between two looks at the clock
SAMPLE_S = 0.5  # how often a client reads what the workers advertise
ROUTER_COUNTS = ("decisions", "overloaded", "rerouted", "errors")
OUTCOMES = ("good", "late", "expired", "refused", "failed", "lost", "unsent")


@dataclass(frozen=True)
class Options:
    """The lane's settings (its command line)."""

    model: str = "minilm"
    device: str = "cpu"
    workers: int = 1
    clients: int = 1  # client processes per mode
    levels: tuple[float, ...] = LEVELS
    seconds: float = 20.0  # each level's open loop
    deadline_ms: float = DEADLINE_MS
    rounds: int = 1
    capacity_s: float = 5.0  # the capacity run's measured window ...
    warm_s: float = 2.0  # ... after this much load
    in_flight: int = 0  # the capacity run's requests in flight in all (0: saturation_window)
    quick: bool = False
    trace: Path | None = None  # the clients write every request of each level here

    @classmethod
    def quick_plan(cls, **changes: Any) -> Options:
        """``--quick``: 3 s levels, a 2 s capacity window after 1 s of load."""
        return replace(cls(seconds=3.0, capacity_s=2.0, warm_s=1.0, quick=True), **changes)


def parse_levels(text: str) -> tuple[float, ...]:
    """``"0.5,1,2,4"`` -> ``(0.5, 1.0, 2.0, 4.0)``: factors, sorted, each once (argparse type)."""
    try:
        levels = {float(part) for part in text.split(",") if part.strip()}
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--levels takes capacity factors separated by commas, like 0.5,1,2,4; got {text!r}"
        ) from e
    if not levels or min(levels) <= 0:
        raise argparse.ArgumentTypeError(f"--levels needs factors above 0; got {text!r}")
    return tuple(sorted(levels))


def saturation_window(workers: int, max_batch: int, reserve: int) -> int:
    """Requests in flight that keep ``workers`` batching workers busy: twice what they reserve.

    A batching worker reserves ``reserve`` x its largest batch (INFER_BATCH_RESERVE);
    twice that keeps its prefetch refilling from messages already on the broker.
    """
    return max(1, 2 * workers * reserve * max_batch)


def schedule(rate: float, seconds: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a seeded Poisson process of ``rate`` over ``seconds``."""
    n = max(16, round(rate * seconds * 1.25) + 16)
    return [t for t in poisson_schedule(rate, n, seed) if t < seconds]


# ---------------------------------------------------------------------- outcomes


@dataclass
class Sent:
    """One request the client tried to send: when, its deadline, and what became of it."""

    scheduled: float  # the schedule's time (wall clock)
    called: float  # just before apply_async
    returned: float  # just after it returned (or raised)
    deadline: float  # absolute, wall clock
    result: Any = None  # its AsyncResult; None when refused at submit
    refused: str | None = None  # the class name of what apply_async raised


def compute_window(sent: Sent, timing: Mapping[str, Any]) -> tuple[float, float] | None:
    """The earliest and latest wall-clock time the reply's forward pass can have started.

    From the reply's ``timing`` (:mod:`tasks.worker.batch_job`), relative to
    the message's send stamp, which lies in ``[sent.called, sent.returned]``:
    the batch started at send + queue wait + batch wait, and the pass ended
    by the batch's end (send + ``total_ms``), so it started by that minus
    ``compute_ms``.  None when the timing lacks a figure.
    """
    try:
        queued = float(timing["queue_wait_ms"]) + float(timing["batch_wait_ms"])
        latest = float(timing["total_ms"]) - float(timing["compute_ms"])
    except (KeyError, TypeError, ValueError):
        return None
    return sent.called + queued / 1000.0, sent.returned + latest / 1000.0


def classify(sent: Sent, arrived: float | None) -> str:
    """The outcome of one request (see the module): one of :data:`OUTCOMES`."""
    if sent.refused is not None:
        return "refused"
    if arrived is None:
        return "lost"
    result = sent.result
    if result.successful():
        return "good" if arrived <= sent.deadline else "late"
    error = result.result
    if type(error).__name__ == "DeadlineExceeded":
        return "expired"
    return "failed"


def _error_name(result: Any) -> str:
    error = result.result
    return type(error).__name__ if isinstance(error, BaseException) else str(result.state)


# ---------------------------------------------------------------------- the client process


def open_loop(
    submit: Callable[[float], Any],
    offsets: Sequence[float],
    t0: float,
    deadline_s: float,
    wait: Callable[[float], None],
    clock: Callable[[], float] = time.time,
    drain_s: float = DRAIN_S,
    lag_limit_s: float = LAG_LIMIT_S,
    sample: Callable[[], None] | None = None,
    is_typed: Callable[[BaseException], bool] = lambda e: True,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Send request *i* at ``t0 + offsets[i]``, each with a deadline ``deadline_s`` after its send.

    ``submit(deadline)`` sends one request (``deadline``: absolute, wall clock)
    and returns its AsyncResult, whose ``then`` callback marks its arrival,
    or raises (refused at submit).  ``wait(timeout)`` blocks at most
    ``timeout`` s reading result messages; ``sample()`` (if given) is called
    every :data:`SAMPLE_S`.  After the last send it waits for every result, at
    most ``drain_s``.  Returns the report :func:`merge_reports` reads: the
    counts of :data:`OUTCOMES`, ``refused_by`` and ``failed_by`` (class names),
    ``untyped`` (refusals ``is_typed`` says are not the project's errors),
    ``good_ms`` (send to delivery of each good reply), ``late_ms`` (delivery
    past the deadline), ``lag_ms`` (each send behind its schedule), the
    compute-start check, ``attempted`` and ``published``, the send span and
    ``timeline`` (each outcome's count by the second of its send).  With
    ``records``, one dict per request is appended to it (``--trace``).
    """
    arrived: deque[tuple[Any, float]] = deque()
    at: dict[str, float] = {}

    def on_ready(result: Any) -> None:
        arrived.append((result, clock()))

    sent: list[Sent] = []
    pending = 0
    unsent = 0
    next_sample = t0
    untyped = 0  # counted at once: keeping 10,000 exceptions alive kept their frames too

    def settle() -> None:
        nonlocal pending
        while arrived:
            result, when = arrived.popleft()
            if result.id not in at:
                at[result.id] = when
                pending -= 1

    i, n = 0, len(offsets)
    while i < n:
        now = clock()
        if sample is not None and now >= next_sample:
            sample()
            next_sample = now + SAMPLE_S
        due = t0 + offsets[i]
        if now - due > lag_limit_s:  # far behind: skip what is that late, keep sending
            unsent += 1
            i += 1
            continue
        if due > now:
            settle()
            wait(min(due - now, POLL_S))
            continue
        called = now
        deadline = called + deadline_s
        try:
            result = submit(deadline)
        except Exception as e:  # refused at submit: Overloaded, or anything else raised
            sent.append(Sent(due, called, clock(), deadline, refused=type(e).__name__))
            untyped += not is_typed(e)
        else:
            returned = clock()
            result.then(on_ready)
            pending += 1
            sent.append(Sent(due, called, returned, deadline, result=result))
        i += 1
    send_end = clock()
    give_up = send_end + drain_s
    while pending > 0 and clock() < give_up:
        settle()
        if pending > 0:
            wait(POLL_S)
    settle()
    report = _report(sent, at, unsent, t0, send_end, records)
    report["untyped"] = untyped
    return report


def _report(
    sent: Sequence[Sent],
    at: Mapping[str, float],
    unsent: int,
    t0: float,
    send_end: float,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    counts = dict.fromkeys(OUTCOMES, 0)
    counts["unsent"] = unsent
    refused_by: dict[str, int] = {}
    failed_by: dict[str, int] = {}
    good_ms: list[float] = []
    late_ms: list[float] = []
    lag_ms: list[float] = []
    after = undetermined = 0
    seconds = 1 + int(max((s.scheduled - t0 for s in sent), default=0.0))
    timeline = {k: [0] * seconds for k in ("good", "late", "expired", "refused")}
    for s in sent:
        lag_ms.append(round((s.called - s.scheduled) * 1000.0, 3))
        when = at.get(s.result.id) if s.result is not None else None
        outcome = classify(s, when)
        counts[outcome] += 1
        if outcome in timeline:
            timeline[outcome][max(0, int(s.scheduled - t0))] += 1
        if records is not None:
            reply = s.result.result if outcome in ("good", "late") else None
            records.append(
                {
                    "scheduled": round(s.scheduled - t0, 6),
                    "called": round(s.called - t0, 6),
                    "returned": round(s.returned - t0, 6),
                    "deadline": round(s.deadline - t0, 6),
                    "arrived": None if when is None else round(when - t0, 6),
                    "outcome": outcome,
                    "why": s.refused,
                    "timing": reply.get("timing") if isinstance(reply, dict) else None,
                    "forward_batch": reply.get("forward_batch")
                    if isinstance(reply, dict)
                    else None,
                }
            )
        if outcome == "refused":
            assert s.refused is not None
            refused_by[s.refused] = refused_by.get(s.refused, 0) + 1
        elif outcome == "failed":
            name = _error_name(s.result)
            failed_by[name] = failed_by.get(name, 0) + 1
        elif outcome == "lost":
            with contextlib.suppress(Exception):
                s.result.backend.remove_pending_result(s.result)
        if outcome in ("good", "late"):
            assert when is not None
            if outcome == "good":
                good_ms.append(round((when - s.called) * 1000.0, 3))
            else:
                late_ms.append(round((when - s.deadline) * 1000.0, 3))
            reply = s.result.result if isinstance(s.result.result, dict) else {}
            window = compute_window(s, reply.get("timing") or {})
            if window is None or window[0] <= s.deadline < window[1]:
                undetermined += 1
            elif window[0] > s.deadline:
                after += 1
    last = max((s.returned for s in sent), default=t0)
    return {
        "counts": counts,
        "attempted": len(sent),
        "published": sum(1 for s in sent if s.result is not None),
        "refused_by": refused_by,
        "failed_by": failed_by,
        "good_ms": good_ms,
        "late_ms": late_ms,
        "lag_ms": lag_ms,
        "computed_after_deadline": after,
        "compute_start_undetermined": undetermined,
        "send_span_s": max(last, send_end) - t0,
        "timeline": timeline,
    }


@contextlib.contextmanager
def _publisher(app: Any) -> Iterator[Any]:
    """A producer whose publishes do not wait for their confirms (one channel, confirm mode)."""
    from tasks.client.publish import confirming_producer, on_amqp

    if not on_amqp(app):
        with app.producer_or_acquire() as producer:
            yield producer
        return
    with confirming_producer(app) as (producer, pipeline):
        yield producer
        pipeline.finish()


class _Client:
    """What one client process does for each command (:func:`client_main`)."""

    def __init__(self, model: str, hosts: set[str], seed: int, trace: Path | None = None) -> None:
        from tasks import app
        from tasks.client.routes import wait_for_workers
        from tasks.ops.demo import sample_inputs
        from tasks.wire.catalog import local_catalog

        self.app, self.model, self.hosts = app, model, hosts
        self.router = app.router  # over the fleet's namespace (INFER_REGISTRY_NAMESPACE)
        wait_for_workers(self.router, hosts, READY_TIMEOUT_S)
        self.sample = sample_inputs(local_catalog(app.infer_settings).resolve(model), 1, seed)[0]
        self.consumer = getattr(app.backend, "result_consumer", None)
        if self.consumer is None:
            raise SystemExit("the overload lane reads results over the Redis backend's pub/sub")
        self.advertised: dict[str, list[float]] = {}
        self.trace = trace  # a folder: one JSON file of every request per level
        self.levels = 0

    def wait(self, timeout: float) -> None:
        """Read result messages (their callbacks fire) for at most ``timeout`` s."""
        assert self.consumer is not None
        self.consumer.drain_events(timeout=timeout)

    def warm_up(self) -> None:
        from tasks import infer

        for result in [infer.apply_async((self.model, self.sample)) for _ in range(8)]:
            result.get(timeout=60)  # connections, the workers' first requests

    def saturate(self, t0: float, t1: float, window: int) -> dict[str, Any]:
        """A closed loop of ``window`` requests in flight, no deadline; results in [t0, t1]."""
        from benchmarks.lanes.scaling import closed_loop
        from tasks import infer

        with _publisher(self.app) as producer:

            def submit() -> Any:
                return infer.apply_async((self.model, self.sample), producer=producer, retry=False)

            report = closed_loop(submit, window, t0, t1, lambda _, timeout: self.wait(timeout))
        return {k: report[k] for k in ("sent", "completed", "errors", "lost")}

    def sample_workers(self) -> None:
        """What the fleet's workers advertise now (admission control's inputs)."""
        now = time.time()
        for name, worker in self.router.registry.workers().items():
            if name in self.hosts:
                self.advertised["service_rate"].append(float(worker.service_rate))
                self.advertised["backlog"].append(float(worker.backlog))
                self.advertised["age_s"].append(round(now - float(worker.heartbeat), 3))
                self.advertised["at"].append(round(now, 3))

    def open(self, t0: float, rate: float, seconds: float, seed: int, deadline_ms: float) -> Any:
        """One level's open loop (:func:`open_loop`), each request with a deadline."""
        self.advertised = {"service_rate": [], "backlog": [], "age_s": [], "at": []}
        # A thread of its own reads the result messages, so a reply is timed when it reaches
        # this process, however busy the sending loop is; the loop itself only sleeps.
        reading = threading.Event()
        reading.set()

        def read() -> None:
            while reading.is_set():
                self.wait(POLL_S)

        reader = threading.Thread(target=read, name="overload-results", daemon=True)
        reader.start()
        try:
            return self._open(t0, rate, seconds, seed, deadline_ms)
        finally:
            reading.clear()
            reader.join(timeout=5.0)

    def _open(self, t0: float, rate: float, seconds: float, seed: int, deadline_ms: float) -> Any:
        from models.errors import InferenceError
        from tasks import infer

        records: list[dict[str, Any]] | None = [] if self.trace is not None else None
        with _publisher(self.app) as producer:

            def submit(deadline: float) -> Any:
                # Celery subscribes to the result's channel before it publishes: the
                # callback cannot miss a result stored before the subscription.
                return infer.apply_async(
                    (self.model, self.sample),
                    expires=datetime.fromtimestamp(deadline, UTC),
                    producer=producer,
                    retry=False,
                )

            report = open_loop(
                submit,
                schedule(rate, seconds, seed),
                t0,
                deadline_ms / 1000.0,
                time.sleep,
                sample=self.sample_workers,
                is_typed=lambda e: isinstance(e, InferenceError),
                records=records,
            )
        advertised = {k: v for k, v in self.advertised.items() if k != "at"}
        if self.trace is not None:
            self.levels += 1
            name = f"trace-{os.getpid()}-{self.levels}-{rate:.0f}.json"
            trace = {"t0": t0, "rate": rate, "advertised": self.advertised, "requests": records}
            (self.trace / name).write_text(json.dumps(trace))
        return {**report, "advertised": advertised}


def client_main(argv: list[str] | None = None) -> int:
    """One client process: warm up, print READY, then one JSON report per command line.

    Commands on stdin: ``SAT t0 t1 window`` (a closed-loop saturation, no
    deadline), ``OPEN t0 rate seconds seed deadline_ms`` (:func:`open_loop`);
    anything else ends it.  Each report has the client's router decisions.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lanes.overload", description="a client of the overload lane"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--hosts", required=True, help="the fleet's worker hostnames, a,b,...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, help="write every request of each level here")
    args = parser.parse_args(argv)
    # The result reader takes the GIL within 1 ms of a reply (5 ms by default): replies are
    # timed when they reach this process, not when the sending loop yields.
    sys.setswitchinterval(0.001)
    client = _Client(args.model, set(args.hosts.split(",")), args.seed, args.trace)
    client.warm_up()
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        before = client.router.stats.as_dict()
        if words[:1] == ["SAT"]:
            report = client.saturate(float(words[1]), float(words[2]), int(words[3]))
        elif words[:1] == ["OPEN"]:
            t0, rate, seconds, seed = (
                float(words[1]),
                float(words[2]),
                float(words[3]),
                int(words[4]),
            )
            report = client.open(t0, rate, seconds, seed, float(words[5]))
        else:
            break
        after = client.router.stats.as_dict()
        report["router"] = {k: after[k] - before[k] for k in ROUTER_COUNTS}
        print(json.dumps(report), flush=True)
    return 0


# ---------------------------------------------------------------------- the parent


@dataclass
class PointRound:
    """One level of one mode in one round: every client's report merged, and the CPU over it."""

    factor: float
    offered_req_s: float
    seconds: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    attempted: int = 0
    published: int = 0
    send_span_s: float = 0.0
    refused_by: dict[str, int] = field(default_factory=dict)
    failed_by: dict[str, int] = field(default_factory=dict)
    untyped: int = 0
    good_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    computed_after_deadline: int = 0
    compute_start_undetermined: int = 0
    router: dict[str, int] = field(default_factory=dict)
    advertised: dict[str, list[float]] = field(default_factory=dict)
    timeline: dict[str, list[int]] = field(default_factory=dict)  # outcome -> count by second
    cpu_s: dict[str, float] = field(default_factory=dict)  # by role, over the send window
    machine_busy_s: float = 0.0

    @property
    def goodput(self) -> float:
        return self.counts["good"] / self.seconds if self.seconds > 0 else 0.0


def merge_reports(
    factor: float,
    offered: float,
    seconds: float,
    reports: Sequence[Mapping[str, Any]],
    cpu_s: Mapping[str, float] | None = None,
    machine_busy_s: float = 0.0,
) -> PointRound:
    """The clients' reports of one level (one mode, one round), with the CPU read over it."""
    point = PointRound(factor, offered, seconds, cpu_s=dict(cpu_s or {}))
    point.machine_busy_s = machine_busy_s
    for report in reports:
        for k, v in report["counts"].items():
            point.counts[k] = point.counts.get(k, 0) + int(v)
        point.attempted += int(report["attempted"])
        point.published += int(report["published"])
        point.send_span_s = max(point.send_span_s, float(report["send_span_s"]))
        for mine, theirs in (
            (point.refused_by, report["refused_by"]),
            (point.failed_by, report["failed_by"]),
        ):
            for name, n in theirs.items():
                mine[name] = mine.get(name, 0) + int(n)
        point.untyped += int(report.get("untyped", 0))
        point.good_ms += report["good_ms"]
        point.late_ms += report["late_ms"]
        point.lag_ms += report["lag_ms"]
        point.computed_after_deadline += int(report["computed_after_deadline"])
        point.compute_start_undetermined += int(report["compute_start_undetermined"])
        for key, n in (report.get("router") or {}).items():
            point.router[key] = point.router.get(key, 0) + int(n)
        for key, values in (report.get("advertised") or {}).items():
            point.advertised.setdefault(key, []).extend(values)
        _add(point.timeline, report.get("timeline") or {})
    return point


def _add(into: dict[str, list[int]], counts: Mapping[str, Sequence[int]]) -> None:
    """Add ``counts`` (outcome -> count by second) into ``into``, element by element."""
    for key, values in counts.items():
        mine = into.setdefault(key, [])
        mine.extend([0] * (len(values) - len(mine)))
        for i, n in enumerate(values):
            mine[i] += int(n)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def _pct(values: Sequence[float]) -> dict[str, float] | None:
    return percentiles(values) if len(values) >= 2 else None


def summarise_point(rounds: Sequence[PointRound]) -> dict[str, Any]:
    """One level of one mode over the rounds: rates median of rounds; counts, fractions,
    latencies and what the workers advertised pooled over them."""
    first = rounds[0]
    counts = {k: sum(r.counts.get(k, 0) for r in rounds) for k in OUTCOMES}
    attempted = sum(r.attempted for r in rounds)
    scheduled = sum(counts.values())  # attempted + unsent

    def frac(key: str) -> float | None:
        return round(counts[key] / scheduled, 4) if scheduled else None

    def med(values: Sequence[float]) -> float:
        return round(statistics.median(values), 3)

    roles = sorted({k for r in rounds for k in r.cpu_s})
    busy = {role: med([r.cpu_s.get(role, 0.0) / r.seconds for r in rounds]) for role in roles}
    if roles:
        busy["total"] = med([sum(r.cpu_s.values()) / r.seconds for r in rounds])
    lag = [ms for r in rounds for ms in r.lag_ms]
    return {
        "factor": first.factor,
        "offered_req_s": round(first.offered_req_s, 3),
        "attempted_per_s": med([r.attempted / max(r.send_span_s, r.seconds) for r in rounds]),
        "published_per_s": med([r.published / max(r.send_span_s, r.seconds) for r in rounds]),
        "goodput_req_s": med([r.goodput for r in rounds]),
        "served_req_s": med([(r.counts["good"] + r.counts["late"]) / r.seconds for r in rounds]),
        "fractions": {k: frac(k) for k in OUTCOMES},
        "counts": {"scheduled": scheduled, "attempted": attempted, **counts},
        "refused_by": _merged([r.refused_by for r in rounds]),
        "failed_by": _merged([r.failed_by for r in rounds]),
        "untyped_refusals": sum(r.untyped for r in rounds),
        "latency_ms": _pct([ms for r in rounds for ms in r.good_ms]),
        "late_by_ms": _pct([ms for r in rounds for ms in r.late_ms]),
        "lag_ms": {**(_pct(lag) or {}), "max": max(lag)} if lag else None,
        "computed_after_deadline": sum(r.computed_after_deadline for r in rounds),
        "compute_start_undetermined": sum(r.compute_start_undetermined for r in rounds),
        "router": _merged([r.router for r in rounds]),
        "advertised": {
            "service_rate": _spread(
                [v for r in rounds for v in r.advertised.get("service_rate", [])]
            ),
            "backlog": _spread([v for r in rounds for v in r.advertised.get("backlog", [])]),
            "heartbeat_age_s": _spread([v for r in rounds for v in r.advertised.get("age_s", [])]),
        },
        "timeline": _timeline(rounds),
        "cores_busy": busy,
        "machine_busy": med([r.machine_busy_s / r.seconds for r in rounds]),
        "per_round": {
            "goodput_req_s": [round(r.goodput, 3) for r in rounds],
            "attempted_per_s": [
                round(r.attempted / max(r.send_span_s, r.seconds), 3) for r in rounds
            ],
        },
    }


def _timeline(rounds: Sequence[PointRound]) -> dict[str, list[int]]:
    """Each outcome's count by the second of its send, summed over the rounds."""
    out: dict[str, list[int]] = {}
    for r in rounds:
        _add(out, r.timeline)
    return out


def _merged(dicts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def goodput_ratio(
    points: Sequence[Mapping[str, Any]], high: float = 4.0, low: float = 1.0
) -> float | None:
    """Goodput at factor ``high`` over goodput at factor ``low`` (None where either is missing)."""
    by = {float(p["factor"]): p.get("goodput_req_s") for p in points}
    return ratio(by.get(high), by.get(low))


class _Fleet(ClientFleet):
    """One mode's fleet: batching workers in a namespace and class queue of their own, and the
    client processes (``INFER_ADMISSION`` on or off) that load them."""

    def __init__(self, ctx: LaneContext, mode: str, options: Options) -> None:
        self.mode, self.options = mode, options
        tag = "on" if mode == "admission" else "off"
        queue = f"bench-overload-{tag}-{ctx.run}"  # the class queue; the registry namespace
        env = dict(
            os.environ,
            INFER_REGISTRY_NAMESPACE=queue,
            INFER_BATCHING="true",
            INFER_METRICS_PORT="0",  # nothing scrapes them; two fleets would share one port
            INFER_ADMISSION="true" if mode == "admission" else "false",
        )
        workers = [
            WorkerProcess(
                name,
                options.device,
                logdir=ctx.logdir,
                queues=[direct_queue(queue, name), queue],
                preload=(options.model,),
                batching=True,
                env=env,
            )
            for name in (f"bench-ov{tag}{i}-{ctx.run}" for i in range(options.workers))
        ]
        super().__init__(ctx, "overload", queue, env, workers)

    def start_clients(self) -> None:
        for w in self.workers:
            w.wait_ready(READY_TIMEOUT_S)
        argv = ["benchmarks.lanes.overload", "--model", self.options.model]
        argv += ["--hosts", ",".join(w.hostname for w in self.workers)]
        if self.options.trace is not None:
            self.options.trace.mkdir(parents=True, exist_ok=True)
            argv += ["--trace", str(self.options.trace)]
        self.spawn(argv, self.options.clients, lambda i: f"overload-client-{self.mode}-{i}.log")

    def capacity(self, window: int) -> float:
        """Req/s of a closed-loop saturation, ``window`` in flight in all, no deadline."""
        opts = self.options
        t0 = time.time() + 0.5 + opts.warm_s
        t1 = t0 + opts.capacity_s
        per_client = max(1, -(-window // len(self.clients)))
        self.send([f"SAT {t0!r} {t1!r} {per_client}"] * len(self.clients))
        reports = self.reports(t1 + 150.0, "capacity")
        return sum(int(r["completed"]) for r in reports) / (t1 - t0)

    def level(self, factor: float, capacity: float, seed: int) -> PointRound:
        """One level's open loop through the clients; CPU read over its send window."""
        opts, n = self.options, len(self.clients)
        rate = factor * capacity
        t0 = time.time() + 0.5
        self.send(
            [
                f"OPEN {t0!r} {rate / n!r} {opts.seconds!r} {seed + i} {opts.deadline_ms!r}"
                for i in range(n)
            ]
        )
        cpu_s, machine = self.cpu_over(t0, t0 + opts.seconds)
        reports = self.reports(time.time() + LAG_LIMIT_S + DRAIN_S + 60.0, "report")
        return merge_reports(factor, rate, opts.seconds, reports, cpu_s, machine)


class OverloadLane(Lane):
    """Two identical batching fleets, admission on and off: their capacity, then each level."""

    name = "overload"

    def __init__(self, ctx: LaneContext, options: Options = Options()) -> None:
        super().__init__(ctx)
        self.options = options
        self.fleets = {mode: _Fleet(ctx, mode, options) for mode in MODES}
        self.window = options.in_flight
        self.capacity: list[dict[str, float]] = []  # per round: per mode
        self.rounds: list[dict[str, list[PointRound]]] = []
        self.rss: dict[str, tuple[float | None, float | None]] = {}

    def start(self) -> None:
        for fleet in self.fleets.values():
            fleet.start()

    def setup(self) -> None:
        for fleet in self.fleets.values():
            fleet.start_clients()
        for fleet in self.fleets.values():
            fleet.wait_clients()
        if not self.window:
            from tasks.wire.catalog import local_catalog

            settings = self.ctx.settings
            spec = local_catalog(settings).resolve(self.options.model)
            max_batch = spec.max_batch_size or settings.max_batch_size
            self.window = saturation_window(self.options.workers, max_batch, settings.batch_reserve)

    def settle(self) -> None:
        """Until a heartbeat after every result: the next level starts from a drained fleet."""
        time.sleep(self.ctx.settings.heartbeat_s + 0.5)

    def offered_capacity(self) -> float:
        """The capacity the levels offer multiples of: the first round's, both fleets' mean."""
        first = self.capacity[0]
        return statistics.fmean(first.values())

    def run_round(self, cfg: RoundConfig) -> None:
        """Both fleets' capacity, then each level on both (which goes first alternates)."""
        r = len(self.rounds)
        order = MODES if r % 2 == 0 else MODES[::-1]
        self.capacity.append({mode: self.fleets[mode].capacity(self.window) for mode in order})
        capacity = self.offered_capacity()
        figures = ", ".join(f"{m} {v:,.1f}" for m, v in self.capacity[-1].items())
        print(f"overload: round {r + 1}, capacity {figures} req/s", file=sys.stderr, flush=True)
        self.settle()
        points: dict[str, list[PointRound]] = {m: [] for m in MODES}
        for index, factor in enumerate(self.options.levels):
            for mode in order if index % 2 == 0 else order[::-1]:
                point = self.fleets[mode].level(factor, capacity, 1000 * r + 10 * index)
                points[mode].append(point)
                c = point.counts
                print(
                    f"overload: round {r + 1}, {factor:g}x ({point.offered_req_s:,.0f} req/s), "
                    f"{mode}: goodput {point.goodput:,.1f} req/s; attempted {point.attempted}, "
                    f"good {c['good']}, late {c['late']}, expired {c['expired']}, "
                    f"refused {c['refused']}, failed {c['failed']}, lost {c['lost']}, "
                    f"unsent {c['unsent']}",
                    file=sys.stderr,
                    flush=True,
                )
                self.settle()
        self.rounds.append(points)

    def rss_mb(self) -> float | None:
        self.rss = {mode: fleet.rss() for mode, fleet in self.fleets.items()}
        return max((w for w, _ in self.rss.values() if w is not None), default=None)

    def client_rss_mb(self) -> float | None:
        return max((c for _, c in self.rss.values() if c is not None), default=None)

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        settings = self.ctx.settings
        modes: dict[str, Any] = {}
        for mode in MODES:
            points = [
                summarise_point([r[mode][i] for r in self.rounds])
                for i in range(len(self.options.levels))
                if self.rounds
            ]
            modes[mode] = {"points": points}
        per_round: dict[str, list[Any]] = {
            f"capacity_req_s.{m}": [round(c[m], 3) for c in self.capacity] for m in MODES
        }
        for mode in MODES:
            per_round[f"goodput_4x_vs_1x.{mode}"] = [
                ratio(_at(r[mode], 4.0), _at(r[mode], 1.0)) for r in self.rounds
            ]
        all_points = [p for m in modes.values() for p in m["points"]]
        return {
            "model": self.options.model,
            "device": self.options.device,
            "workers": self.options.workers,
            "clients": self.options.clients,
            "levels": list(self.options.levels),
            "seconds": self.options.seconds,
            "deadline_ms": self.options.deadline_ms,
            "rounds": len(self.rounds),
            "capacity_req_s": round(self.offered_capacity(), 3) if self.capacity else None,
            "capacity_figures": (
                {m: round(v, 3) for m, v in self.capacity[0].items()} if self.capacity else {}
            ),
            "capacity_window": self.window,
            "capacity_s": self.options.capacity_s,
            "settings": {
                "admission_margin": settings.admission_margin,
                "heartbeat_s": settings.heartbeat_s,
                "service_rate_window_s": settings.service_rate_window_s,
                "max_queue_length": settings.max_queue_length,
                "batch_reserve": settings.batch_reserve,
                "max_wait_ms": settings.max_wait_ms,
            },
            "cores": cores(),
            "worker_rss_mb": worker_rss_mb,
            "modes": modes,
            "goodput_4x_vs_1x": {m: goodput_ratio(modes[m]["points"]) for m in MODES},
            "computed_after_deadline": sum(p["computed_after_deadline"] for p in all_points),
            "untyped_refusals": sum(p["untyped_refusals"] for p in all_points),
            "per_round": per_round,
        }

    def close(self) -> None:
        for fleet in self.fleets.values():
            try:
                fleet.close()
            except Exception as exc:  # the other fleet still stops
                print(f"overload: closing the {fleet.mode} fleet failed: {exc}", file=sys.stderr)


def _at(points: Sequence[PointRound], factor: float) -> float | None:
    return next((p.goodput for p in points if p.factor == factor), None)


def results_file(
    summary: dict[str, Any],
    options: Options,
    machine: dict[str, Any],
    client_rss: float | None,
    date: str | None = None,
) -> dict[str, Any]:
    """The results file of a run of this lane alone (the contract in DESIGN.md)."""
    from benchmarks.ratios import ratios

    lanes = {"overload": summary}
    return {
        "schema": 1,
        "date": date or time.strftime("%Y-%m-%d"),
        "machine": machine,
        "plan": {
            "lane": "overload",
            "rounds": options.rounds,
            "levels": list(options.levels),
            "seconds": options.seconds,
            "deadline_ms": options.deadline_ms,
            "model": options.model,
            "device": options.device,
            "workers": options.workers,
            "clients": options.clients,
            "capacity_s": options.capacity_s,
            "warm_s": options.warm_s,
            "quick": options.quick,
        },
        "lanes": lanes,
        "ratios": ratios(lanes),
        "memory_mb": {"client_rss": client_rss, "overload_worker_rss": summary["worker_rss_mb"]},
    }


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path]:
    """The lane's command line: its :class:`Options` and the results file's path."""
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks overload", description=(__doc__ or "").split("\n\n")[1]
    )
    parser.add_argument("--quick", action="store_true", help="3 s levels, a short capacity run")
    parser.add_argument(
        "--levels", type=parse_levels, default=defaults.levels, help="e.g. 0.5,1,2,4"
    )
    parser.add_argument("--seconds", type=float, help="each level's open loop, s (20; quick: 3)")
    parser.add_argument("--deadline-ms", type=float, default=defaults.deadline_ms)
    parser.add_argument("--model", default=defaults.model, help="the model every request asks for")
    parser.add_argument("--device", default=defaults.device, help="the workers' device")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="batching workers")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="processes per mode")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--capacity-seconds", type=float, help="the capacity run's window, s")
    parser.add_argument(
        "--in-flight", type=int, default=0, help="the capacity run's window (0: auto)"
    )
    parser.add_argument("--json", type=Path, default=Path("var/bench/overload.json"))
    parser.add_argument("--trace", type=Path, help="a folder: every request of each level, JSON")
    args = parser.parse_args(argv)
    if min(args.workers, args.clients, args.rounds) < 1 or args.in_flight < 0:
        parser.error("--workers, --clients and --rounds need 1 or more, --in-flight 0 or more")
    if (args.seconds is not None and args.seconds <= 0) or args.deadline_ms <= 0:
        parser.error("--seconds and --deadline-ms need more than 0")
    if args.capacity_seconds is not None and args.capacity_seconds <= 0:
        parser.error("--capacity-seconds needs more than 0")
    base = Options.quick_plan() if args.quick else defaults
    options = replace(
        base,
        levels=args.levels,
        seconds=args.seconds or base.seconds,
        deadline_ms=args.deadline_ms,
        model=args.model,
        device=args.device,
        workers=args.workers,
        clients=args.clients,
        rounds=args.rounds,
        capacity_s=args.capacity_seconds or base.capacity_s,
        in_flight=args.in_flight,
        trace=args.trace,
    )
    return options, args.json


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks overload [--quick] [--seconds 20] ... --json PATH``."""
    options, path = parse_args(argv)
    from benchmarks.plots import overload_plot

    summary = run_alone("overload", options, path, OverloadLane, results_file, overload_plot)
    points = [p for m in summary["modes"].values() for p in m["points"]]
    bad = summary["computed_after_deadline"] or summary["untyped_refusals"]
    return 1 if bad or any(p["counts"]["lost"] for p in points) else 0


if __name__ == "__main__":  # a client process (the lane itself: python -m benchmarks overload)
    sys.exit(client_main())
