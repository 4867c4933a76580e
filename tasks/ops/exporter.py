"""``python -m tasks.ops.exporter``: queue metrics for Prometheus, the numbers autoscalers use.

Flower has no queue-length metric to scale on, and a worker cannot report the
queue it is missing from, so this small process reads the queues and serves
them on ``INFER_EXPORTER_ADDR:INFER_EXPORTER_PORT`` (default
``127.0.0.1:9809``), every ``INFER_EXPORTER_INTERVAL_S`` (2 s).  Run one per
fleet (registry namespace); it needs RabbitMQ and reads the capability
registry on the result backend.

Which queues: every live worker's direct queue (kind ``direct``) and class
queue (kind ``class``), from the capability registry, plus the class queues
named with ``--queue`` (default: the app's default queue, ``cpu``), so an
empty fleet still reports the depth a Kubernetes autoscaler scales up from.

How: one AMQP connection, one passive ``queue.declare`` per queue (ready
messages and consumers; nothing is consumed or created), with timeouts of
half the interval.  A poll that fails (no broker, no registry) is counted in
``infer_exporter_polls_total{outcome}`` and drops every queue series until a
poll succeeds: a scrape shows one consistent poll, or no queue data at all,
never stale numbers.

Per queue, labels ``queue`` and ``kind`` (see :func:`queue_samples`):

- ``infer_queue_messages``: ready messages (not counting the unacked ones
  workers hold);
- ``infer_queue_consumers``;
- ``infer_queue_oldest_age_seconds``: an upper bound on the age of the oldest
  ready message, from the workers' ``queue_heads``;
- ``infer_queue_service_rate``: requests/s the live workers consuming the
  queue complete (the sum of their advertised ``service_rate``);
- ``infer_queue_expected_drain_seconds``: ready messages / that rate, at most
  :data:`DRAIN_CAP_S`, which is also its value when nothing drains the queue.

And ``infer_exporter_polls_total{outcome}``,
``infer_exporter_last_poll_timestamp_seconds`` (the last successful poll).
Nothing happens at import but definitions; ``--check`` is the healthcheck.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from routing.capabilities import WorkerCapabilities
from tasks.worker.broker_probe import BrokerUnreachable

if TYPE_CHECKING:
    from routing.registry import RegistryStore

__all__ = [
    "DRAIN_CAP_S",
    "OUTCOMES",
    "SERVED_METRICS",
    "QueueCollector",
    "QueuePoller",
    "QueueSample",
    "live_workers",
    "main",
    "queue_samples",
    "watched_queues",
]

log = logging.getLogger(__name__)

# The drain time reported when the queue has ready messages and nothing measured drains it,
# and the most ever reported: "an hour or more".  Finite, so a KEDA Prometheus trigger gets a
# number above any sensible threshold and scales up (+Inf is not a quantity the HPA accepts,
# and a missing sample reads as 0 there, which would never scale up from zero).
DRAIN_CAP_S = 3600.0

SERVED_METRICS: tuple[str, ...] = (
    "infer_queue_messages",
    "infer_queue_consumers",
    "infer_queue_oldest_age_seconds",
    "infer_queue_service_rate",
    "infer_queue_expected_drain_seconds",
    "infer_exporter_polls_total",
    "infer_exporter_last_poll_timestamp_seconds",
)
OUTCOMES = ("ok", "broker_unreachable", "registry_unreachable", "error")
KINDS = ("class", "direct")


@dataclass(frozen=True)
class QueueSample:
    """What one poll measured of one queue (None: the sample is left out)."""

    queue: str
    kind: str  # "class" or "direct"
    messages: int
    consumers: int
    service_rate: float
    drain_s: float
    oldest_age_s: float | None


def live_workers(
    records: Iterable[WorkerCapabilities], now: float, ttl_s: float
) -> list[WorkerCapabilities]:
    """The records whose heartbeat is at most ``ttl_s`` old (the registry's own expiry rule)."""
    return [w for w in records if w.heartbeat >= now - ttl_s]


def watched_queues(
    workers: Iterable[WorkerCapabilities], class_queues: Sequence[str] = ()
) -> dict[str, str]:
    """queue -> kind: each worker's direct and class queue, and ``class_queues``; sorted."""
    kinds: dict[str, str] = {q: "class" for q in class_queues if q}
    workers = list(workers)
    for w in workers:
        if w.device_class_queue:
            kinds[w.device_class_queue] = "class"
    for w in workers:  # a worker's own queue is direct, whatever else names it
        kinds[w.queue] = "direct"
    return dict(sorted(kinds.items()))


def _head_bound(head: object, now: float) -> float | None:
    """``wait_s + (now - at)`` of a ``queue_heads`` entry ``[wait_s, at]``; None if malformed."""
    if not isinstance(head, list | tuple) or len(head) != 2:
        return None
    wait_s, at = head
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in (wait_s, at)):
        return None
    return max(0.0, float(wait_s)) + max(0.0, now - float(at))


