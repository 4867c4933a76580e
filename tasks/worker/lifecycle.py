"""Worker lifecycle, from Celery's signals: declare queues, preload, heartbeat, metrics.

In the main process (``worker_init``, before any pool child forks) the worker
learns its node name and its own direct queue and declares the queue
topology.  In the process that owns the device (the prefork child, or the main
process of a ``threads``/``solo`` worker) it builds the runtime, preloads
``INFER_PRELOAD``, starts the capability heartbeat (:mod:`tasks.worker.heartbeat`)
and serves ``/metrics``.  A clean shutdown withdraws the worker's record.

**Routable before ready.**  A prefork worker forks its child when the
worker's Pool bootstep starts; the child runs ``worker_process_init`` (build
the runtime, import torch, preload, first heartbeat) while the main process
goes on to connect, start consuming and log ``celery@... ready.``, which
therefore came about 0.07 s after the fork but 1.1 s before the first beat
reached the registry (measured, no preload; preloading makes it longer): a
script that waited for "ready" and called ``infer.apply_async`` could get
:class:`~models.errors.NoCapableWorker`.  Now a bootstep, :class:`FirstBeat`,
which ``requires`` the Pool and so starts after the fork and before the
Consumer, holds the main process until the child has made its first beat:
the child releases a semaphore (created here before the fork, inherited by
it) at the end of its ``worker_process_init``.  Measured after (3 runs, no
preload): the record is in the registry 0.07-0.09 s before "ready." is
logged.  The time to routable is unchanged (about 1.7 s here), only the
ready line moves; and the first task no longer sits about 1 s in the queue
waiting for the child.

Why a bootstep and a semaphore: the runtime (device, torch, CUDA) must stay
in the child, so the parent can only wait for it; Celery's own "child is up"
message (``WORKER_UP``) is read by the event loop, which does not run until
the consumer has started, so it cannot gate the consumer.  The wait comes
before the consumer connects on purpose: a broker connection held open while
a child preloads (minutes, for a big model) would miss its AMQP heartbeats and
be closed by the broker.  A semaphore post
never blocks the child (a pipe can fill up, and breaks once its reader is
gone), and respawned children post too, harmlessly.  Waiting on the registry
key alone would wait the whole ``INFER_WORKER_INIT_TIMEOUT`` when the first
beat fails (Redis down, a preload error): the semaphore says the child got
as far as it will, and the main process then reads the registry once and
says in its log whether the worker is routable.  The wait ends early if the
child dies or the worker is asked to stop, and after
``INFER_WORKER_INIT_TIMEOUT`` (when Celery kills a child that never came up).
``threads``/``solo`` workers need none of this: they build the runtime and
beat in ``worker_init`` itself, before the consumer starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from models.errors import InferenceError
from routing.queues import fallback_of, own_queue
from tasks.app import app
from tasks.wire.backend import registry_store
from tasks.wire.catalog import check_preload, local_catalog
from tasks.wire.codec import refuse_text_content
from tasks.worker import load, metrics
from tasks.worker.broker_probe import QueueDepth
from tasks.worker.heartbeat import Heartbeat
from tasks.worker.runtime import get_runtime

if TYPE_CHECKING:
    from multiprocessing.synchronize import Semaphore

__all__ = ["Consuming", "FirstBeat"]

log = logging.getLogger(__name__)

# Set in the worker's main process before the pool forks, so children inherit them.
_node: str | None = None
_own_queue: str | None = None
_heartbeat: Heartbeat | None = None
# Released by a prefork child once its worker_process_init (and first beat) is done.
_first_beat: Semaphore | None = None
# 1 while the main process's consumer consumes, 0 while it reconnects (made before the fork,
# shared with the child, whose heartbeat advertises the worker saturated while it is 0).
_consuming: Any = None


def _preload() -> None:
    global _heartbeat
    settings = app.infer_settings
    runtime = get_runtime()
    runtime.preload(settings.preload)
    if _node is not None and _own_queue is not None and _heartbeat is None:
        fallback = fallback_of(_own_queue) or _own_queue
        probe = QueueDepth(app, _own_queue, timeout_s=settings.heartbeat_s / 4)
        _heartbeat = Heartbeat(
            _node,
            _own_queue,
            fallback,
            settings,
            runtime,
            registry_store(settings),
            probe,
            consuming=_consumer_consumes if _consuming is not None else None,
            class_depth=(lambda: probe.counts(fallback)) if fallback != _own_queue else None,
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
    # Here, once Celery's logging is set up (the catalog is first read earlier, with the
    # configuration): a model a source could not read is not served, and the others are.
    catalog = local_catalog(settings)
    log.warning(
        "[%s] serving %s",
        sender,
        ", ".join(f"{e.name}@{e.default_version}" for e in catalog.entries()),
    )
    for error in catalog.errors:
        log.error("model not served: %s", error)
    for shadowed in catalog.shadowed:
        log.warning("model %s", shadowed)


@worker_init.connect
def _preload_in_main(sender: Any = None, **_: Any) -> None:
    global _node, _own_queue
    try:
        check_preload(app.infer_settings)
    except InferenceError as e:
        log.critical("worker not started: INFER_PRELOAD: %s", e)
        raise SystemExit(f"INFER_PRELOAD: {e}") from e
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
        if _own_queue is not None:
            _track_consuming(sender)
            # Before the pool forks: the consumer's load figures, read by the child's heartbeat.
            models = [e.name for e in local_catalog(app.infer_settings).entries()]
            load.init(models, [_own_queue, fallback_of(_own_queue) or _own_queue])
    refuse_text_content()  # kombu would hand such a body on undecoded and stop the worker
    # prefork children preload in worker_process_init; every other pool runs
    # tasks in this very process, which never forks, so load here.
    pool = getattr(sender, "pool_cls", None)
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in str(pool_name):
        _preload()
    elif sender is not None and _own_queue is not None:
        _hold_consumer_for_first_beat(sender)


def _consumer_consumes() -> bool:
    return _consuming is None or bool(_consuming.value)


def _track_consuming(worker: Any) -> None:
    global _consuming
    # Assume consuming until the consumer says otherwise: the first beat comes before the
    # consumer starts (FirstBeat), and a fresh worker is routable at "ready." as before.
    _consuming = multiprocessing.get_context("fork").Value("b", 1, lock=False)
    worker.app.steps["consumer"].add(Consuming)


class Consuming(bootsteps.StartStopStep):
    """Flags whether the consumer consumes: set once it has started, cleared when it stops.

    Celery stops the consumer's steps when its broker connection is lost and
    starts them again after it reconnects (which can take a while: its
    delayed-delivery setup tries every node of a broker URL list, about 10 s
    for each one that is down).  Meanwhile the worker is alive and beating,
    but nothing reaches it: its heartbeat advertises it saturated, so routers
    send its requests to workers that consume.
    """

    label = "consuming flag"
    # After the delayed-delivery setup, the last step before the event loop consumes.
    requires = ("tasks.worker.delayed_delivery:ClusterDelayedDelivery",)

    def start(self, parent: Any) -> None:
        if _consuming is not None:
            _consuming.value = 1

    def stop(self, parent: Any) -> None:
        if _consuming is not None:
            _consuming.value = 0

    shutdown = stop


def _hold_consumer_for_first_beat(worker: Any) -> None:
    global _first_beat
    if getattr(worker, "pool_start_method", "fork") != "fork":
        return  # a spawned child inherits nothing: it could never release the semaphore
    _first_beat = multiprocessing.get_context("fork").Semaphore(0)
    worker.app.steps["worker"].add(FirstBeat)


class FirstBeat(bootsteps.StartStopStep):
    """Starts after the pool forks, before the consumer: waits for the child's first beat."""

    label = "first heartbeat"
    requires = ("celery.worker.components:Pool",)

    def start(self, parent: Any) -> None:
        if _first_beat is None:
            return
        from celery.worker import state

        settings = app.infer_settings
        started = time.monotonic()
        pids = list((parent.pool.info or {}).get("processes") or [])
        while not _first_beat.acquire(timeout=0.1):
            state.maybe_shutdown()  # a SIGTERM while we wait stops the worker as usual
            waited = time.monotonic() - started
            if waited > settings.worker_init_timeout:
                log.warning(
                    "%s: the pool child has not finished starting after %.0f s "
                    "(INFER_WORKER_INIT_TIMEOUT): consuming anyway",
                    _node,
                    waited,
                )
                return
            if pids and not any(_alive(pid) for pid in pids):
                log.warning("%s: the pool child exited while starting: consuming anyway", _node)
                return
        waited = time.monotonic() - started
        try:
            routable = any(c.name == _node for c in registry_store(settings).load())
        except Exception as e:
            log.warning("%s: could not read the capability registry (%s)", _node, e)
            return
        if routable:
            log.info("%s: first heartbeat is in the registry (waited %.2f s)", _node, waited)
        else:
            log.warning(
                "%s: the pool child started but its heartbeat is not in the registry "
                "(see its log): routers will not pick this worker until a beat lands",
                _node,
            )


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _declare(queues: list[str]) -> None:
    from tasks.wire.topology import declare_topology

    try:
        declared = declare_topology(app, queues)
    except InferenceError as e:  # a queue with other arguments: the consumer could never start
        log.critical("worker not started: %s", e)
        raise SystemExit(str(e)) from e
    except Exception as e:  # the consumer still declares what it consumes on connect
        log.error("could not declare the queue topology (dead-letter queues, default queue): %s", e)
    else:
        if declared:
            log.info("declared queues %s", ", ".join(declared))


@worker_process_init.connect
def _preload_in_child(**_: Any) -> None:
    try:
        _preload()
    finally:
        if _first_beat is not None:  # the parent's FirstBeat step may start the consumer now
            _first_beat.release()
