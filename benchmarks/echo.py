"""``python -m benchmarks.echo URL QUEUE``: the raw AMQP echo consumer (pika).

Consumes ``QUEUE`` with prefetch 1 and manual acks (as late acks do),
publishes each body back to ``reply_to`` with its ``correlation_id``, then
acks.  Prints ``ready`` once consuming.  This is the messaging floor that the
Celery lanes are compared with.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import pika

from benchmarks.amqp import pika_parameters


def main(argv: list[str] | None = None) -> int:
    url, queue = (argv or sys.argv[1:])[:2]
    connection = pika.BlockingConnection(pika_parameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True)
    channel.basic_qos(prefetch_count=1)

    def on_message(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        ch.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(correlation_id=props.correlation_id),
            body=body,
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_consume(queue=queue, on_message_callback=on_message)
    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    print("ready", flush=True)
    try:
        channel.start_consuming()
    finally:
        if connection.is_open:
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
