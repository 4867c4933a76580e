"""The live registry of workers: heartbeats with expiry, and a cached snapshot.

Where it lives, and why: in **Redis** (the result backend the deployment
already runs), one key per worker, ``SET ... PX ttl`` on every heartbeat, so
a dead worker's record expires by itself within two heartbeat intervals, and
an index set of names, so a snapshot is one ``SMEMBERS`` + one ``MGET``.  Celery's own mechanisms were the first
choice and do not fit: worker-heartbeat *events* need an event consumer
running in every client process, and an ``inspect`` broadcast waits its whole
reply timeout (1 s by default) to collect answers.  On the embedded default
(no Redis) the same records are JSON files under ``$INFER_HOME/registry``,
expired by their heartbeat time.

:class:`LiveRegistry` is what the router reads: a snapshot refreshed by a
background thread, so routing does not wait on the network; only before it
refuses a request does the router ask for one synchronous read
(:meth:`LiveRegistry.refresh_if_stale`, rate-limited), when the snapshot is
older than a heartbeat interval.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from routing.capabilities import WorkerCapabilities

__all__ = ["FileStore", "LiveRegistry", "RedisStore", "RegistryStore", "store_for"]

log = logging.getLogger(__name__)


class RegistryStore(Protocol):
    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None: ...
    def remove(self, name: str) -> None: ...
    def load(self) -> list[WorkerCapabilities]: ...


class RedisStore:
    """Worker records as Redis keys ``infer:<namespace>:worker:<name>`` with a TTL.

    An index set (``infer:<namespace>:workers``) lists the names, so a snapshot
    is ``SMEMBERS`` + ``MGET`` whatever else the database holds (a ``SCAN``
    over a result backend's keyspace cost 40% of a busy client's CPU);
    members whose key has expired are pruned on the way.
    """

    def __init__(self, url: str, namespace: str = "default") -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.prefix = f"infer:{namespace}:worker:"
        self.index = f"infer:{namespace}:workers"

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.prefix + caps.name, caps.to_json(), px=int(ttl_s * 1000))
        pipe.sadd(self.index, caps.name)
        pipe.execute()

    def remove(self, name: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.prefix + name)
        pipe.srem(self.index, name)
        pipe.execute()

    def load(self) -> list[WorkerCapabilities]:
        names = sorted(
            n.decode() if isinstance(n, bytes) else n for n in self.client.smembers(self.index)
        )
        if not names:
            return []
        raws = self.client.mget([self.prefix + n for n in names])
        expired = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if expired:
            self.client.srem(self.index, *expired)
        return [WorkerCapabilities.from_json(raw) for raw in raws if raw is not None]


class FileStore:
    """Worker records as JSON files (embedded default).

    Files do not expire on their own: :class:`LiveRegistry` drops records whose
    heartbeat is older than its TTL, and a stopping worker removes its file.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name.replace('/', '_')}.json"

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        path = self._path(caps.name)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(caps.to_json())
        tmp.replace(path)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def load(self) -> list[WorkerCapabilities]:
        records = []
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                records.append(WorkerCapabilities.from_json(path.read_text()))
        return records


def store_for(backend_url: str, home: Path, namespace: str = "default") -> RegistryStore:
    """Redis when the result backend is Redis, else files under ``home/registry/<namespace>``.

    Workers and clients see each other only within one namespace.
    """
    if backend_url.startswith(("redis://", "rediss://")):
        return RedisStore(backend_url, namespace)
    return FileStore(home / "registry" / namespace)


class LiveRegistry:
    """A cached view of live workers, refreshed in the background.

    ``ttl_s`` is the expiry (two heartbeat intervals): records whose heartbeat
    is older are dropped even if the store still holds them.  ``on_lost(name)``
    is called once for each worker that disappears, and ``on_evicted(name,
    model)`` for each model a worker no longer holds (it evicted it).
    ``sync_refresh_s`` spaces the synchronous refreshes of
    :meth:`refresh_if_stale` (at most one attempt per 100 ms by default).
    """

    def __init__(
        self,
        store: RegistryStore,
        ttl_s: float = 4.0,
        refresh_s: float = 0.5,
        now: Callable[[], float] = time.time,
        on_lost: Callable[[str], object] | None = None,
        on_evicted: Callable[[str, str], object] | None = None,
        sync_refresh_s: float = 0.1,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.sync_refresh_s = sync_refresh_s
        self._now = now
        self._on_lost = on_lost
        self._on_evicted = on_evicted
        self._workers: dict[str, WorkerCapabilities] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync_tried_at: float | None = None
        self.refreshed_at = 0.0

    @property
    def heartbeat_s(self) -> float:
        """One heartbeat interval: half the expiry (a record outlives two beats)."""
        return self.ttl_s / 2

    def workers(self) -> dict[str, WorkerCapabilities]:
        """The last snapshot (no network); starts the refresher on first use."""
        if self._thread is None:
            self._start()
        return self._workers

    def refresh(self) -> None:
        """Pull the store once (the refresher thread calls this every ``refresh_s``)."""
        try:
            records = self.store.load()
        except Exception as e:  # keep the last snapshot; the next refresh retries
            log.warning("worker registry refresh failed: %s", e)
            return
        cutoff = self._now() - self.ttl_s
        fresh = {w.name: w for w in records if w.heartbeat >= cutoff}
        lost = set(self._workers) - set(fresh)
        evicted = [
            (name, model)
            for name, old in self._workers.items()
            if name in fresh
            for model in set(old.models_loaded) - set(fresh[name].models_loaded)
        ]
        self._workers = fresh
        self.refreshed_at = self._now()
        for name in lost:
            log.info("worker %s left the registry", name)
            if self._on_lost is not None:
                self._on_lost(name)
        for name, model in evicted:
            if self._on_evicted is not None:
                self._on_evicted(name, model)

    def refresh_if_stale(self) -> bool:
        """Refresh once, now, if the snapshot is older than one heartbeat interval.

        The router calls this before it refuses a request, so a snapshot the
        background refresher has not renewed (it failed, or has not run yet)
        cannot refuse a live fleet.  One call is at most one store read (Redis:
        SMEMBERS + MGET, bounded by the store's socket timeout; files: one
        folder), and there is at most
        one attempt per ``sync_refresh_s`` whoever asks, so a burst of refusals
        or a store that is down costs one read, not one per request.  True
        when the snapshot was renewed: decide again.
        """
        with self._sync_lock:
            now = self._now()
            if now - self.refreshed_at <= self.heartbeat_s:
                return False
            tried = self._sync_tried_at
            if tried is not None and 0 <= now - tried < self.sync_refresh_s:
                return False  # (a wall clock that stepped back does not block retries)
            self._sync_tried_at = now
        before = self.refreshed_at
        self.refresh()
        return self.refreshed_at != before

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self.refresh()  # the first snapshot, once, before the first decision
            self._thread = threading.Thread(target=self._loop, name="worker-registry", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
