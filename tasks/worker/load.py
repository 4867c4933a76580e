"""This worker's measured load, shared between its consumer and the process that beats.

The consumer (the worker's main process) sees requests arrive, wait for a
batch, finish, or get dropped past their deadline; the capability heartbeat
and ``/metrics`` run in the process that owns the device (the prefork
child).  So the consumer's figures go through values made before the pool
forks (``multiprocessing`` shared memory, no lock needed for single words):

- the **service rate** (:class:`ServiceMeter`): what the worker *can* do,
  not what it was offered, over the last ``INFER_SERVICE_RATE_WINDOW_S``.  A
  batching worker divides the requests its pool jobs completed by those
  jobs' service time (from the later of a job's dispatch and the previous
  job's end, to its result), counting only **saturated** jobs (batches that
  left full, or with more requests waiting behind them) when the window
  holds any: a half-fed worker's small batches are slower per request
  (``minilm`` on one core: 61 req/s in batches of one, 215 in batches of
  64), and advertising that rate made admission control refuse more, which
  fed the worker less (a spiral the overload lane showed: 101 req/s
  advertised at 4x a capacity of 179).  Without a saturated job in the
  window, the larger of all jobs' rate and the last saturated rate stands.
  Otherwise (no batching), requests completed per second of time the
  worker had work.  With nothing completed in the window, the last measured
  rate stands (an idle worker is not an unknown one);
- the **batch time**: a running average of one pool job's service time,
  the time a request spends in its own batch once that batch starts;
- the requests **outstanding** here (waiting in a batch or running);
- each consumed queue's **head**: the queue wait of the latest message taken
  from it, and when (the queue exporter bounds the oldest message's age with it);
- the requests **dropped past their deadline** in the consumer, per model,
  which the serving process adds to ``infer_requests_total`` at each scrape.

A worker that does not batch (no consumer strategy of ours) measures in the
serving process instead, from ``task_prerun``/``task_postrun``.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["OTHER_MODEL", "ServiceMeter", "SharedLoad", "init", "observe_head", "shared"]

OTHER_MODEL = (
    "unknown"  # the label of a model the worker did not serve when it started (as metrics)
)


class ServiceMeter:
    """Requests completed per busy second over a sliding window (thread-safe)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.outstanding = 0
        self._busy_since: float | None = None
        self._busy: deque[tuple[float, float]] = deque()  # closed busy intervals (start, end)
        self._done: deque[tuple[float, int]] = deque()  # (when, requests completed)
        # (when, completed, service s, saturated)
        self._jobs: deque[tuple[float, int, float, bool]] = deque()
        self._last = 0.0  # the last rate measured: it stands while the window is empty
        self._last_saturated = 0.0  # the last rate of saturated jobs
        self.batch_s = 0.0  # running average of one pool job's service time
        self._lock = threading.Lock()

    def served(self, completed: int, seconds: float, saturated: bool = False) -> None:
        """One pool job finished: ``completed`` requests served in ``seconds`` of service.

        ``saturated``: the batch left full, or with requests waiting behind it.
        """
        with self._lock:
            now = self.clock()
            self._prune(now)
            self._jobs.append((now, completed, max(0.0, seconds), saturated))
            self.batch_s = seconds if not self.batch_s else 0.7 * self.batch_s + 0.3 * seconds

    def arrived(self, n: int = 1) -> None:
        with self._lock:
            if self.outstanding == 0:
                self._busy_since = self.clock()
            self.outstanding += n

    def _prune(self, now: float) -> None:
        """Forget what slid out of the window (the lock held)."""
        start = now - self.window_s
        while self._done and self._done[0][0] < start:
            self._done.popleft()
        while self._busy and self._busy[0][1] < start:
            self._busy.popleft()
        while self._jobs and self._jobs[0][0] < start:
            self._jobs.popleft()

    def left(self, n: int, completed: int | None = None) -> None:
        """``n`` requests left the worker, ``completed`` of them served (default: all)."""
        with self._lock:
            now = self.clock()
            self._prune(now)  # bounded even when no one asks for the rate
            done = n if completed is None else completed
            if done:
                self._done.append((now, done))
            self.outstanding = max(0, self.outstanding - n)
            if self.outstanding == 0 and self._busy_since is not None:
                self._busy.append((self._busy_since, now))
                self._busy_since = None

    def rate(self) -> float:
        """Requests per second of service (pool jobs if any were recorded, else busy time).

        The last measured rate while the window holds no completion; 0.0 before any.
        """
        with self._lock:
            now = self.clock()
            start = now - self.window_s
            self._prune(now)
            if self._jobs:
                return self._job_rate()
            busy = sum(end - max(begin, start) for begin, end in self._busy)
            if self._busy_since is not None:
                busy += now - max(self._busy_since, start)
            done = sum(n for _, n in self._done)
            if done > 0 and busy > 0.0:
                self._last = done / busy
            return self._last

    def _job_rate(self) -> float:
        """The pool jobs' rate: saturated ones' if the window holds any (the lock held)."""
        full = [(n, s) for _, n, s, saturated in self._jobs if saturated]
        jobs = full or [(n, s) for _, n, s, _ in self._jobs]
        done, busy = sum(n for n, _ in jobs), sum(s for _, s in jobs)
        if done > 0 and busy > 0.0:
            if full:
                self._last = self._last_saturated = done / busy
            else:  # a half-fed worker: its full batches would do at least as well as last time
                self._last = max(done / busy, self._last_saturated)
        return self._last