def queue_samples(
    workers: Iterable[WorkerCapabilities],
    counts: Mapping[str, tuple[int, int]],
    now: float,
    class_queues: Sequence[str] = (),
    drain_cap_s: float = DRAIN_CAP_S,
) -> list[QueueSample]:
    """The samples of one poll: ``counts`` (queue -> (ready, consumers)) and live ``workers``.

    - **Service rate**: the sum of ``service_rate`` over the workers that consume
      the queue and can (``accepting``): a direct queue's own worker, or every
      worker whose class queue it is; 0 while the broker counts no consumer on it.
    - **Expected drain**: ready messages / service rate, capped at
      ``drain_cap_s``; 0 with no messages, ``drain_cap_s`` when messages wait
      and the rate is 0 (no worker, or none has measured a rate yet).
    - **Oldest age**: each worker's ``queue_heads[queue] = [wait_s, at]`` says it
      took, at ``at``, a message published ``wait_s`` earlier, i.e. at ``at -
      wait_s``.  Queues are FIFO, so every message still ready was enqueued after
      it, and the head is at most ``now - (at - wait_s)`` old.  Each report is a
      bound; the smallest (the most recently published message taken) is
      reported.  0 with no ready messages; left out when messages wait and no
      live worker has reported taking one from this queue.

    Queues not in ``counts`` (not polled) are skipped; ``workers`` must be the live ones.
    """
    workers = list(workers)
    out = []
    for queue, kind in watched_queues(workers, class_queues).items():
        if queue not in counts:
            continue
        messages, consumers = counts[queue]
        consuming = [
            w
            for w in workers
            if (w.queue if kind == "direct" else w.device_class_queue) == queue and w.accepting
        ]
        # What the broker counts wins: a queue nobody consumes right now drains at 0.
        rate = sum(max(0.0, w.service_rate) for w in consuming) if consumers > 0 else 0.0
        if messages <= 0:
            drain = 0.0
        elif rate > 0:
            drain = min(messages / rate, drain_cap_s)
        else:
            drain = drain_cap_s
        bounds = [
            b for w in workers if (b := _head_bound(w.queue_heads.get(queue), now)) is not None
        ]
        oldest: float | None = 0.0 if messages <= 0 else (min(bounds) if bounds else None)
        out.append(QueueSample(queue, kind, messages, consumers, rate, drain, oldest))
    return out


class QueueCollector(Collector):
    """Serves the last successful poll's samples and the exporter's own health."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[QueueSample] = []
        self._polls = dict.fromkeys(OUTCOMES, 0)
        self._last_ok = 0.0

    def record(self, outcome: str, samples: list[QueueSample], at: float) -> None:
        """One poll's outcome; anything but ``ok`` drops every queue series."""
        with self._lock:
            self._polls[outcome] += 1
            self._samples = samples if outcome == "ok" else []
            if outcome == "ok":
                self._last_ok = at

    def collect(self) -> Iterator[Any]:
        with self._lock:
            samples, polls, last_ok = list(self._samples), dict(self._polls), self._last_ok
        labels = ["queue", "kind"]
        families = {
            "messages": GaugeMetricFamily(
                "infer_queue_messages", "Ready messages in the queue", labels=labels
            ),
            "consumers": GaugeMetricFamily(
                "infer_queue_consumers", "Consumers of the queue", labels=labels
            ),
            "oldest_age_s": GaugeMetricFamily(
                "infer_queue_oldest_age_seconds",
                "Upper bound on the age of the oldest ready message (from the workers' latest takes)",
                labels=labels,
            ),
            "service_rate": GaugeMetricFamily(
                "infer_queue_service_rate",
                "Requests/s the live workers consuming the queue complete (measured)",
                labels=labels,
            ),
            "drain_s": GaugeMetricFamily(
                "infer_queue_expected_drain_seconds",
                f"Ready messages / service rate, at most {DRAIN_CAP_S:g} (also when nothing drains)",
                labels=labels,
            ),
        }
        for s in samples:
            for attr, family in families.items():
                value = getattr(s, attr)
                if value is not None:
                    family.add_metric([s.queue, s.kind], float(value))
        yield from families.values()
        counter = CounterMetricFamily(
            "infer_exporter_polls", "Queue polls by outcome", labels=["outcome"]
        )
        for outcome, n in polls.items():
            counter.add_metric([outcome], n)
        yield counter
        yield GaugeMetricFamily(
            "infer_exporter_last_poll_timestamp_seconds",
            "Wall time of the last successful poll (0: none yet)",
            last_ok,
        )


