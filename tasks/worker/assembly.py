"""Batch assembly in the worker's main process: pure and clock-driven, no threads, no I/O.

Requests wait here, grouped by batch key, until the batching strategy
(:mod:`tasks.worker.strategy`) takes them as batches for the pool.  A key's
requests are **due** when

- they fill the key's ``max_batch_size`` (counted in samples), or
- the oldest has waited the key's ``max_wait_ms``, or
- no batch is in flight at all: a lone request is never held for the timeout.

A request may also bring a **limit** of its own: the most samples it can
wait in a batch with and still meet its deadline (the batching strategy
derives it from the request's deadline budget and the key's measured time per
sample).  A key's cap is the smallest of its policy's ``max_batch_size`` and
its waiting requests' limits: a key is full, and is cut, there.

Only as many batches are taken as the pool has free processes: while the
pool child computes, requests keep joining their batch, so a busy worker
forms full batches and an idle one answers at once.  The oldest due batch
goes first.  A request added ``alone`` (a redelivered message) gets a key of
its own and a cap of one request.

The clock is injected: the unit tests drive time by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["ALONE", "BatchAssembler", "BatchPolicy", "Waiting"]

T = TypeVar("T")
ALONE = "alone"  # the first element of the key of a request queued alone: (ALONE, n)
_EPSILON_MS = 1e-6  # float rounding: a timer armed for the max wait finds its key due


@dataclass(frozen=True)
class BatchPolicy:
    """A key's limits: samples per batch, and how long its oldest request may wait."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0


@dataclass
class Waiting(Generic[T]):
    item: T
    samples: int
    since: float
    limit: int | None = None  # the most samples this request's batch may hold (None: no limit)


@dataclass
class _Queue(Generic[T]):
    policy: BatchPolicy
    items: list[Waiting[T]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(w.samples for w in self.items)

    @property
    def cap(self) -> int:
        """Samples per batch: the policy's, or a waiting request's own limit if smaller."""
        limits = [w.limit for w in self.items if w.limit is not None]
        return min(self.policy.max_batch_size, *limits) if limits else self.policy.max_batch_size


class BatchAssembler(Generic[T]):
    """Waiting requests by key; :meth:`take` pops the batches due now."""

    def __init__(self, policy: Callable[[Hashable], BatchPolicy]) -> None:
        self._policy = policy
        self._queues: dict[Hashable, _Queue[T]] = {}
        self._alone = itertools.count()

    def __len__(self) -> int:
        return sum(len(q.items) for q in self._queues.values())

    def add(
        self,
        key: Hashable,
        item: T,
        now: float,
        samples: int = 1,
        alone: bool = False,
        limit: int | None = None,
    ) -> None:
        """Queue ``item`` (``samples`` samples) under ``key``; ``alone``: a batch of its own.

        ``limit``: the most samples ``item``'s batch may hold (at least its own).
        """
        if alone:
            key = (ALONE, next(self._alone))
            policy = BatchPolicy(max_batch_size=1, max_wait_ms=0.0)
        else:
            policy = self._policy(key)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(policy)
        else:
            queue.policy = policy  # a key's limits may change (the batch sizer's cap)
        samples = max(1, samples)
        queue.items.append(
            Waiting(item, samples, now, None if limit is None else max(samples, limit))
        )

    def _due(self, queue: _Queue[T], now: float, in_flight: int) -> bool:
        oldest = queue.items[0].since
        return (
            in_flight == 0
            or queue.samples >= queue.cap
            or (now - oldest) * 1000.0 >= queue.policy.max_wait_ms - _EPSILON_MS
        )

    def take(
        self, now: float, free_slots: int, in_flight: int, queue_slots: int = 0
    ) -> list[tuple[Hashable, list[T]]]:
        """Pop at most ``free_slots`` due batches, oldest first, then up to ``queue_slots`` full ones.

        A full batch cannot grow by waiting, so it may go ahead into the pool's
        queue (``queue_slots``) while every process is busy: the child starts it
        the moment it finishes the batch before, instead of after a round trip
        through the main process.
        """
        batches: list[tuple[Hashable, list[T]]] = []
        while len(batches) < free_slots and self._queues:
            due = [
                (q.items[0].since, key)
                for key, q in self._queues.items()
                if self._due(q, now, in_flight + len(batches))
            ]
            if not due:
                break
            _, key = min(due, key=lambda d: d[0])
            batches.append((key, self._pop(key)))
        queued = 0
        while queued < queue_slots and self._queues:
            full = [
                (q.items[0].since, key) for key, q in self._queues.items() if q.samples >= q.cap
            ]
            if not full:
                break
            _, key = min(full, key=lambda d: d[0])
            batches.append((key, self._pop(key)))
            queued += 1
        return batches

    def _pop(self, key: Hashable) -> list[T]:
        """The first requests of ``key`` up to its cap (at least one), removed."""
        queue = self._queues[key]
        cap, taken, samples = queue.policy.max_batch_size, 0, 0
        for waiting in queue.items:
            if waiting.limit is not None:
                cap = min(cap, waiting.limit)  # a request joins only a batch within its limit
            if taken and samples + waiting.samples > cap:
                break
            taken += 1
            samples += waiting.samples
        batch = [w.item for w in queue.items[:taken]]
        del queue.items[:taken]
        if not queue.items:
            del self._queues[key]
        return batch

    def next_due(self, now: float) -> float | None:
        """Seconds until the first key's oldest request reaches its max wait (None: nothing waits)."""
        waits = [
            q.items[0].since + q.policy.max_wait_ms / 1000.0 - now for q in self._queues.values()
        ]
        return max(0.0, min(waits)) if waits else None

    def drain(self) -> list[T]:
        """Remove and return everything waiting (the connection is gone: the broker requeues)."""
        items = [w.item for q in self._queues.values() for w in q.items]
        self._queues.clear()
        return items
