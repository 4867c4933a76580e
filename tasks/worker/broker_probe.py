"""How many messages wait in this worker's own queue, and whether the broker answers at all.

The capability heartbeat (:mod:`tasks.worker.heartbeat`) counts the ready
messages of the worker's direct queue into its advertised load.  It asks over
a broker connection of its own (the consumer's is the main process's, and not
thread-safe), with timeouts short enough that a silent broker (a cut cable
sends no RST) cannot hold a beat past the record's lifetime: every connect,
read and write gives up after a quarter of the heartbeat period, and a
connect tries each node of a broker URL list once (kombu's failover), so a
dead node costs one short timeout, not the beat.

A probe that cannot reach any broker raises :class:`BrokerUnreachable`; the
heartbeat then advertises the worker as saturated (``in_flight`` at its
limit), so routers send its requests to the workers that can consume them
while this one cannot, and no request is refused for it: when every worker
is cut off, they are all saturated alike and the router still picks one.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["BrokerUnreachable", "QueueDepth"]


class BrokerUnreachable(Exception):
    """No node of the broker URL list answered within the probe's timeout."""


class QueueDepth:
    """``probe()``: ready messages in ``queue`` (0 when the queue does not exist)."""

    def __init__(self, app: Any, queue: str, timeout_s: float) -> None:
        self.app = app
        self.queue = queue
        self.timeout_s = timeout_s
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            urls = self.app.infer_settings.broker_urls
            t = self.timeout_s
            self._conn = self.app.connection_for_write(
                connect_timeout=t,
                transport_options={
                    "confirm_publish": False,
                    "read_timeout": t,
                    "write_timeout": t,
                    # One try per node, no pause between them (kombu's failover cycle).
                    "max_retries": max(0, len(urls) - 1),
                    "interval_start": 0,
                    "interval_step": 0,
                    "interval_max": 0,
                },
            )
        return self._conn

    def __call__(self) -> int:
        return self.counts()[0]

    def counts(self, queue: str | None = None) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue`` (default: this probe's); (0, 0) if undeclared."""
        from amqp.exceptions import NotFound

        conn = self._connection()
        try:
            declared = conn.default_channel.queue_declare(queue=queue or self.queue, passive=True)
        except NotFound:  # not declared yet: nothing waits in it
            self.close()
            return 0, 0
        except Exception as e:
            self.close()
            raise BrokerUnreachable(f"{type(e).__name__}: {e}") from e
        return int(declared.message_count), int(declared.consumer_count)

    def close(self) -> None:
        """Drop the connection; the next probe connects afresh (to the next node first)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.maybe_switch_next()  # closes it; a dead node is not asked first again
            with contextlib.suppress(Exception):
                conn.release()
