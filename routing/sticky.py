"""Sticky-key cache: sticky key -> worker, with a TTL, a size bound and an injected clock.

A model's requests go back to the worker that already holds it warm.  An
entry ends when its TTL passes, when the cache is full (least recently used
first), when the worker is lost (:meth:`drop_worker`), or when the worker
evicts the model (:meth:`invalidate`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["StickyCache"]


class StickyCache:
    """Bounded LRU of ``key -> (worker, model, expires_at)``; thread-safe."""

    def __init__(
        self, ttl_s: float = 60.0, max_size: int = 4096, now: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl_s <= 0 or max_size <= 0:
            raise ValueError("ttl_s and max_size must be positive")
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._now = now
        self._entries: OrderedDict[Hashable, tuple[str, str | None, float]] = OrderedDict()
        self._per_worker: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> StickyCache:
        """An independent copy (for what-if questions such as ``celery -A tasks route``)."""
        other = StickyCache(self.ttl_s, self.max_size, self._now)
        with self._lock:
            other._entries = OrderedDict(self._entries)
            other._per_worker = Counter(self._per_worker)
        return other

    def get(self, key: Hashable) -> str | None:
        """The remembered worker for ``key``, or None (missing or expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[2] <= self._now():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, worker: str, model: str | None = None) -> None:
        """Remember ``worker`` for ``key`` for one TTL from now."""
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (worker, model, self._now() + self.ttl_s)
            self._per_worker[worker] += 1
            while len(self._entries) > self.max_size:
                self._drop(next(iter(self._entries)))

    def invalidate(
        self, key: Hashable | None = None, *, worker: str | None = None, model: str | None = None
    ) -> int:
        """Drop ``key``, or every entry of ``worker`` for ``model`` (it evicted the model)."""
        with self._lock:
            if key is not None:
                return 1 if self._drop(key) else 0
            doomed = [
                k
                for k, (w, m, _) in self._entries.items()
                if w == worker and (model is None or m == model)
            ]
            for k in doomed:
                self._drop(k)
            return len(doomed)

    def keys_per_worker(self) -> Counter[str]:
        """How many sticky keys point at each worker (the router balances on it)."""
        return self._per_worker

    def _drop(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._per_worker[entry[0]] -= 1
        if self._per_worker[entry[0]] <= 0:
            del self._per_worker[entry[0]]
        return True

    def drop_worker(self, worker: str) -> int:
        """Forget every entry pointing at ``worker`` (it died or left)."""
        return self.invalidate(worker=worker)
