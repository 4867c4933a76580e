"""The worker's capability heartbeat: what this worker can serve, every few seconds.

Runs as a daemon thread in the process that owns the device runtime (the
prefork child), publishing a :class:`~routing.capabilities.WorkerCapabilities`
record with a TTL of two heartbeat intervals, so a dead worker drops out of
every router's view within two intervals.  Load (``in_flight``) is the tasks
running here plus the messages ready in this worker's own direct queue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.signals import task_postrun, task_prerun

from routing.capabilities import WorkerCapabilities
from routing.registry import RegistryStore

if TYPE_CHECKING:
    from tasks.settings import Settings
    from tasks.worker import WorkerRuntime

__all__ = ["Heartbeat", "running_tasks"]

log = logging.getLogger(__name__)

_running = 0
_running_lock = threading.Lock()


def running_tasks() -> int:
    """Tasks running in this process right now."""
    return _running


@task_prerun.connect
def _task_started(**_: Any) -> None:
    global _running
    with _running_lock:
        _running += 1


@task_postrun.connect
def _task_done(**_: Any) -> None:
    global _running
    with _running_lock:
        _running = max(0, _running - 1)


class Heartbeat:
    """Publishes this worker's record every ``settings.heartbeat_s`` seconds."""

    def __init__(
        self,
        node: str,
        queue: str,
        fallback: str,
        settings: Settings,
        runtime: WorkerRuntime,
        store: RegistryStore,
        queue_depth: Any = None,
    ) -> None:
        self.node, self.queue, self.fallback = node, queue, fallback
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self._queue_depth = queue_depth  # callable -> int, or None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def capabilities(self) -> WorkerCapabilities:
        """This worker's record, measured now."""
        import torch

        from models.runner import supported_dtypes

        device = self.runtime.device
        used_mb = self.runtime.cache.used_bytes // (1024 * 1024)
        if device.type == "cuda":
            free, total = (b // (1024 * 1024) for b in torch.cuda.mem_get_info(device))
            name = torch.cuda.get_device_name(device)
            capability: tuple[int, int] | None = torch.cuda.get_device_capability(device)
        else:
            import psutil

            memory = psutil.virtual_memory()
            total, free = memory.total // (1024 * 1024), memory.available // (1024 * 1024)
            name, capability = "cpu", None
        if self.settings.memory_mb:  # declared capacity (tests pose as different devices)
            total, free = self.settings.memory_mb, max(0, self.settings.memory_mb - used_mb)
        depth = 0
        if self._queue_depth is not None:
            with contextlib.suppress(Exception):  # a missed count is not worth a missed beat
                depth = int(self._queue_depth())
        return WorkerCapabilities(
            name=self.node,
            queue=self.queue,
            device_class_queue=self.fallback,
            device_kind=device.type,
            device_name=name,
            device_index=device.index,
            total_memory_mb=int(total),
            free_memory_mb=int(free),
            compute_capability=capability,
            dtypes=self.settings.dtypes or supported_dtypes(device),
            models_loaded=tuple(dict.fromkeys(m for m, _ in self.runtime.cache.keys())),  # noqa: SIM118
            in_flight=_running + depth,
            max_in_flight=self.settings.max_in_flight,
            heartbeat=time.time(),
        )

    def beat(self) -> None:
        try:
            self.store.publish(self.capabilities(), ttl_s=2 * self.settings.heartbeat_s)
        except Exception as e:
            log.warning("capability heartbeat failed (will retry): %s", e)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="capability-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            self.beat()

    def stop(self) -> None:
        """Stop beating and withdraw the record (a clean shutdown leaves no stale worker)."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.remove(self.node)
