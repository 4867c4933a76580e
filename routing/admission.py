"""Admission control: refuse at submit a request that cannot be served before its deadline.

Pure Python (no torch, no celery).  Each worker's heartbeat advertises its
measured **service rate** (requests it completes per second while it has
work, over ``INFER_SERVICE_RATE_WINDOW_S``) and its **backlog** (requests
waiting or running in it, ready in its direct queue, and its share of its
class queue).  The router asks :meth:`Admission.expected_wait` for the
worker it picked:

    pending  = the backlog at the heartbeat, drained at service_rate since,
               plus each request this client routed to it since, drained from
               when it was sent (a queue that never goes below 0)
    wait     = pending / service_rate + max(own batch, 1 / service_rate)
    own batch = min(batch_s, INFER_BATCH_DEADLINE_SHARE x time left)

where ``batch_s`` is the worker's recent batch service time: once its batch
starts, a request waits for the whole batch, not 1/rate of it.  A request
with a deadline joins only a batch that fits its share of it (the worker
caps batches by ``INFER_BATCH_DEADLINE_SHARE``), so its own batch is at most
that share of its time left, however long the worker's last batches took
(batches of requests without a deadline can be longer: counting those made
a worker that had just served them refuse every request with a deadline, and
with nothing admitted its figures never changed).  The estimate is of the
time until the reply, not until the request starts.  The drain
runs only while something is pending: an idle worker whose heartbeat is 2 s
old has not "drained" 2 s of requests routed to it in the last millisecond
(an earlier estimate, backlog + sent - rate x age, admitted a burst of 366
requests that way at the start of the overload lane's 4x level, and most of
them expired).

and refuses (:class:`~models.errors.Overloaded`, nothing published) when
``wait x (1 + margin)`` exceeds the time left before the deadline, unless
another capable worker's wait fits (the request goes there instead).  The
margin (``INFER_ADMISSION_MARGIN``, 0.5) covers the error of the reckoning
between heartbeats: the worker's real rate moves around its advertised one
(under the overload lane's 4x load on two cores, by 15%, as the load
generator takes CPU from the worker), and an admitted request is exactly as
late as the reckoning was wrong.  With 0.25, 7% of the requests at 4x were
late or expired and goodput was 0.71 of 1x's; with 0.5, 1.7% and 0.82 (same
machine, one round each).  It costs no throughput while the wait it allows
still holds a batch or two ahead of the forward pass.  A worker that has not
measured its rate yet (no work done since it started) is admitted: no data is
not evidence of overload.

What it does not see: requests routed by *other* clients since the last
heartbeat (each client counts only its own; the next beat, every
``INFER_HEARTBEAT_S``, shows everyone's).  A request without a deadline is
never refused here; the class queue's ``x-max-length`` bounds those.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from models.errors import Overloaded
from routing.capabilities import WorkerCapabilities

__all__ = ["DEADLINE_HEADER", "Admission", "Estimate", "deadline_of"]

# The message header carrying a request's deadline; the client makes it an absolute ISO 8601
# time before routing (tasks.wire.deadline).  Celery takes expires= out of the options the
# router sees, so the router reads this header.
DEADLINE_HEADER = "deadline"


def deadline_of(options: Mapping[str, Any]) -> float | None:
    """The absolute deadline (wall-clock seconds) in ``options``' headers, else None."""
    value = (options.get("headers") or {}).get(DEADLINE_HEADER)
    if not isinstance(value, str):
        return None  # none, or not yet made absolute (a client that is not ours)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Estimate:
    """One worker's expected wait for a new request, and what it was computed from."""

    worker: str
    wait_s: float | None  # None: the worker has not measured its service rate yet
    pending: float
    rate: float

    def fits(self, left_s: float, margin: float) -> bool:
        return self.wait_s is None or self.wait_s * (1.0 + margin) <= left_s


@dataclass
class _Reckoning:
    """One worker's pending requests as this client reckons them since its record's heartbeat."""

    heartbeat: float  # the record it starts from: its beat, rate and backlog
    rate: float
    backlog: float
    level: float  # requests pending at ``at``
    at: float
    sent: deque[float] = field(default_factory=deque)  # what this client routed there since

    def at_time(self, now: float) -> float:
        return max(0.0, self.level - self.rate * max(0.0, now - self.at))

    def add(self, now: float) -> None:
        """One more request routed to it at ``now``."""
        if now <= self.heartbeat:
            return  # already in the record's backlog
        self.sent.append(now)
        self.level = self.at_time(now) + 1.0
        self.at = max(self.at, now)


