"""AMQP connection parameters for pika from the URL form Celery and kombu use."""

from __future__ import annotations

from typing import Any

__all__ = ["pika_parameters"]


def pika_parameters(url: str, heartbeat: int | None = None) -> Any:
    """pika parameters for a kombu-style AMQP URL (kombu's ``//`` is vhost ``/``; pika's is ``''``).

    ``heartbeat``: seconds, 0 to switch heartbeats off; None takes the broker's.
    """
    import pika
    from kombu.utils.url import parse_url

    parts = parse_url(url)
    return pika.ConnectionParameters(
        host=parts["hostname"] or "127.0.0.1",
        port=parts["port"] or 5672,
        virtual_host=parts["virtual_host"] or "/",
        credentials=pika.PlainCredentials(parts["userid"] or "guest", parts["password"] or "guest"),
        **({} if heartbeat is None else {"heartbeat": heartbeat}),
    )
