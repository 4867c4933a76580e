"""The worker's capability heartbeat: what this worker can serve, every few seconds.

Runs as a daemon thread in the process that owns the device runtime (the
prefork child), publishing a :class:`~routing.capabilities.WorkerCapabilities`
record with a TTL of two heartbeat intervals, so a dead worker drops out of
every router's view within two intervals.  Load (``in_flight``) is the tasks
running here plus the messages ready in this worker's own direct queue.
For admission control it also advertises its measured ``service_rate`` and
its ``backlog``: the requests outstanding in it (waiting for a batch or
running, as its consumer counts them), ready in its direct queue, and its
share of its class queue (ready messages over the class queue's consumers);
``accepting`` (false while it cannot consume) and ``queue_heads`` (the queue
wait of the latest message it took from each queue) come from
:mod:`tasks.worker.load`.
**It beats early when its load moves**: admission control reckons each
worker's pending requests between beats from the advertised rate, and an
admitted request is as late as that reckoning is wrong, so a worker whose
consumer's figures moved (the wait its outstanding requests imply, by more
than :data:`LOAD_MOVED_S`, or its service rate by more than a tenth) beats at
once, at most every 0.25 s, instead of waiting out ``INFER_HEARTBEAT_S``.
(The overload lane's 4x level began with a second of late replies: the
worker's rate under the new load fell 15% below the one it had advertised.)

The first beat is made in :meth:`Heartbeat.start` itself, synchronously, so
in a prefork child it lands inside ``worker_process_init``, which the main
process waits for before it starts consuming and logs "ready."
(:class:`tasks.worker.lifecycle.FirstBeat`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from routing.capabilities import WorkerCapabilities
from routing.registry import RegistryStore
from tasks.wire.catalog import advertised, local_catalog
from tasks.worker import load
from tasks.worker.broker_probe import BrokerUnreachable
from tasks.worker.device import RuntimeView, device_memory
from tasks.worker.running import meter, running_tasks

if TYPE_CHECKING:
    from tasks.settings import Settings

__all__ = ["LOAD_MOVED_S", "Heartbeat"]

LOAD_MOVED_S = 0.1  # a move of the implied wait (outstanding / rate) that is worth a beat now

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes this worker's record every ``settings.heartbeat_s`` seconds."""

    def __init__(
        self,
        node: str,
        queue: str,
        fallback: str,
        settings: Settings,
        runtime: RuntimeView,
        store: RegistryStore,
        queue_depth: Callable[[], int] | None = None,
        consuming: Callable[[], bool] | None = None,
        class_depth: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.node, self.queue, self.fallback = node, queue, fallback
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self._queue_depth = queue_depth
        self._class_depth = class_depth  # (ready, consumers) of the class queue
        self._consuming = consuming
        self._was_consuming = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One beat at a time: the loop beats from its thread while runtime.advertise() beats
        # from a task's (load_model, unload_model), and the queue-depth count's broker
        # connection is not thread-safe (two readers desync its frames and hang the child).
        self._beating = threading.Lock()
        self._broker_reachable = True
        self._advertised_load: tuple[float, int] | None = None  # (rate, outstanding) last beat

    def capabilities(self) -> WorkerCapabilities:
        """This worker's record, measured now."""
        import torch

        from models.runner import supported_dtypes

        device = self.runtime.device
        used_mb = self.runtime.cache.used_bytes // (1024 * 1024)
        memory = device_memory(device)
        free, total = memory.free // (1024 * 1024), memory.total // (1024 * 1024)
        name: str = "cpu"
        capability: tuple[int, int] | None = None
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            capability = torch.cuda.get_device_capability(device)
        if self.settings.memory_mb:  # declared capacity (tests pose as different devices)
            total, free = self.settings.memory_mb, max(0, self.settings.memory_mb - used_mb)
        depth, reachable, class_share = 0, True, 0
        if self._queue_depth is not None:
            try:
                depth = int(self._queue_depth())
                if self._class_depth is not None:
                    ready, consumers = self._class_depth()
                    class_share = math.ceil(ready / max(1, consumers))
            except BrokerUnreachable as e:
                reachable = False
                if self._broker_reachable:
                    log.warning("no broker answers (%s): advertised as saturated until one does", e)
            except Exception as e:  # a missed count is not worth a missed beat
                log.debug("queue depth not counted: %s", e)
            if reachable and not self._broker_reachable:
                log.warning("the broker answers again: advertised load is measured again")
            self._broker_reachable = reachable
        in_flight = running_tasks() + depth
        shared = load.shared()
        outstanding = shared.outstanding if shared is not None else None
        if outstanding is None or shared is None:  # the consumer does not measure: this process
            rate, outstanding, batch_s = meter().rate(), running_tasks(), meter().batch_s
        else:
            rate, batch_s = shared.rate, shared.batch_s
            self._advertised_load = (rate, outstanding)
        consuming = self.consuming()
        if consuming != self._was_consuming:
            log.warning(
                "the consumer %s: advertised %s",
                "consumes again" if consuming else "stopped (broker connection lost)",
                "load measured again" if consuming else "as saturated until it consumes",
            )
            self._was_consuming = consuming
        if not (reachable and consuming):  # it cannot consume: routers send its requests elsewhere
            in_flight = max(in_flight, self.settings.max_in_flight)
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
            models=advertised(local_catalog(self.settings)),
            in_flight=in_flight,
            max_in_flight=self.settings.max_in_flight,
            heartbeat=time.time(),
            service_rate=round(rate, 3),
            batch_s=round(batch_s, 4),
            backlog=outstanding + depth + class_share,
            accepting=reachable and consuming,
            queue_heads=shared.heads() if shared is not None else {},
        )

    def beat(self) -> None:
        with self._beating:
            try:
                self.store.publish(self.capabilities(), ttl_s=2 * self.settings.heartbeat_s)
            except Exception as e:
                log.warning("capability heartbeat failed (will retry): %s", e)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="capability-heartbeat", daemon=True)
        self._thread.start()
        return self

    def consuming(self) -> bool:
        return self._consuming() if self._consuming is not None else True

    def load_moved(self) -> bool:
        """Whether the consumer's figures moved enough since the last beat to beat now."""
        shared, last = load.shared(), self._advertised_load
        if shared is None or last is None:
            return False
        rate, outstanding = shared.rate, shared.outstanding
        last_rate, last_outstanding = last
        if outstanding is None or rate <= 0.0 or last_rate <= 0.0:
            return False
        wait_moved = abs(outstanding / rate - last_outstanding / last_rate) > LOAD_MOVED_S
        return wait_moved or abs(rate - last_rate) > 0.1 * last_rate

    def _loop(self) -> None:
        # Every period; at once when the consumer stops or starts consuming, or its load moved.
        due = time.monotonic() + self.settings.heartbeat_s
        while not self._stop.wait(min(0.25, self.settings.heartbeat_s)):
            if (
                time.monotonic() >= due
                or self.consuming() != self._was_consuming
                or self.load_moved()
            ):
                self.beat()
                due = time.monotonic() + self.settings.heartbeat_s

    def stop(self) -> None:
        """Stop beating and withdraw the record (a clean shutdown leaves no stale worker)."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.remove(self.node)
