"""Queue names and arguments for the two kinds of inference queue.

Every worker consumes its **own direct queue**, named
``<fallback>.direct.<worker>`` (``gpu.direct.gpu0``), and the **shared queue**
of its device class (the fallback, ``gpu`` or ``cpu``).  A direct queue
carries a message TTL and dead-letters to its fallback through the default
exchange: a message still waiting there after the TTL (its worker died, or is
backed up) moves to the shared queue, where any live worker of the class
takes it.  Nothing is lost and nothing waits on a dead worker longer than the
TTL.  The name carries the fallback, so every client and worker derives
identical queue arguments from the name alone (RabbitMQ refuses a
redeclaration with different arguments).  On the embedded broker, which has
no TTL or dead-lettering, the arguments are ignored.
"""

from __future__ import annotations

__all__ = ["dead_letter_arguments", "direct_queue", "fallback_of"]

MARK = ".direct."


def direct_queue(fallback: str, worker: str) -> str:
    """The direct queue of ``worker`` whose messages fall back to ``fallback``."""
    if MARK in fallback or MARK in worker or not fallback or not worker:
        raise ValueError(f"bad direct queue parts {fallback!r}, {worker!r}")
    return f"{fallback}{MARK}{worker}"


def fallback_of(queue: str) -> str | None:
    """The fallback queue of a direct queue, or None for any other queue."""
    fallback, mark, worker = queue.partition(MARK)
    return fallback if mark and fallback and worker else None


def dead_letter_arguments(fallback: str, ttl_ms: int) -> dict[str, object]:
    """x-arguments of a direct queue: expire after ``ttl_ms`` into ``fallback``."""
    return {
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",  # the default exchange routes by queue name
        "x-dead-letter-routing-key": fallback,
    }
