"""The queue exporter's metric computation, with a fake clock and fake records (no servers)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from routing.capabilities import WorkerCapabilities
from routing.queues import direct_queue
from tasks.ops.exporter import (
    DRAIN_CAP_S,
    SERVED_METRICS,
    QueueCollector,
    QueuePoller,
    QueueSample,
    live_workers,
    queue_samples,
    watched_queues,
)
from tasks.worker.broker_probe import BrokerUnreachable

NOW = 1000.0
TTL = 4.0


def worker(name: str, fallback: str = "gpu", **kw: Any) -> WorkerCapabilities:
    base: dict[str, Any] = dict(
        name=f"{name}@h",
        queue=direct_queue(fallback, name),
        device_kind="cuda" if fallback == "gpu" else "cpu",
        device_name="H100",
        device_index=0,
        total_memory_mb=80_000,
        free_memory_mb=60_000,
        compute_capability=(9, 0),
        dtypes=("fp32",),
        heartbeat=NOW - 1,
        device_class_queue=fallback,
    )
    base.update(kw)
    return WorkerCapabilities(**base)


def by_queue(samples: list[QueueSample]) -> dict[str, QueueSample]:
    return {s.queue: s for s in samples}


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_direct_and_class_queues_of_live_workers_and_named_class_queues() -> None:
    workers = [worker("gpu0"), worker("gpu1"), worker("cpu0", "cpu")]
    assert watched_queues(workers, ["gpu", "cpu"]) == {
        "cpu": "class",
        "cpu.direct.cpu0": "direct",
        "gpu": "class",
        "gpu.direct.gpu0": "direct",
        "gpu.direct.gpu1": "direct",
    }
    # An empty fleet still reports the class queues it was told about.
    assert watched_queues([], ["gpu"]) == {"gpu": "class"}
    # A worker of an older release (no class queue advertised): its direct queue only.
    assert watched_queues([worker("old", device_class_queue="")]) == {"gpu.direct.old": "direct"}


def test_stale_records_are_dead_workers() -> None:
    fresh, stale = worker("gpu0", heartbeat=NOW - TTL), worker("gpu1", heartbeat=NOW - TTL - 0.1)
    assert live_workers([fresh, stale], NOW, TTL) == [fresh]
    # A dead worker's direct queue is no longer watched, and its rate no longer counts.
    live = live_workers([worker("gpu0", service_rate=5.0), stale], NOW, TTL)
    counts = {"gpu": (10, 1), "gpu.direct.gpu0": (0, 1), "gpu.direct.gpu1": (3, 0)}
    samples = by_queue(queue_samples(live, counts, NOW))
    assert set(samples) == {"gpu", "gpu.direct.gpu0"}
    assert samples["gpu"].service_rate == 5.0


def test_service_rate_sums_the_workers_consuming_the_queue() -> None:
    workers = [
        worker("gpu0", service_rate=40.0),
        worker("gpu1", service_rate=60.0),
        worker("cpu0", "cpu", service_rate=7.5),
        worker("gpu2", service_rate=1000.0, accepting=False),  # cannot consume now
    ]
    counts = {q: (0, 1) for q in watched_queues(workers)}
    samples = by_queue(queue_samples(workers, counts, NOW))
    assert samples["gpu"].service_rate == 100.0 and samples["gpu"].kind == "class"
    assert samples["cpu"].service_rate == 7.5
    assert samples["gpu.direct.gpu0"].service_rate == 40.0
    assert samples["gpu.direct.gpu0"].kind == "direct"
    assert samples["gpu.direct.gpu1"].service_rate == 60.0
    assert samples["gpu.direct.gpu2"].service_rate == 0.0


def test_a_queue_with_no_consumer_drains_at_zero_whatever_the_registry_says() -> None:
    # The registry says gpu0 consumes "gpu", but the broker counts no consumer (cancelled,
    # or reconnecting): nothing drains the queue now.
    workers = [worker("gpu0", service_rate=50.0)]
    samples = by_queue(queue_samples(workers, {"gpu": (5, 0), "gpu.direct.gpu0": (5, 1)}, NOW))
    assert samples["gpu"].service_rate == 0.0 and samples["gpu"].drain_s == DRAIN_CAP_S
    assert samples["gpu.direct.gpu0"].service_rate == 50.0
    assert samples["gpu.direct.gpu0"].drain_s == pytest.approx(0.1)


def test_messages_and_consumers_come_from_the_broker_counts() -> None:
    samples = by_queue(
        queue_samples([worker("gpu0")], {"gpu": (12, 3), "gpu.direct.gpu0": (2, 1)}, NOW)
    )
    assert (samples["gpu"].messages, samples["gpu"].consumers) == (12, 3)
    assert (samples["gpu.direct.gpu0"].messages, samples["gpu.direct.gpu0"].consumers) == (2, 1)


def test_a_queue_that_was_not_polled_is_left_out() -> None:
    assert by_queue(queue_samples([worker("gpu0")], {"gpu": (1, 1)}, NOW)).keys() == {"gpu"}


def test_expected_drain_is_backlog_over_the_fleet_rate() -> None:
    workers = [worker("gpu0", service_rate=40.0), worker("gpu1", service_rate=60.0)]
    counts = {"gpu": (250, 2), "gpu.direct.gpu0": (20, 1), "gpu.direct.gpu1": (0, 1)}
    samples = by_queue(queue_samples(workers, counts, NOW))
    assert samples["gpu"].drain_s == pytest.approx(2.5)  # 250 / (40 + 60)
    assert samples["gpu.direct.gpu0"].drain_s == pytest.approx(0.5)  # 20 / 40
    assert samples["gpu.direct.gpu1"].drain_s == 0.0  # nothing waits


def test_zero_rate_with_messages_waiting_reads_as_the_cap_never_inf() -> None:
    # No worker at all (the class queue KEDA scales from zero), and a worker that has not
    # measured a rate yet: finite, above any sensible threshold.
    for workers in ([], [worker("gpu0", service_rate=0.0)]):
        (gpu,) = [
            s for s in queue_samples(workers, {"gpu": (3, 0)}, NOW, ["gpu"]) if s.queue == "gpu"
        ]
        assert gpu.drain_s == DRAIN_CAP_S and math.isfinite(gpu.drain_s)
        assert gpu.service_rate == 0.0
    # A backlog that would take longer than the cap at the measured rate reads as the cap too.
    (gpu,) = queue_samples([], {"gpu": (10**9, 0)}, NOW, ["gpu"])
    assert gpu.drain_s == DRAIN_CAP_S
    (slow,) = [
        s
        for s in queue_samples([worker("gpu0", service_rate=0.001)], {"gpu": (10**6, 1)}, NOW)
        if s.queue == "gpu"
    ]
    assert slow.drain_s == DRAIN_CAP_S
    # An empty queue with no rate drains in 0 s: nothing to scale for.
    (empty,) = queue_samples([], {"gpu": (0, 0)}, NOW, ["gpu"], drain_cap_s=60.0)
    assert empty.drain_s == 0.0


def test_oldest_age_is_the_tightest_bound_from_the_workers_latest_takes() -> None:
    clock = Clock()
    # gpu0 took a message that had waited 0.5 s, 2 s ago: the head is at most 2.5 s old.
    # gpu1 took one that had waited 3 s, 10 s ago: a looser bound (13 s), also true.
    workers = [
        worker("gpu0", queue_heads={"gpu": [0.5, NOW - 2.0], "gpu.direct.gpu0": [0.1, NOW - 1]}),
        worker("gpu1", queue_heads={"gpu": [3.0, NOW - 10.0]}),
    ]
    counts = {"gpu": (5, 2), "gpu.direct.gpu0": (1, 1), "gpu.direct.gpu1": (4, 1)}
    samples = by_queue(queue_samples(workers, counts, clock()))
    assert samples["gpu"].oldest_age_s == pytest.approx(2.5)
    assert samples["gpu.direct.gpu0"].oldest_age_s == pytest.approx(1.1)
    # Messages wait in gpu1's direct queue but gpu1 never reported taking one: left out.
    assert samples["gpu.direct.gpu1"].oldest_age_s is None
    # Nobody takes anything: the bound grows with the clock, 1 s per second.
    clock.t += 30
    assert by_queue(queue_samples(workers, counts, clock()))["gpu"].oldest_age_s == pytest.approx(
        32.5
    )


def test_oldest_age_is_zero_when_nothing_is_ready_and_ignores_malformed_heads() -> None:
    workers = [worker("gpu0", queue_heads={"gpu": [1.0, NOW - 1]})]
    assert by_queue(queue_samples(workers, {"gpu": (0, 1)}, NOW))["gpu"].oldest_age_s == 0.0
    for bad in ("x", [1.0], [None, NOW], [float("nan"), NOW], [1.0, float("inf")], {"a": 1}):
        odd = [worker("gpu0", queue_heads={"gpu": bad})]
        assert by_queue(queue_samples(odd, {"gpu": (2, 1)}, NOW))["gpu"].oldest_age_s is None, bad
    # A clock that stepped back never makes a negative age; a negative wait counts as 0.
    ahead = [worker("gpu0", queue_heads={"gpu": [-1.0, NOW + 5]})]
    assert by_queue(queue_samples(ahead, {"gpu": (2, 1)}, NOW))["gpu"].oldest_age_s == 0.0


def test_a_dead_workers_heads_and_rate_are_not_used() -> None:
    dead = worker("gpu1", heartbeat=NOW - 60, service_rate=9.0, queue_heads={"gpu": [0.0, NOW]})
    live = live_workers([worker("gpu0"), dead], NOW, TTL)
    (gpu,) = [
        s
        for s in queue_samples(live, {"gpu": (4, 1), "gpu.direct.gpu0": (0, 1)}, NOW)
        if s.queue == "gpu"
    ]
    assert gpu.oldest_age_s is None and gpu.service_rate == 0.0 and gpu.drain_s == DRAIN_CAP_S


def scrape(
    collector: QueueCollector,
) -> tuple[set[str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    families = list(text_string_to_metric_families(text))
    values = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {s.name for f in families for s in f.samples}, values


def test_served_metrics_are_exactly_what_the_collector_exposes() -> None:
    collector = QueueCollector()
    samples = queue_samples(
        [worker("gpu0", service_rate=10.0, queue_heads={"gpu": [0.2, NOW - 1]})],
        {"gpu": (30, 1), "gpu.direct.gpu0": (0, 1)},
        NOW,
    )
    collector.record("ok", samples, NOW)
    names, values = scrape(collector)
    assert names == set(SERVED_METRICS)
    assert len(SERVED_METRICS) == len(set(SERVED_METRICS))
    gpu = frozenset({("queue", "gpu"), ("kind", "class")})
    assert values[("infer_queue_messages", gpu)] == 30
    assert values[("infer_queue_consumers", gpu)] == 1
    assert values[("infer_queue_service_rate", gpu)] == 10.0
    assert values[("infer_queue_expected_drain_seconds", gpu)] == 3.0
    assert values[("infer_queue_oldest_age_seconds", gpu)] == pytest.approx(1.2)
    direct = frozenset({("queue", "gpu.direct.gpu0"), ("kind", "direct")})
    assert values[("infer_queue_messages", direct)] == 0
    assert values[("infer_exporter_polls_total", frozenset({("outcome", "ok")}))] == 1
    assert values[("infer_exporter_last_poll_timestamp_seconds", frozenset())] == NOW


def test_a_failed_poll_drops_every_queue_series_and_is_counted() -> None:
    collector = QueueCollector()
    collector.record("ok", queue_samples([], {"gpu": (3, 0)}, NOW, ["gpu"]), NOW)
    collector.record("broker_unreachable", [], NOW + 2)
    names, values = scrape(collector)
    assert not {n for n in names if n.startswith("infer_queue_")}  # no stale numbers
    polls = {
        dict(k[1])["outcome"]: v for k, v in values.items() if k[0] == "infer_exporter_polls_total"
    }
    assert polls == {"ok": 1, "broker_unreachable": 1, "registry_unreachable": 0, "error": 0}
    # The last *successful* poll's time stays, so `time() - it` says how stale the data is.
    assert values[("infer_exporter_last_poll_timestamp_seconds", frozenset())] == NOW
    collector.record("ok", queue_samples([], {"gpu": (0, 0)}, NOW, ["gpu"]), NOW + 4)
    names, values = scrape(collector)
    assert "infer_queue_messages" in names
    assert values[("infer_exporter_last_poll_timestamp_seconds", frozenset())] == NOW + 4


class FakeStore:
    def __init__(self, records: list[WorkerCapabilities], fail: bool = False) -> None:
        self.records, self.fail = records, fail

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        self.records.append(caps)

    def remove(self, name: str) -> None:
        self.records = [r for r in self.records if r.name != name]

    def load(self) -> list[WorkerCapabilities]:
        if self.fail:
            raise ConnectionError("redis down")
        return list(self.records)


def test_poller_reads_the_registry_then_counts_each_watched_queue() -> None:
    asked: list[str] = []

    def counts(queue: str) -> tuple[int, int]:
        asked.append(queue)
        return (7, 1) if queue == "gpu" else (0, 0)

    store = FakeStore([worker("gpu0", service_rate=7.0), worker("gone", heartbeat=NOW - 100)])
    poller = QueuePoller(store, counts, TTL, ["gpu", "cpu"], now=Clock())
    outcome, samples = poller.poll()
    assert outcome == "ok" and poller.error == ""
    assert asked == ["cpu", "gpu", "gpu.direct.gpu0"]  # not the dead worker's queue
    assert by_queue(samples)["gpu"].drain_s == 1.0


def test_poller_outcomes_when_the_broker_or_the_registry_fails() -> None:
    def unreachable(queue: str) -> tuple[int, int]:
        raise BrokerUnreachable("timed out")

    def broken(queue: str) -> tuple[int, int]:
        raise RuntimeError("surprise")

    store = FakeStore([worker("gpu0")])
    assert QueuePoller(store, unreachable, TTL, ["gpu"], Clock()).poll() == (
        "broker_unreachable",
        [],
    )
    assert QueuePoller(store, broken, TTL, ["gpu"], Clock()).poll() == ("error", [])
    down = QueuePoller(FakeStore([], fail=True), lambda q: (0, 0), TTL, ["gpu"], Clock())
    assert down.poll() == ("registry_unreachable", [])
    assert "redis down" in down.error


def test_check_is_healthy_only_while_polls_succeed() -> None:
    from prometheus_client import start_http_server

    from tasks.ops.exporter import check
    from tasks.ops.launcher import free_port

    collector = QueueCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(0, "127.0.0.1", registry=registry)
    port = server.server_address[1]
    try:
        assert "no successful poll" in (check("127.0.0.1", port, 10.0) or "")  # none yet
        now = time.time()
        collector.record("ok", [], now - 30)
        assert "no successful poll for 30 s" in (check("0.0.0.0", port, 10.0) or "")
        collector.record("broker_unreachable", [], now)  # failing polls do not count
        assert check("127.0.0.1", port, 10.0) is not None
        collector.record("ok", [], now)
        assert check("127.0.0.1", port, 10.0) is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert "no answer" in (check("127.0.0.1", free_port(), 10.0) or "")
