"""The capability heartbeat beats one at a time, whoever calls it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import torch

from routing.capabilities import WorkerCapabilities
from tasks.settings import Settings
from tasks.worker.heartbeat import Heartbeat


class _Store:
    def __init__(self) -> None:
        self.published: list[WorkerCapabilities] = []

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        self.published.append(caps)

    def remove(self, name: str) -> None:
        pass

    def load(self) -> list[WorkerCapabilities]:
        return list(self.published)


def test_concurrent_beats_never_overlap() -> None:
    # The loop beats from its thread while runtime.advertise() beats from a task's
    # (load_model): the queue-depth count's broker connection must never be read by both.
    inside, overlaps = [0], [0]
    guard = threading.Lock()

    def depth() -> int:
        with guard:
            inside[0] += 1
            overlaps[0] += inside[0] > 1
        time.sleep(0.01)  # a broker round trip
        with guard:
            inside[0] -= 1
        return 0

    cache: Any = SimpleNamespace(used_bytes=0, keys=lambda: [])
    runtime: Any = SimpleNamespace(device=torch.device("cpu"), cache=cache)
    store = _Store()
    beat = Heartbeat("w@h", "cpu.direct.w", "cpu", Settings(), runtime, store, depth)
    threads = [threading.Thread(target=beat.beat) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.published) == 8 and overlaps[0] == 0


def _heartbeat(depth: Any, store: _Store) -> Heartbeat:
    cache: Any = SimpleNamespace(used_bytes=0, keys=lambda: [])
    runtime: Any = SimpleNamespace(device=torch.device("cpu"), cache=cache)
    return Heartbeat("w@h", "cpu.direct.w", "cpu", Settings(max_in_flight=4), runtime, store, depth)


def test_a_worker_no_broker_answers_is_advertised_saturated_and_recovers() -> None:
    # Reaching Redis but no broker node (an asymmetric partition), it cannot consume: it
    # stays in the registry, at its in-flight limit, so routers send its requests elsewhere.
    from tasks.worker.broker_probe import BrokerUnreachable

    answers: list[int | Exception] = [2, BrokerUnreachable("timed out"), BrokerUnreachable("x"), 1]

    def depth() -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    store = _Store()
    beat = _heartbeat(depth, store)
    for _ in range(4):
        beat.beat()
    assert [c.in_flight for c in store.published] == [2, 4, 4, 1]


def test_a_queue_count_that_fails_otherwise_costs_no_beat() -> None:
    def depth() -> int:
        raise ValueError("a channel error")

    store = _Store()
    _heartbeat(depth, store).beat()
    assert [c.in_flight for c in store.published] == [0]


def test_a_worker_whose_consumer_stopped_is_advertised_saturated() -> None:
    # The main process's consumer reconnecting (Celery stopped its steps): alive, beating,
    # reachable, but nothing reaches it, so routers should send its requests elsewhere.
    consuming = [True, False, True]
    store = _Store()
    cache: Any = SimpleNamespace(used_bytes=0, keys=lambda: [])
    runtime: Any = SimpleNamespace(device=torch.device("cpu"), cache=cache)
    beat = Heartbeat(
        "w@h",
        "cpu.direct.w",
        "cpu",
        Settings(max_in_flight=4),
        runtime,
        store,
        lambda: 1,
        consuming=lambda: consuming[len(store.published)],
    )
    for _ in range(3):
        beat.beat()
    assert [c.in_flight for c in store.published] == [1, 4, 1]


def test_the_record_advertises_backlog_rate_and_whether_it_accepts(
    monkeypatch: Any,
) -> None:
    # Backlog: outstanding in the worker (the consumer's count) + its direct queue's ready
    # messages + its share of the class queue (ready over consumers, rounded up).
    from tasks.worker import heartbeat, load

    shared = load.SharedLoad(["mlp"], ["cpu.direct.w", "cpu"])
    meter = load.ServiceMeter(clock=lambda: 0.0)
    meter.arrived(3)
    shared.publish(meter, from_consumer=True)
    shared.head("cpu", 0.5, 7.0)
    monkeypatch.setattr(heartbeat.load, "shared", lambda: shared)
    consuming = [True, False]
    store = _Store()
    cache: Any = SimpleNamespace(used_bytes=0, keys=lambda: [])
    runtime: Any = SimpleNamespace(device=torch.device("cpu"), cache=cache)
    beat = Heartbeat(
        "w@h",
        "cpu.direct.w",
        "cpu",
        Settings(max_in_flight=4),
        runtime,
        store,
        lambda: 2,
        consuming=lambda: consuming[len(store.published)],
        class_depth=lambda: (7, 3),
    )
    beat.beat()
    beat.beat()
    first, second = store.published
    assert (
        first.backlog == 3 + 2 + 3 and first.accepting and first.queue_heads == {"cpu": [0.5, 7.0]}
    )
    assert not second.accepting  # its consumer stopped: routers and probes see it


def test_a_worker_whose_load_moved_beats_before_its_period(monkeypatch: Any) -> None:
    """Admission control reckons pending requests from the last beat: when the wait a worker's
    outstanding requests imply moves by more than LOAD_MOVED_S, or its rate by a tenth, it
    beats at once (from its 0.25 s loop) instead of waiting out INFER_HEARTBEAT_S."""
    from tasks.worker import heartbeat, load

    shared = load.SharedLoad(["mlp"], ["cpu.direct.w", "cpu"])
    clock = [0.0]
    meter = load.ServiceMeter(clock=lambda: clock[0])
    meter.served(100, 1.0, saturated=True)  # 100 req/s
    meter.arrived(10)  # 0.1 s of work
    shared.publish(meter, from_consumer=True)
    monkeypatch.setattr(heartbeat.load, "shared", lambda: shared)
    store = _Store()
    beat = _heartbeat(lambda: 0, store)
    assert not beat.load_moved()  # nothing advertised yet: the period decides
    beat.beat()
    assert not beat.load_moved()
    meter.arrived(5)  # 0.15 s: moved by 0.05 s, not worth a beat
    shared.publish(meter, from_consumer=True)
    assert not beat.load_moved()
    meter.arrived(10)  # 0.25 s: moved by 0.15 s
    shared.publish(meter, from_consumer=True)
    assert beat.load_moved()
    beat.beat()
    assert not beat.load_moved() and store.published[-1].backlog == 25
    clock[0] += 0.5
    meter.served(100, 1.25, saturated=True)  # the window now: 200 in 2.25 s, 89 req/s
    shared.publish(meter, from_consumer=True)
    assert beat.load_moved()  # the rate fell by more than a tenth
    # The loop beats early: with a 60 s period, a moved load is published within its tick.
    beat.beat()
    meter.arrived(30)
    shared.publish(meter, from_consumer=True)
    before = len(store.published)
    beat.settings = Settings(max_in_flight=4, heartbeat_s=60.0)
    loop = threading.Thread(target=beat._loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 5
    while len(store.published) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    beat._stop.set()
    loop.join(timeout=2)
    assert len(store.published) > before and store.published[-1].backlog == 55