class Admission:
    """Per-client expected-wait bookkeeping (thread-safe)."""

    def __init__(
        self,
        margin: float = 0.5,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        batch_share: float = 1.0,
    ) -> None:
        self.margin = margin
        self.enabled = enabled
        self.batch_share = batch_share  # a request's own batch: at most this share of its time left
        self.clock = clock
        self._reckonings: dict[str, _Reckoning] = {}  # worker -> its pending, as reckoned here
        self._lock = threading.Lock()
        self.refused = 0

    def _reckoning(self, worker: WorkerCapabilities, now: float) -> _Reckoning:
        """``worker``'s reckoning, started again from each new record (the lock held)."""
        r = self._reckonings.get(worker.name)
        beat = float(worker.heartbeat) if worker.heartbeat else now
        rate, backlog = max(0.0, float(worker.service_rate)), float(worker.backlog)
        if r is not None and (r.heartbeat, r.rate, r.backlog) == (beat, rate, backlog):
            return r
        # A new record: its backlog, then this client's sends after its beat, replayed in order.
        fresh = _Reckoning(beat, rate, backlog, backlog, beat)
        for sent in r.sent if r is not None else ():
            fresh.add(sent)
        self._reckonings[worker.name] = fresh
        return fresh

    def expected_wait(
        self, worker: WorkerCapabilities, now: float | None = None, left: float | None = None
    ) -> Estimate:
        """``worker``'s expected wait for a new request with ``left`` seconds to its deadline."""
        now = self.clock() if now is None else now
        with self._lock:
            pending = self._reckoning(worker, now).at_time(now)
        rate = max(0.0, float(worker.service_rate))
        if rate <= 0.0:
            return Estimate(worker.name, 0.0 if pending == 0 else None, pending, 0.0)
        batch = float(worker.batch_s)
        if left is not None:
            batch = min(batch, self.batch_share * max(0.0, left))
        own = max(batch, 1.0 / rate)  # its own batch, or its share of one
        return Estimate(worker.name, pending / rate + own, pending, rate)

    def routed(self, worker: WorkerCapabilities, now: float | None = None) -> None:
        """Count one request routed to ``worker`` (until that worker's next heartbeat)."""
        now = self.clock() if now is None else now
        with self._lock:
            self._reckoning(worker, now).add(now)

    def forget(self, worker: str) -> None:
        with self._lock:
            self._reckonings.pop(worker, None)

    def choose(
        self,
        chosen: WorkerCapabilities,
        others: list[WorkerCapabilities],
        deadline: float,
    ) -> WorkerCapabilities:
        """``chosen`` if its wait fits the deadline, else the capable worker whose wait fits best.

        Raises :class:`~models.errors.Overloaded` when none fits, naming the
        smallest expected wait and the time left.
        """
        now = self.clock()
        left = deadline - now
        first = self.expected_wait(chosen, now, left)
        if first.fits(left, self.margin):
            return chosen
        estimates = [first] + [
            self.expected_wait(w, now, left) for w in others if w.name != chosen.name
        ]
        by_name = {w.name: w for w in [chosen, *others]}
        fitting = [e for e in estimates if e.fits(left, self.margin)]
        if fitting:
            best = min(fitting, key=lambda e: -1.0 if e.wait_s is None else e.wait_s)
            return by_name[best.worker]
        with self._lock:
            self.refused += 1
        best = min(estimates, key=lambda e: e.wait_s or 0.0)
        raise Overloaded(
            f"expected wait {best.wait_s or 0.0:.3f} s on the least loaded capable worker "
            f"({best.worker}: about {best.pending:.0f} requests ahead at {best.rate:.1f} req/s), "
            f"with a {self.margin:.0%} safety margin, exceeds the {max(0.0, left) * 1000:.0f} ms "
            "left before the request's deadline: nothing was published. Retry later, give it a "
            "longer deadline, or add workers (INFER_ADMISSION=false turns this check off)"
        )