class SharedLoad:
    """The consumer's figures, readable by the forked serving process."""

    def __init__(self, models: list[str], queues: list[str]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.models = [*models, OTHER_MODEL]
        self.queues = list(queues)
        self._rate = ctx.Value("d", 0.0, lock=False)
        self._batch_s = ctx.Value("d", 0.0, lock=False)
        self._outstanding = ctx.Value("q", 0, lock=False)
        self._from_consumer = ctx.Value("b", 0, lock=False)
        self._heads = ctx.Array("d", [math.nan] * (2 * len(self.queues)), lock=False)
        self._expired = ctx.Array("q", len(self.models), lock=True)

    # -- written by whoever measures -----------------------------------------------------------
    def publish(self, meter: ServiceMeter, from_consumer: bool) -> None:
        """Store ``meter``'s figures (the consumer's win over the serving process's)."""
        if from_consumer:
            self._from_consumer.value = 1
        elif self._from_consumer.value:
            return
        self._rate.value = meter.rate()
        self._batch_s.value = meter.batch_s
        self._outstanding.value = meter.outstanding

    def head(self, queue: str, wait_s: float, at: float) -> None:
        if queue in self.queues:
            i = 2 * self.queues.index(queue)
            self._heads[i], self._heads[i + 1] = wait_s, at

    def expired(self, model: str) -> None:
        """Count one request dropped past its deadline in the consumer."""
        index = self.models.index(model) if model in self.models else len(self.models) - 1
        with self._expired.get_lock():
            self._expired[index] += 1

    # -- read by the heartbeat and the metrics -------------------------------------------------
    @property
    def rate(self) -> float:
        return float(self._rate.value)

    @property
    def batch_s(self) -> float:
        return float(self._batch_s.value)

    @property
    def outstanding(self) -> int | None:
        """Requests waiting or running here, as the consumer counts them; None if it does not."""
        return int(self._outstanding.value) if self._from_consumer.value else None

    def heads(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for i, queue in enumerate(self.queues):
            wait, at = self._heads[2 * i], self._heads[2 * i + 1]
            if not math.isnan(wait):
                found[queue] = [round(wait, 4), at]
        return found

    def expired_counts(self) -> dict[str, int]:
        with self._expired.get_lock():
            counts = [int(self._expired[i]) for i in range(len(self.models))]
        return {m: n for m, n in zip(self.models, counts, strict=True) if n}


_shared: SharedLoad | None = None


def init(models: list[str], queues: list[str]) -> SharedLoad:
    """Make the shared values (in the main process, before the pool forks)."""
    global _shared
    _shared = SharedLoad(models, queues)
    return _shared


def shared() -> SharedLoad | None:
    """The shared values, if this worker made them (None in a client, or a test process)."""
    return _shared


def observe_head(queue: Any, sent_at: Any, now: float) -> None:
    """Record the queue wait of a message just taken from ``queue`` (stamped ``sent_at``)."""
    if _shared is None or not isinstance(queue, str):
        return
    if isinstance(sent_at, int | float) and not isinstance(sent_at, bool) and sent_at > 0:
        _shared.head(queue, max(0.0, now - float(sent_at)), now)
