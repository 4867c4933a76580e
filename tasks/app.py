"""The Celery app and all of its wiring.  ``celery -A tasks`` finds it as ``tasks.app``.

Configuration is lazy: the environment is read the first time the app's
configuration is needed (``add_defaults`` with a callable), not at import, and
nothing connects to a broker until a task is sent or a worker starts.  With
``INFER_SIGNING_DIR`` set, that first read also switches on message signing
(:mod:`tasks.wire.signing`; task and control messages are signed, results are not).

Every app routes with a capability router of its own (:class:`AppRoute`),
built from its own settings on its first routed call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import before_task_publish

from tasks.client.routes import AppRoute
from tasks.settings import SERIALIZERS, Settings
from tasks.wire.codec import display
from tasks.wire.deadline import DEADLINE_HEADER
from tasks.wire.deadline import normalize as normalize_deadline

if TYPE_CHECKING:
    from routing.router import CapabilityRouter

__all__ = [
    "SENT_AT_HEADER",
    "InferenceApp",
    "app",
    "broker_use_ssl",
    "celery_config",
    "display_call",
    "prefetch_multiplier",
]

# Wall-clock publish time, added to every task message so the worker can
# report queue wait (meaningful across hosts when their clocks are synced).
SENT_AT_HEADER = "infer_sent_at"

# The modules a worker imports: the tasks, and the worker's signal handlers.
WORKER_MODULES = [
    "tasks.inference",
    "tasks.canvas",
    "tasks.diagnostics",
    "tasks.control",
    "tasks.worker.running",
    "tasks.worker.lifecycle",
]


class InferenceApp(Celery):
    """A Celery app whose configuration comes from one :class:`Settings` object."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("amqp", "tasks.wire.topology:InferenceAMQP")
        # Every task skips a duplicate delivery whose SUCCESS is stored (tasks.worker.dedup).
        kwargs.setdefault("task_cls", "tasks.worker.dedup:IdempotentTask")
        # redis:// results through tasks.wire.backend.ResilientRedisBackend (rides out a Redis restart).
        kwargs.setdefault("loader", "tasks.wire.backend:InferenceLoader")
        super().__init__("tasks", **kwargs)
        if settings is not None:
            # Celery's conf.result_backend prefers the CELERY_RESULT_BACKEND
            # environment variable over any configuration; an app given its
            # own settings must use their backend.  (Its broker still comes
            # from CELERY_BROKER_URL when that is set.)
            self.backend_cls = settings.backend
        self._infer_settings = settings
        self._publishing = threading.local()  # send_task depth, and whether a group pipelines
        self.route = AppRoute(lambda: self.infer_settings)
        self.add_defaults(self._config)
        self.on_after_configure.connect(self._enable_signing, weak=False)

    def _config(self) -> dict[str, Any]:
        config = celery_config(self.infer_settings)
        config["task_routes"] = [self.route] if self.infer_settings.routing else []
        signing_dir = self.infer_settings.signing_dir
        if signing_dir is not None:
            # Loads the key and certificates: a bad file stops us here.
            from tasks.wire import signing

            config.update(signing.celery_config(signing_dir))
        return config

    def _enable_signing(self, **_: Any) -> None:
        # setup_security needs the configuration read (it checks task_serializer
        # is auth), so it runs once that is done, never at import.
        if self.infer_settings.signing_dir is not None:
            from tasks.wire import signing

            signing.enable(self, self.infer_settings.serializer)

    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        if (
            kwargs.get("expires") is not None
            or (kwargs.get("headers") or {}).get(DEADLINE_HEADER) is not None
        ):
            # One absolute deadline in expires= and the header; already past: DeadlineExceeded.
            normalize_deadline(kwargs, time.time())
        local = self._publishing
        local.depth = getattr(local, "depth", 0) + 1
        try:
            if getattr(local, "pipelining", False):
                # A reconnect would republish on a new channel, whose delivery tags the
                # pipeline does not track: a lost connection raises PublishFailed instead.
                kwargs["retry"] = False
                return super().send_task(*args, **kwargs)
            return self._send_confirmed(*args, **kwargs)
        finally:
            local.depth -= 1

    def _send_confirmed(self, *args: Any, **kwargs: Any) -> Any:
        """One publish, its confirm awaited at most ``publish_confirm_timeout_s`` per try.

        A lost connection or a confirm timeout is retried by Celery (each retry
        reconnects, to the next node of a broker URL list).  A nack is retried
        here, with the same task id and a growing pause, up to
        ``publish_retries`` times: a quorum queue nacks while it elects a new
        leader (about half a second after its leader's node dies).  What still
        fails is :class:`~models.errors.PublishFailed` naming the task id (a
        failed TLS handshake: :class:`~models.errors.ConfigurationError`, which
        no retry mends): never a bare kombu or socket error, and never an
        endless wait on a silent broker.
        """
        settings = self.infer_settings
        if settings.embedded or not settings.broker.startswith(("amqp", "pyamqp")):
            return super().send_task(*args, **kwargs)
        from amqp.exceptions import MessageNacked, PreconditionFailed
        from celery.utils import uuid
        from kombu.exceptions import OperationalError

        from tasks.client.publish import full_queue, nacked, tls_refused, unconfirmed
        from tasks.wire.topology import mismatched_queue

        kwargs["task_id"] = kwargs.get("task_id") or uuid()
        kwargs.setdefault("confirm_timeout", settings.publish_confirm_timeout_s)
        kwargs.setdefault("timeout", settings.publish_confirm_timeout_s)  # the socket write
        retries = settings.publish_retries if kwargs.get("retry", True) else 0
        for attempt in range(retries + 1):
            try:
                return super().send_task(*args, **kwargs)
            except PreconditionFailed as e:  # the queue exists with other arguments
                raise (mismatched_queue(e) or unconfirmed(kwargs["task_id"], e, 0)) from e
            except (OperationalError, MessageNacked, OSError, TimeoutError) as e:
                refused = tls_refused(kwargs["task_id"], e)
                if refused is not None:
                    raise refused from e
                if not nacked(e):
                    raise unconfirmed(kwargs["task_id"], e, retries) from e
                full = full_queue(self, getattr(_routed, "queue", None), kwargs["task_id"])
                if full is not None:
                    raise full from e
                if attempt == retries:
                    raise unconfirmed(kwargs["task_id"], e, retries, nacks=attempt + 1) from e
                time.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def producer_or_acquire(self, producer: Any = None) -> Any:
        """Celery's, except for many publishes at once (a ``group``, a chord's header).

        Celery calls this with no producer from ``send_task`` (one message) and
        from ``group.apply_async`` (many, one per task).  For the latter, on
        RabbitMQ, it yields a producer whose publishes do not wait: the confirms
        are awaited together when the group has published
        (:func:`tasks.client.publish.pipelined`), so a returned
        ``group(...).apply_async()`` is still durable, and a nacked or
        unconfirmed message raises ``PublishFailed`` naming its task id.
        """
        if (
            producer is not None
            or bool(getattr(self._publishing, "depth", 0))
            or getattr(self._publishing, "pipelining", False)
            or self.conf.task_always_eager
            or self.infer_settings.embedded
            or not self.infer_settings.broker.startswith(("amqp", "pyamqp"))
        ):
            return super().producer_or_acquire(producer)
        return self._pipelined_producer()

    @contextmanager
    def _pipelined_producer(self) -> Iterator[Any]:
        from tasks.client.publish import pipelined

        self._publishing.pipelining = True
        try:
            with pipelined(self) as (producer, _):
                yield producer
        finally:
            self._publishing.pipelining = False

    @property
    def infer_settings(self) -> Settings:
        """The settings, read from the environment on first use unless given."""
        if self._infer_settings is None:
            self._infer_settings = Settings.from_env()
        return self._infer_settings

    @property
    def router(self) -> CapabilityRouter:
        """This app's capability router in this process, built on first use."""
        return self.route.router

    @property
    def built_router(self) -> CapabilityRouter | None:
        """This app's router if something has routed or asked for it; never builds one."""
        return self.route.built


