"""Admission control: refuse at submit a request that cannot be served before its deadline.

Pure Python (no torch, no celery).  Each worker's heartbeat advertises its
measured **service rate** (requests it completes per second while it has
work, over ``INFER_SERVICE_RATE_WINDOW_S``) and its **backlog** (requests
waiting or running in it, ready in its direct queue, and its share of its
class queue).  The router asks :meth:`Admission.expected_wait` for the
worker it picked:

    pending  = backlog at the heartbeat
             + requests this client routed to it since that heartbeat
             - service_rate x seconds since that heartbeat          (at least 0)
    wait     = pending / service_rate + max(batch_s, 1 / service_rate)

where ``batch_s`` is the worker's recent batch service time: once its batch
starts, a request waits for the whole batch, not 1/rate of it.  The estimate
is of the time until the reply, not until the request starts.

and refuses (:class:`~models.errors.Overloaded`, nothing published) when
``wait x (1 + margin)`` exceeds the time left before the deadline, unless
another capable worker's wait fits (the request goes there instead).  The
margin (``INFER_ADMISSION_MARGIN``, 0.25) covers a batch's own duration and
the heartbeat's staleness.  A worker that has not measured its rate yet (no
work done since it started) is admitted: no data is not evidence of overload.

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
from dataclasses import dataclass
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


class Admission:
    """Per-client expected-wait bookkeeping (thread-safe)."""

    def __init__(
        self, margin: float = 0.25, enabled: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.margin = margin
        self.enabled = enabled
        self.clock = clock
        self._sent: dict[str, deque[float]] = {}  # worker -> wall times this client routed to it
        self._lock = threading.Lock()
        self.refused = 0

    def _since(self, worker: WorkerCapabilities) -> int:
        """Requests this client routed to ``worker`` after its record's heartbeat (pruned)."""
        sent = self._sent.get(worker.name)
        if not sent:
            return 0
        while sent and sent[0] <= worker.heartbeat:
            sent.popleft()
        return len(sent)

    def expected_wait(self, worker: WorkerCapabilities, now: float | None = None) -> Estimate:
        now = self.clock() if now is None else now
        with self._lock:
            since = self._since(worker)
        rate = max(0.0, float(worker.service_rate))
        drained = rate * max(0.0, now - worker.heartbeat) if worker.heartbeat else 0.0
        pending = max(0.0, worker.backlog + since - drained)
        if rate <= 0.0:
            return Estimate(worker.name, 0.0 if pending == 0 else None, pending, 0.0)
        own = max(float(worker.batch_s), 1.0 / rate)  # its own batch, or its share of one
        return Estimate(worker.name, pending / rate + own, pending, rate)

    def routed(self, worker: str, now: float | None = None) -> None:
        """Count one request routed to ``worker`` (until that worker's next heartbeat)."""
        with self._lock:
            self._sent.setdefault(worker, deque()).append(self.clock() if now is None else now)

    def forget(self, worker: str) -> None:
        with self._lock:
            self._sent.pop(worker, None)

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
        first = self.expected_wait(chosen, now)
        if first.fits(left, self.margin):
            return chosen
        estimates = [first] + [self.expected_wait(w, now) for w in others if w.name != chosen.name]
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
