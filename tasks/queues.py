"""Celery queue declarations that know about direct queues (see :mod:`routing.queues`).

Celery creates a missing queue (``-Q name`` on a worker, ``queue=name`` in
``apply_async``) through ``app.amqp.queues.new_missing``; ours adds the
dead-letter arguments to direct queues, so workers and clients always declare
them identically.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP, Queues
from kombu import Queue

from routing.queues import dead_letter_arguments, fallback_of

__all__ = ["InferenceAMQP", "InferenceQueues"]


class InferenceQueues(Queues):
    """Queues whose missing direct queues get a TTL and a dead-letter fallback."""

    direct_ttl_ms = 4000

    def new_missing(self, name: str) -> Queue:
        queue = super().new_missing(name)
        fallback = fallback_of(name)
        if fallback is None:
            return queue
        arguments = {
            **(queue.queue_arguments or {}),
            **dead_letter_arguments(fallback, self.direct_ttl_ms),
        }
        return Queue(name, queue.exchange, name, queue_arguments=arguments)


class InferenceAMQP(AMQP):
    queues_cls = InferenceQueues

    def Queues(self, *args: Any, **kwargs: Any) -> InferenceQueues:
        queues: InferenceQueues = super().Queues(*args, **kwargs)
        queues.direct_ttl_ms = self.app.infer_settings.direct_queue_ttl_ms
        return queues
