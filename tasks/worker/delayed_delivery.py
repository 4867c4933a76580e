"""Celery's native delayed delivery, set up through one node of a cluster instead of each.

With quorum queues Celery schedules ETA and countdown tasks through the
broker (``DelayedDelivery``, a consumer bootstep).  On every consumer start,
so after every reconnect too, it declares its exchanges and binds every queue
through *each* URL of ``broker_url``, retrying each one three times with a
growing pause, and the consumer does not consume until that is done.  With a
node of the list down, that cost about 50 s in the multihost broker-kill
scenario before the worker consumed again.

Here a URL list is the nodes of one RabbitMQ cluster (the settings refuse
anything else), whose exchanges, queues and bindings are cluster-wide: they
are declared through the node the consumer has just connected to, and the
other nodes are tried, in order, only if that fails.  The declarations and
the validation are Celery's own (its step's helpers), so a Celery upgrade
that changes them changes them here too.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.utils.url import maybe_sanitize_url, parse_url

__all__ = ["ClusterDelayedDelivery"]

log = logging.getLogger(__name__)


def _node(url: str) -> tuple[str, int]:
    parts = parse_url(url)
    return (str(parts.get("hostname")), int(parts.get("port") or 5672))


class ClusterDelayedDelivery(DelayedDelivery):
    """``DelayedDelivery`` that stops at the first node of the cluster that takes it."""

    def start(self, c: Any) -> None:
        app = c.app
        try:
            self._validate_configuration(app)
        except ValueError as e:
            log.critical("Configuration validation failed: %s", e)
            raise
        self._validate_broker_urls(app.conf.broker_url)  # raises on a bad value
        # In the order given (Celery's own step walks them as a set, in no order).
        configured = app.conf.broker_url
        urls = configured.split(";") if isinstance(configured, str) else list(configured)
        connected = getattr(c, "connection", None)
        here = (str(connected.hostname), int(connected.port or 5672)) if connected else None
        for url in sorted(urls, key=lambda u: _node(u) != here):  # the connected node first
            try:
                self._setup_delayed_delivery(c, url)
            except Exception as e:
                log.warning(
                    "delayed delivery not set up through %s: %s", maybe_sanitize_url(url), e
                )
                continue
            return
        log.critical(
            "delayed delivery could not be set up through any broker node: ETA tasks will not run"
        )