class QueuePoller:
    """One poll: the registry, then one passive declare per watched queue.

    ``counts(queue)`` is (ready messages, consumers), raising
    :class:`~tasks.worker.broker_probe.BrokerUnreachable` when no broker answers;
    records older than ``ttl_s`` (two heartbeats) are dead workers.
    """

    def __init__(
        self,
        store: RegistryStore,
        counts: Callable[[str], tuple[int, int]],
        ttl_s: float,
        class_queues: Sequence[str],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.counts = counts
        self.ttl_s = ttl_s
        self.class_queues = list(class_queues)
        self.now = now
        self.error = ""  # why the last poll failed

    def poll(self) -> tuple[str, list[QueueSample]]:
        """(outcome, samples); samples are empty unless the outcome is ``ok``."""
        self.error = ""
        try:
            records = self.store.load()
        except Exception as e:
            self.error = f"registry: {type(e).__name__}: {e}"
            return "registry_unreachable", []
        now = self.now()
        workers = live_workers(records, now, self.ttl_s)
        try:
            counts = {q: self.counts(q) for q in watched_queues(workers, self.class_queues)}
        except BrokerUnreachable as e:
            self.error = f"broker: {e}"
            return "broker_unreachable", []
        except Exception as e:  # a surprise is counted, never the end of the exporter
            log.exception("queue poll failed")
            self.error = f"{type(e).__name__}: {e}"
            return "error", []
        return "ok", queue_samples(workers, counts, now, self.class_queues)


def run(
    poller: QueuePoller, collector: QueueCollector, interval_s: float, stop: threading.Event
) -> None:
    """Poll every ``interval_s`` until ``stop``; log when polls start and stop failing."""
    failing: str | None = None
    while not stop.is_set():
        started = time.monotonic()
        outcome, samples = poller.poll()
        collector.record(outcome, samples, poller.now())
        if outcome != "ok" and failing is None:
            log.warning(
                "queue poll failed (%s): queue series dropped until one succeeds", poller.error
            )
        elif outcome == "ok" and failing is not None:
            log.warning("queue polls succeed again")
        failing = None if outcome == "ok" else outcome
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))


def check(addr: str, port: int, max_age_s: float) -> str | None:
    """Why the exporter at ``addr:port`` is unhealthy (no answer, no recent poll), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    host = "127.0.0.1" if addr in ("0.0.0.0", "") else addr  # noqa: S104 - compared, not bound
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as e:
        return f"no answer on {host}:{port}: {e}"
    last = next(
        (
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "infer_exporter_last_poll_timestamp_seconds"
        ),
        0.0,
    )
    age = time.time() - last
    return None if age <= max_age_s else f"no successful poll for {age:.0f} s"


def main(argv: list[str] | None = None) -> int:
    from tasks.app import app

    settings = app.infer_settings
    parser = argparse.ArgumentParser(prog="python -m tasks.ops.exporter", description=__doc__)
    parser.add_argument(
        "--queue",
        action="append",
        default=None,
        help=f"a class queue to report even with no worker (repeat; default {app.conf.task_default_queue})",
    )
    parser.add_argument("--addr", default=settings.exporter_addr, help="listen address")
    parser.add_argument("--port", type=int, default=settings.exporter_port, help="port")
    parser.add_argument(
        "--interval", type=float, default=settings.exporter_interval_s, help="poll period, s"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="healthcheck: exit 0 if the exporter on --addr:--port polled successfully lately",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.check:
        why = check(args.addr, args.port, max(3 * args.interval, 10.0))
        print(f"exporter: {why or 'healthy'}", file=sys.stderr if why else sys.stdout)
        return 1 if why else 0
    if settings.embedded or not settings.broker.startswith(("amqp", "pyamqp")):
        print(
            "exporter: it reads RabbitMQ's queues and the registry on Redis: set "
            "CELERY_BROKER_URL=amqp://... and CELERY_RESULT_BACKEND=redis://...",
            file=sys.stderr,
        )
        return 2
    from prometheus_client import start_http_server

    from tasks.wire.backend import registry_store
    from tasks.worker.broker_probe import QueueDepth

    class_queues = args.queue or [app.conf.task_default_queue]
    depth = QueueDepth(app, class_queues[0], timeout_s=max(0.2, args.interval / 2))
    collector = QueueCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _ = start_http_server(args.port, args.addr, registry=registry)
    except OSError as e:
        print(f"exporter: cannot listen on {args.addr}:{args.port} ({e})", file=sys.stderr)
        return 2
    port = server.server_address[1]
    print(
        f"queue exporter on http://{args.addr}:{port}/metrics, every {args.interval:g} s: "
        f"class queues {', '.join(class_queues)} and every live worker's queues",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    poller = QueuePoller(
        registry_store(settings), depth.counts, 2 * settings.heartbeat_s, class_queues
    )
    try:
        run(poller, collector, args.interval, stop)
    finally:
        depth.close()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