def _ensure_dirs(settings: Settings) -> None:
    """Create the local folders the embedded broker and the file result backend need."""
    for sub in ("broker/queue", "broker/control", "results"):
        (settings.home / sub).mkdir(parents=True, exist_ok=True)


def broker_use_ssl(settings: Settings) -> dict[str, Any] | None:
    """py-amqp TLS options for an amqps:// broker (certificate verified), else None."""
    if not (settings.broker_url or "").startswith("amqps://"):
        return None
    import ssl
    from urllib.parse import urlsplit

    # py-amqp checks the certificate's names only when given server_hostname:
    # without it any certificate of the trusted CA passes, whatever host it names.
    options: dict[str, Any] = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": urlsplit(settings.broker_url or "").hostname,
    }
    if settings.broker_tls_ca is not None:
        options["ca_certs"] = str(settings.broker_tls_ca)
    if settings.broker_tls_cert is not None and settings.broker_tls_key is not None:
        options["certfile"] = str(settings.broker_tls_cert)
        options["keyfile"] = str(settings.broker_tls_key)
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration ``settings`` stand for (task routes aside: each app adds its own)."""
    transport_options: dict[str, Any] = {}
    if settings.embedded:
        _ensure_dirs(settings)
        queue = str(settings.home / "broker" / "queue")
        transport_options = {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "control_folder": str(settings.home / "broker" / "control"),
            "polling_interval": settings.embedded_poll_interval,
        }
    elif settings.broker.startswith(("amqp", "pyamqp")):
        # Wait for the broker's ack of every publish: a message is either
        # confirmed on the broker or the publish raises.
        transport_options = {"confirm_publish": True}
    if settings.result_backend is None:  # the file result backend, whatever the broker
        _ensure_dirs(settings)
    return {
        "broker_url": settings.broker,
        # The embedded broker writes each message file atomically (tasks.wire.embedded).
        "broker_transport": "tasks.wire.embedded:Transport" if settings.embedded else None,
        "result_backend": settings.backend,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_use_ssl": broker_use_ssl(settings) or False,
        "task_serializer": settings.serializer,
        "result_serializer": settings.serializer,
        "accept_content": list(SERIALIZERS),
        "result_accept_content": list(SERIALIZERS),
        "event_serializer": "json",
        # At-least-once: ack after the task ran, requeue when the pool
        # child dies; the queue's delivery limit ends poison loops.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_delivery_mode": "persistent",
        # Ride out a broker restart instead of failing the caller at once;
        # after the retries the caller gets the publish error.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": settings.publish_retries,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        "broker_heartbeat": settings.broker_heartbeat,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker waits for its broker forever
        # A connection loss requeues the unacked messages on the broker:
        # stop running them here, or they would run twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A redelivered message whose SUCCESS is stored is acked, not rerun
        # (tasks.worker.dedup extends this to republished copies).
        "worker_deduplicate_successful_tasks": settings.deduplicate,
        "result_backend_always_retry": True,
        "result_backend_max_retries": settings.backend_retries,
        "worker_detect_quorum_queues": True,
        # Quorum queues disable global QoS, so ETA/countdown tasks use
        # Celery's native delayed delivery, which needs topic exchanges.
        "task_default_exchange_type": "topic",
        "task_create_missing_queue_exchange_type": "topic",
        "worker_prefetch_multiplier": prefetch_multiplier(settings),
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "result_expires": settings.result_expires,
        "result_extended": settings.result_extended,
        "task_track_started": settings.track_started,
        "task_default_queue": "cpu",
        "task_send_sent_event": settings.sent_events,
        "worker_send_task_events": settings.task_events,
        "worker_consumer": "tasks.worker.consumer:TelemetryConsumer",
        "worker_proc_alive_timeout": settings.worker_init_timeout,
        "broker_channel_error_retry": True,
    }


def prefetch_multiplier(settings: Settings) -> int:
    """Messages reserved per pool process: a batching worker reserves whole batches.

    A batching worker (``INFER_BATCHING``, prefork, one child) must hold a
    batch's worth of unacked messages for a batch to form: it reserves
    ``INFER_BATCH_RESERVE`` (2) times the largest ``max_batch_size`` of any
    model, one batch computing while the next fills.  On quorum queues,
    which have no global QoS, Celery applies it per consumer
    (``worker_detect_quorum_queues``).  The cost: those messages are not
    available to another worker until this one acks or dies.
    """
    if not settings.batching:
        return settings.prefetch_multiplier
    from tasks.wire.catalog import local_catalog

    specs = [s for e in local_catalog(settings).entries() for s in e.versions.values()]
    largest = max([settings.max_batch_size, *(s.max_batch_size or 0 for s in specs)])
    return max(settings.prefetch_multiplier, settings.batch_reserve * largest)


app = InferenceApp()
app.conf.include = WORKER_MODULES


# The queue this thread's last publish went to (default exchange: the routing key), which a
# nacked publish checks for being full (tasks.client.publish.full_queue).
_routed = threading.local()


@before_task_publish.connect
def _stamp_sent_at(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    routing_key: str | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    _routed.queue = routing_key
    # The signal fires for every Celery app in the process: stamp only our tasks.
    if sender in app.tasks and properties is not None:
        # Celery turns expires= into a per-message TTL: a request expiring in a class queue
        # would be dead-lettered to <class>.dead and its caller never answered.  The worker
        # drops it instead, storing DeadlineExceeded (tasks.worker.expired).
        properties.pop("expiration", None)
    if headers is not None and sender in app.tasks:
        headers.setdefault(SENT_AT_HEADER, time.time())
        args, kwargs = (body or ((), {}))[:2] if isinstance(body, tuple | list) else ((), {})
        # What Flower, events and logs show: shapes and sizes, never tensor bytes.
        headers["argsrepr"], headers["kwargsrepr"] = display_call(args, kwargs)


def display_call(args: Any, kwargs: Any) -> tuple[str, str]:
    """(argsrepr, kwargsrepr) of a call as Flower, events and logs show it: no tensor bytes.

    ``infer.apply_async`` passes them to Celery, which then skips its own
    ``saferepr`` of the arguments (measured: 12% of a client's publishing CPU).
    """
    argsrepr = "(" + ", ".join(display(a) for a in args or ()) + ")"
    kwargsrepr = "{" + ", ".join(f"{k!r}: {display(v)}" for k, v in (kwargs or {}).items()) + "}"
    return argsrepr, kwargsrepr
