"""Dramatiq, the second peer: ``dramatiq benchmarks.dramatiq_peer -p 1 -t 1 -Q QUEUE``.

Same RabbitMQ (publisher confirms on, as ours) and Redis results.  Dramatiq's
CLI imports this module and expects the broker to be set at import, so this
peer module (unlike the project's own) configures it here, from
``CELERY_BROKER_URL``/``CELERY_RESULT_BACKEND`` and ``BENCH_DRAMATIQ_QUEUE``.
Connections are opened lazily, on first use.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from benchmarks.amqp import pika_parameters

__all__ = ["noop"]

_params = pika_parameters(
    os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
)
broker = RabbitmqBroker(
    confirm_delivery=True,
    parameters=[
        {
            "host": _params.host,
            "port": _params.port,
            "virtual_host": _params.virtual_host,
            "credentials": _params.credentials,
        }
    ],
)
broker.add_middleware(
    Results(
        backend=RedisBackend(
            url=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
        )
    )
)
dramatiq.set_broker(broker)


@dramatiq.actor(
    store_results=True, max_retries=0, queue_name=os.environ.get("BENCH_DRAMATIQ_QUEUE", "bench")
)
def noop() -> None:
    """Do nothing."""
