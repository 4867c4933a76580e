"""Worker-side dynamic batching: concurrent single requests -> one forward pass.

Each request stays a real Celery task (own id, state, result, Flower entry).
Under ``-P threads`` many tasks run at once in one process; each hands its
checked sample to the :class:`DynamicBatcher` and waits on a future.  One
runner thread groups pending samples by key (model, input shape, dtype, compute
precision) and runs a batch when it reaches the key's ``max_batch_size`` or its
oldest sample has waited ``max_wait_ms``, whichever comes first.  The batch
size is also capped by the device memory free for that model and shape.

Failure isolation: inputs are validated per request before they join a batch,
so a bad input fails only its own task.  If a batched forward pass still
raises, every sample of that batch is retried alone, so only the culprit fails.
Crash safety is Celery's: each task is acked after it returns (late acks), so
a crash mid-batch means every unfinished request is redelivered.

Written here rather than taken from celery-batches: that library pins
celery < 5.7 and replaces the task's signature with a list of requests; see
docs/batching.md for the comparison.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BatchPolicy", "DynamicBatcher", "Pending", "Ready"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0


@dataclass
class Pending:
    sample: np.ndarray
    future: Future[Any]
    enqueued: float


@dataclass
class Ready:
    key: Hashable
    items: list[Pending] = field(default_factory=list)


class DynamicBatcher:
    """Groups samples by key and runs them through ``run_batch`` in batches.

    ``run_batch(key, stacked) -> (outputs, compute_ms)`` runs one forward pass
    on a stacked batch and returns one output row per sample.  ``policy(key)`` gives the
    key's size/wait limits, and ``memory_cap(key, sample)`` the largest batch
    the device's free memory allows (``None``: no cap).  ``clock`` is
    injectable so that tests drive time by hand.
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, np.ndarray], tuple[np.ndarray, float]],
        policy: Callable[[Hashable], BatchPolicy],
        memory_cap: Callable[[Hashable, np.ndarray], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        active: Callable[[], int] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._policy = policy
        self._memory_cap = memory_cap
        self._clock = clock
        self._active = active
        self._pending: dict[Hashable, list[Pending]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.batch_sizes: list[int] = []  # observed, for stats and tests (bounded below)

    # -- the request side ------------------------------------------------------------------------
    def submit(self, key: Hashable, sample: np.ndarray) -> Future[Any]:
        """Queue one sample; the future resolves to ``(row, batch_size, batch_wait_ms, compute_ms)``."""
        future: Future[Any] = Future()
        with self._cond:
            self._pending.setdefault(key, []).append(Pending(sample, future, self._clock()))
            self._cond.notify()
        if self._thread is None:
            self._start()
        return future

    # -- assembly (pure, clock-driven; unit-tested without threads) -------------------------------
    def cap(self, key: Hashable, sample: np.ndarray) -> int:
        limit = self._policy(key).max_batch_size
        if self._memory_cap is not None:
            by_memory = self._memory_cap(key, sample)
            if by_memory is not None:
                limit = max(1, min(limit, by_memory))
        return limit

    def take_ready(self, now: float) -> tuple[list[Ready], float | None]:
        """Pop every batch due at ``now``; also return seconds until the next one is due."""
        ready: list[Ready] = []
        next_due: float | None = None
        with self._cond:
            waiting = sum(len(items) for items in self._pending.values())
            everyone_here = self._active is not None and waiting >= self._active()
            for key, items in list(self._pending.items()):
                cap = self.cap(key, items[0].sample)
                wait_s = self._policy(key).max_wait_ms / 1000.0
                while items and (
                    len(items) >= cap or everyone_here or now - items[0].enqueued >= wait_s
                ):
                    ready.append(Ready(key, items[:cap]))
                    del items[:cap]
                if items:
                    due = items[0].enqueued + wait_s - now
                    next_due = due if next_due is None else min(next_due, due)
                else:
                    del self._pending[key]
        return ready, next_due

    def run(self, batch: Ready, now: float) -> None:
        """Run one batch; on failure, retry its samples one by one so only the culprit fails."""
        size = len(batch.items)
        waits = [(now - p.enqueued) * 1000.0 for p in batch.items]
        try:
            outputs, compute_ms = self._run_batch(
                batch.key, np.stack([p.sample for p in batch.items])
            )
        except Exception as batch_error:
            if size == 1:
                batch.items[0].future.set_exception(batch_error)
                return
            log.warning(
                "batch of %d for %s failed (%s); retrying one by one", size, batch.key, batch_error
            )
            for p, wait in zip(batch.items, waits, strict=True):
                try:
                    alone, ms = self._run_batch(batch.key, p.sample[None])
                    p.future.set_result((alone[0], 1, wait, ms))
                except Exception as e:
                    p.future.set_exception(e)
            return
        self.batch_sizes.append(size)
        del self.batch_sizes[:-10_000]
        for i, (p, wait) in enumerate(zip(batch.items, waits, strict=True)):
            p.future.set_result((outputs[i], size, wait, compute_ms))

    # -- the runner thread -----------------------------------------------------------------------
    def _start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
            ready, next_due = self.take_ready(self._clock())
            for batch in ready:
                self.run(batch, self._clock())
            if not ready:
                with self._cond:
                    if not self._pending:
                        self._cond.wait(timeout=1.0)
                    elif next_due is not None and next_due > 0:
                        self._cond.wait(timeout=next_due)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
