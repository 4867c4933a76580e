"""Queue names and arguments: class queues, direct queues and dead-letter queues.

Every worker consumes its **own direct queue**, named
``<fallback>.direct.<worker>`` (``gpu.direct.gpu0``), and the **shared queue**
of its device class (the fallback, ``gpu`` or ``cpu``).  A direct queue
carries a message TTL and dead-letters to its fallback through the default
exchange: a message still waiting there after the TTL (its worker died, or is
backed up) moves to the shared queue, where any live worker of the class
takes it.  Nothing is lent to a dead worker for longer than the TTL.

On RabbitMQ every task queue is a **quorum queue** (replicated, durable, and
the only kind with a delivery limit) unless ``INFER_QUEUE_TYPE=classic``.  A
quorum queue counts deliveries: a message delivered more than
``delivery_limit`` times (a poison task that kills its worker on every try)
is dead-lettered instead of looping forever.  Out of a class queue it goes to
``<class>.dead``, where an operator can inspect or replay it; out of a direct
queue it goes to its class queue first, so a routed poison message is
delivered at most ``2 * delivery_limit`` times in all.  Dead-lettering is
``at-least-once`` (RabbitMQ 3.10+): the broker keeps a message until the
dead-letter queue has confirmed it.

The names carry everything, so every client and worker derives identical
arguments from a queue's name alone (RabbitMQ refuses a redeclaration with
different arguments).  On the embedded broker the arguments are ignored.
"""

from __future__ import annotations

__all__ = [
    "DEAD_SUFFIX",
    "QUEUE_TYPES",
    "dead_letter_arguments",
    "dead_letter_queue",
    "direct_queue",
    "fallback_of",
    "own_queue",
    "queue_arguments",
]

MARK = ".direct."
DEAD_SUFFIX = ".dead"
QUEUE_TYPES = ("quorum", "classic")


def direct_queue(fallback: str, worker: str) -> str:
    """The direct queue of ``worker`` whose messages fall back to ``fallback``."""
    if MARK in fallback or MARK in worker or not fallback or not worker:
        raise ValueError(f"bad direct queue parts {fallback!r}, {worker!r}")
    return f"{fallback}{MARK}{worker}"


def fallback_of(queue: str) -> str | None:
    """The fallback queue of a direct queue, or None for any other queue."""
    fallback, mark, worker = queue.partition(MARK)
    return fallback if mark and fallback and worker else None


def own_queue(consumed: list[str]) -> str | None:
    """The direct queue among the queues a worker consumes (its own), or None."""
    return next((q for q in consumed if fallback_of(q) is not None), None)


def dead_letter_queue(queue: str) -> str | None:
    """Where ``queue`` dead-letters poison messages; None for a direct or dead-letter queue."""
    if fallback_of(queue) is not None or queue.endswith(DEAD_SUFFIX):
        return None
    return queue + DEAD_SUFFIX


def dead_letter_arguments(fallback: str, ttl_ms: int) -> dict[str, object]:
    """x-arguments of a direct queue: expire after ``ttl_ms`` into ``fallback``."""
    return {
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",  # the default exchange routes by queue name
        "x-dead-letter-routing-key": fallback,
    }


def queue_arguments(
    queue: str,
    queue_type: str = "quorum",
    delivery_limit: int = 5,
    direct_ttl_ms: int = 4000,
    max_length: int = 0,
) -> dict[str, object]:
    """The x-arguments every client and worker declares ``queue`` with.

    A task queue (class or direct) holds at most ``max_length`` ready
    messages (0: unbounded), with ``x-overflow=reject-publish``: past it the
    broker nacks a publish (the client raises ``Overloaded``) instead of
    queueing without bound.  What a direct queue dead-letters into a full
    class queue stays in the direct queue (at-least-once dead-lettering
    retries) until there is room.  Dead-letter queues are not bounded.
    """
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type {queue_type!r} is not one of {QUEUE_TYPES}")
    if queue.endswith(DEAD_SUFFIX):  # a dead-letter queue keeps what it gets
        return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    fallback = fallback_of(queue)
    arguments: dict[str, object] = {}
    if fallback is not None:
        arguments.update(dead_letter_arguments(fallback, direct_ttl_ms))
    if max_length:
        arguments["x-max-length"] = max_length
        arguments["x-overflow"] = "reject-publish"
    if queue_type == "classic":  # no delivery limit: documented in docs/guarantees.md
        return arguments
    if fallback is None:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = queue + DEAD_SUFFIX
    arguments.update(
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
        }
    )
    return arguments
