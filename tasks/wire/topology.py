"""The queue topology: Celery's queues, declared with the deployment's arguments.

Queue names and their x-arguments come from :mod:`routing.queues`.

Every task queue Celery knows about, the default ``cpu`` queue, a worker's
``-Q`` list and any queue named in ``apply_async(queue=...)``, is declared
with the arguments :func:`routing.queues.queue_arguments` derives from its
name: quorum type, delivery limit and dead-letter target, and for a direct
queue its TTL and fallback.  Workers and clients therefore always declare a
queue identically.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP, Queues
from kombu import Queue

from models.errors import ConfigurationError
from routing.queues import dead_letter_queue, queue_arguments

__all__ = [
    "InferenceAMQP",
    "InferenceQueues",
    "declare_topology",
    "mismatched_queue",
    "remove_topology",
]


class InferenceQueues(Queues):
    """Queues that carry the deployment's x-arguments."""

    def __init__(
        self,
        *args: Any,
        queue_type: str = "quorum",
        delivery_limit: int = 5,
        direct_ttl_ms: int = 4000,
        max_length: int = 0,
        **kwargs: Any,
    ) -> None:
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.direct_ttl_ms = direct_ttl_ms
        self.max_length = max_length
        super().__init__(*args, **kwargs)

    def __setitem__(self, name: str, queue: Queue) -> None:
        arguments = queue_arguments(
            queue.name, self.queue_type, self.delivery_limit, self.direct_ttl_ms, self.max_length
        )
        queue.queue_arguments = {**(queue.queue_arguments or {}), **arguments}  # type: ignore[attr-defined]
        super().__setitem__(name, queue)


class InferenceAMQP(AMQP):
    def Queues(self, *args: Any, **kwargs: Any) -> InferenceQueues:
        settings = self.app.infer_settings

        def build(*a: Any, **kw: Any) -> InferenceQueues:
            return InferenceQueues(
                *a,
                queue_type=settings.queue_type,
                delivery_limit=settings.delivery_limit,
                direct_ttl_ms=settings.direct_queue_ttl_ms,
                max_length=settings.max_queue_length,
                **kw,
            )

        self.queues_cls = build
        queues: InferenceQueues = super().Queues(*args, **kwargs)
        return queues


def mismatched_queue(error: BaseException) -> ConfigurationError | None:
    """A :class:`ConfigurationError` for RabbitMQ's refusal to redeclare a queue with other arguments.

    A queue made by an earlier release (or with another ``INFER_MAX_QUEUE_LENGTH``,
    ``INFER_QUEUE_TYPE``, ``INFER_DELIVERY_LIMIT`` or ``INFER_DIRECT_QUEUE_TTL_MS``)
    keeps its arguments; every client and worker must use the same settings.
    """
    from amqp.exceptions import PreconditionFailed

    if not isinstance(error, PreconditionFailed) or "inequivalent arg" not in str(error):
        return None
    return ConfigurationError(
        f"RabbitMQ refused a queue declaration: {error}. The queue exists with other arguments "
        "than these settings give it (INFER_MAX_QUEUE_LENGTH, INFER_QUEUE_TYPE, "
        "INFER_DELIVERY_LIMIT, INFER_DIRECT_QUEUE_TTL_MS): give every client and worker the "
        "same settings, or drain and delete the queue (rabbitmqctl delete_queue NAME) so it is "
        "declared again, or change its bound with a RabbitMQ policy instead"
    )


def declare_topology(app: Any, names: list[str]) -> list[str]:
    """Declare ``names``, the app's default queue and their dead-letter queues on RabbitMQ.

    Called by each worker at start.  The dead-letter queues must exist before
    a poison message is dead-lettered (RabbitMQ drops a dead letter it cannot
    route), and the default queue's exchange must exist for Celery's native
    delayed delivery to bind it.  Returns the queues declared (none off AMQP).
    """
    declared: list[str] = []
    with app.connection_for_write() as conn:
        if conn.transport.driver_type != "amqp":
            return declared
        conn.ensure_connection(max_retries=3)
        channel = conn.default_channel
        settings = app.infer_settings
        for name in dict.fromkeys([app.conf.task_default_queue, *names]):
            try:
                app.amqp.queues[name](channel).declare()
            except Exception as e:
                mismatch = mismatched_queue(e)
                if mismatch is not None:
                    raise mismatch from e
                raise
            declared.append(name)
            dead = dead_letter_queue(name)
            if dead is not None:
                arguments = queue_arguments(
                    dead, settings.queue_type, settings.delivery_limit, settings.direct_queue_ttl_ms
                )
                Queue(dead, queue_arguments=arguments)(channel).declare()
                declared.append(dead)
    return declared


def remove_topology(app: Any, names: list[str] | tuple[str, ...]) -> None:
    """Delete ``names`` and their dead-letter queues: the undo of :func:`declare_topology`.

    For the demo, the benchmark and the tests, which make their own queues per
    run; a queue that is already gone is skipped.
    """
    with app.connection_for_write() as conn:
        if conn.transport.driver_type != "amqp":
            return
        channel = conn.default_channel
        for name in dict.fromkeys(names):
            for queue in (name, dead_letter_queue(name)):
                if queue:
                    channel.queue_delete(queue)
