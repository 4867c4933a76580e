"""A per-worker LRU cache of loaded models under a memory budget.

Hand-written rather than ``functools.lru_cache`` because the bound is bytes,
not a count, evictions must be logged and counted, and operators need to
evict a model on demand.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from models.errors import ModelTooLarge

__all__ = ["CacheStats", "ModelCache"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0


class ModelCache(Generic[K, V]):
    """LRU of ``key -> loaded model`` whose summed sizes stay within ``budget_bytes``.

    ``load(key)`` creates a value on a miss and ``size_of(value)`` measures it.
    Thread-safe: a threads pool may call :meth:`get` concurrently; a load
    happens under the lock so a model is never loaded twice at once.
    """

    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[K], V],
        size_of: Callable[[V], int],
        on_evict: Callable[[K], None] | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.budget_bytes = budget_bytes
        self._load = load
        self._size_of = size_of
        self._on_evict = on_evict
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = CacheStats()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def keys(self) -> list[K]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: K) -> V:
        """Return the cached value, loading (and evicting LRU entries) on a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return self._entries[key][0]
            value = self._load(key)
            size = self._size_of(value)
            if size > self.budget_bytes:
                raise ModelTooLarge(
                    f"{key!r} needs {size} bytes but the model cache budget is "
                    f"{self.budget_bytes} bytes: raise INFER_CACHE_BUDGET_MB or use a bigger device"
                )
            while self._entries and self.used_bytes + size > self.budget_bytes:
                self._evict_lru()
            self._entries[key] = (value, size)
            self.stats.loads += 1
            return value

    def evict(self, key: K) -> bool:
        """Drop ``key`` if cached; return whether it was."""
        with self._lock:
            if key not in self._entries:
                return False
            del self._entries[key]
            self._evicted(key, reason="on request")
            return True

    def _evict_lru(self) -> None:
        key, _ = self._entries.popitem(last=False)
        self._evicted(key, reason="over budget")

    def _evicted(self, key: K, reason: str) -> None:
        self.stats.evictions += 1
        log.warning(
            "evicted model %r from cache (%s); %d of %d bytes in use",
            key,
            reason,
            self.used_bytes,
            self.budget_bytes,
        )
        if self._on_evict is not None:
            self._on_evict(key)
