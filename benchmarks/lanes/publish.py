"""Lane ``publish``: confirmed publishes per second, one ``apply_async`` at a time vs ``infer.map``.

Each round publishes ``window_requests`` confirmed ``tasks.infer`` messages
(the ``mlp`` model, one seeded sample each) to a queue of this lane's own
that no worker consumes, twice: as that many sequential
``infer.apply_async(...)`` calls (each waits for its publisher confirm) and as
one ``infer.map(...)`` (:mod:`tasks.client.publish`: up to
``DEFAULT_WINDOW`` unconfirmed at once).  Both return only once every message
is confirmed, so each rate is publish time only, wall clock around the call
(the client-side checks and encoding of the samples included, the same for
both); nothing is consumed.  The two alternate which goes first from round to
round, and the queue is purged before each, so both publish to an empty
queue.  ``close`` deletes the queue and its dead-letter queue.

Summary: ``model``, ``messages`` (per variant per round), ``map_window``,
``sequential_msgs_s`` and ``map_msgs_s`` (median of rounds), ``map_confirm_wait_share``
(of ``infer.map``'s publish time, the share spent waiting for confirms, median),
``rounds``, ``per_round`` (``{"sequential_msgs_s": [...], "map_msgs_s": [...]}``).
The ratio ``pipelined_vs_sequential_publish_msgs`` is map over sequential.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, RoundConfig, delete_queues
from benchmarks.producers import request_input
from tasks import app, infer
from tasks.client.publish import DEFAULT_WINDOW
from tasks.wire.topology import declare_topology

__all__ = ["PublishLane"]

MODEL = "mlp"  # small messages: the publish path, not the payload, is what is measured
WARM_UP = 16  # messages of each variant before the first round (connections, channels)


class PublishLane(Lane):
    """``window_requests`` confirmed messages, sequential ``apply_async`` vs one ``infer.map``."""

    name = "publish"

    def __init__(self, ctx: LaneContext) -> None:
        super().__init__(ctx)
        self.queue = f"bench-publish-{ctx.run}"
        self.messages = 0
        self.rates: dict[str, list[float]] = {"sequential": [], "map": []}
        self.confirm_wait_share: list[float] = []
        self.last_confirm_wait_share = 0.0
        self._declared = False

    def setup(self) -> None:
        self._declared = True  # close deletes what a failed declare left
        declare_topology(app, [self.queue])  # the queue and its dead-letter queue
        self.sample = request_input(MODEL)
        self._sequential(WARM_UP)
        self._map(WARM_UP)

    def _purge(self) -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(self.queue)

    def _sequential(self, n: int) -> float:
        self._purge()
        started = time.perf_counter()
        results = [infer.apply_async((MODEL, self.sample), queue=self.queue) for _ in range(n)]
        elapsed = time.perf_counter() - started
        del results  # AsyncResult.__del__ drops each result subscription
        return n / elapsed

    def _map(self, n: int) -> float:
        self._purge()
        samples = [self.sample] * n
        started = time.perf_counter()
        result = infer.map(MODEL, samples, queue=self.queue)
        elapsed = time.perf_counter() - started
        timing = result.timing
        if timing.publish_s > 0:
            self.last_confirm_wait_share = timing.confirm_wait_s / timing.publish_s
        del result
        return n / elapsed

    def run_round(self, cfg: RoundConfig) -> None:
        n = self.messages = cfg.window_requests
        first_map = len(self.rates["map"]) % 2 == 1  # alternate which variant goes first
        order = ("map", "sequential") if first_map else ("sequential", "map")
        for variant in order:
            if variant == "map":
                self.rates["map"].append(self._map(n))
                self.confirm_wait_share.append(self.last_confirm_wait_share)
            else:
                self.rates["sequential"].append(self._sequential(n))

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        seq, mapped = self.rates["sequential"], self.rates["map"]
        return {
            "model": MODEL,
            "messages": self.messages,
            "map_window": DEFAULT_WINDOW,
            "sequential_msgs_s": round(statistics.median(seq), 1),
            "map_msgs_s": round(statistics.median(mapped), 1),
            "map_confirm_wait_share": round(statistics.median(self.confirm_wait_share), 3),
            "rounds": len(seq),
            "per_round": {
                "sequential_msgs_s": [round(r, 1) for r in seq],
                "map_msgs_s": [round(r, 1) for r in mapped],
            },
        }

    def close(self) -> None:
        if self._declared:
            delete_queues([self.queue])  # and its dead-letter queue
