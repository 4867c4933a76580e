"""Worker lifecycle, from Celery's signals: declare queues, preload, heartbeat, metrics.

In the main process (``worker_init``, before any pool child forks) the worker
learns its node name and its own direct queue and declares the queue
topology.  In the process that owns the device (the prefork child, or the main
process of a ``threads``/``solo`` worker) it builds the runtime, preloads
``INFER_PRELOAD``, starts the capability heartbeat (:mod:`tasks.worker.heartbeat`)
and serves ``/metrics``.  A clean shutdown withdraws the worker's record.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from routing.queues import fallback_of, own_queue
from tasks.app import app
from tasks.wire.backend import registry_store
from tasks.wire.codec import refuse_text_content
from tasks.worker import metrics
from tasks.worker.heartbeat import Heartbeat
from tasks.worker.runtime import get_runtime

__all__: list[str] = []  # signal handlers only

log = logging.getLogger(__name__)

# Set in the worker's main process before the pool forks, so children inherit them.
_node: str | None = None
_own_queue: str | None = None
_heartbeat: Heartbeat | None = None


def _queue_depth(queue: str) -> Any:
    """A callable counting ready messages in ``queue`` over its own broker connection."""
    conn = app.connection_for_write()

    def depth() -> int:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)

    return depth


def _preload() -> None:
    global _heartbeat
    settings = app.infer_settings
    runtime = get_runtime()
    runtime.preload(settings.preload)
    if _node is not None and _own_queue is not None and _heartbeat is None:
        fallback = fallback_of(_own_queue) or _own_queue
        _heartbeat = Heartbeat(
            _node,
            _own_queue,
            fallback,
            settings,
            runtime,
            registry_store(settings),
            _queue_depth(_own_queue),
        ).start()
        runtime.on_change = _heartbeat.beat
    metrics.serve(settings.metrics_port, settings.metrics_addr, runtime, app)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@celeryd_after_setup.connect
def _announce(sender: str, instance: Any, **_: Any) -> None:
    settings = app.infer_settings
    line = f"[{sender}] device={settings.device} preload={','.join(settings.preload) or '-'}; {settings.describe()}"
    log.warning(line)  # WARNING so it shows at any log level


@worker_init.connect
def _preload_in_main(sender: Any = None, **_: Any) -> None:
    global _node, _own_queue
    _node = getattr(sender, "hostname", None)
    consumed = list(getattr(sender.app.amqp.queues, "consume_from", {}) or {}) if sender else []
    _own_queue = own_queue(consumed)
    if _own_queue is None:
        log.warning(
            "worker %s consumes no direct queue (%s): it will not advertise "
            "capabilities, so the router never picks it",
            _node,
            consumed,
        )
    if sender is not None:
        _declare(list(consumed))
    refuse_text_content()  # kombu would hand such a body on undecoded and stop the worker
    # prefork children preload in worker_process_init; every other pool runs
    # tasks in this very process, which never forks, so load here.
    pool = getattr(sender, "pool_cls", None)
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in str(pool_name):
        _preload()


def _declare(queues: list[str]) -> None:
    from tasks.wire.topology import declare_topology

    try:
        declared = declare_topology(app, queues)
    except Exception as e:  # the consumer still declares what it consumes on connect
        log.error("could not declare the queue topology (dead-letter queues, default queue): %s", e)
    else:
        if declared:
            log.info("declared queues %s", ", ".join(declared))


@worker_process_init.connect
def _preload_in_child(**_: Any) -> None:
    _preload()
