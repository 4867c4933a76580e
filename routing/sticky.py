"""Sticky-key cache: sticky key -> worker, with a TTL, a size bound and an injected clock.

A model's requests go back to the worker that already holds it warm.  An
entry ends when its TTL passes, when the cache is full (least recently used
first), when the worker is lost (:meth:`drop_worker`), or when the worker
evicts the model (:meth:`invalidate`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

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
        self._entries: OrderedDict[str, tuple[str, str | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        """The remembered worker for ``key``, or None (missing or expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[2] <= self._now():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, worker: str, model: str | None = None) -> None:
        """Remember ``worker`` for ``key`` for one TTL from now."""
        with self._lock:
            self._entries[key] = (worker, model, self._now() + self.ttl_s)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def invalidate(
        self, key: str | None = None, *, worker: str | None = None, model: str | None = None
    ) -> int:
        """Drop ``key``, or every entry of ``worker`` for ``model`` (it evicted the model)."""
        with self._lock:
            if key is not None:
                return 1 if self._entries.pop(key, None) is not None else 0
            doomed = [
                k
                for k, (w, m, _) in self._entries.items()
                if w == worker and (model is None or m == model)
            ]
            for k in doomed:
                del self._entries[k]
            return len(doomed)

    def drop_worker(self, worker: str) -> int:
        """Forget every entry pointing at ``worker`` (it died or left)."""
        return self.invalidate(worker=worker)
