"""Batch assembly in the worker's main process: the three flush triggers, caps and order (fake clock)."""

from __future__ import annotations

from tasks.worker.assembly import BatchAssembler, BatchPolicy


def make(size: int = 4, wait_ms: float = 10.0) -> BatchAssembler[str]:
    return BatchAssembler(lambda key: BatchPolicy(max_batch_size=size, max_wait_ms=wait_ms))


def test_nothing_in_flight_sends_a_lone_request_at_once() -> None:
    a = make()
    a.add("k", "r1", now=0.0)
    assert a.take(now=0.0, free_slots=1, in_flight=0) == [("k", ["r1"])]
    assert len(a) == 0


def test_while_a_batch_runs_requests_wait_until_full() -> None:
    a = make(size=3)
    for i in range(2):
        a.add("k", f"r{i}", now=0.0)
    assert a.take(now=0.001, free_slots=1, in_flight=1) == []  # not full, not old: keep filling
    a.add("k", "r2", now=0.002)
    assert a.take(now=0.002, free_slots=1, in_flight=1) == [("k", ["r0", "r1", "r2"])]


def test_the_oldest_request_waiting_max_wait_flushes_its_key() -> None:
    a = make(size=8, wait_ms=10.0)
    a.add("k", "r0", now=0.0)
    a.add("k", "r1", now=0.004)
    assert a.take(now=0.0099, free_slots=1, in_flight=1) == []
    assert a.next_due(now=0.0099) is not None and a.next_due(now=0.0099) < 0.001  # type: ignore[operator]
    assert a.take(now=0.010, free_slots=1, in_flight=1) == [("k", ["r0", "r1"])]
    assert a.next_due(now=0.010) is None


def test_a_full_key_is_cut_at_its_cap_and_the_rest_waits() -> None:
    a = make(size=3)
    for i in range(7):
        a.add("k", f"r{i}", now=0.0)
    assert a.take(now=0.0, free_slots=1, in_flight=1) == [("k", ["r0", "r1", "r2"])]
    assert len(a) == 4


def test_no_more_batches_than_free_pool_processes() -> None:
    a = make(size=2)
    for i in range(6):
        a.add("k", f"r{i}", now=0.0)
    batches = a.take(now=0.0, free_slots=2, in_flight=0)
    assert [items for _, items in batches] == [["r0", "r1"], ["r2", "r3"]]
    assert a.take(now=0.0, free_slots=0, in_flight=2) == []


def test_keys_batch_apart_and_the_oldest_goes_first() -> None:
    a = make(size=2)
    a.add("b", "b0", now=0.0)
    a.add("a", "a0", now=0.001)
    a.add("b", "b1", now=0.002)
    a.add("a", "a1", now=0.003)
    first, second = a.take(now=0.003, free_slots=2, in_flight=0)
    assert first == ("b", ["b0", "b1"]) and second == ("a", ["a0", "a1"])


def test_samples_count_towards_the_cap() -> None:
    a = make(size=64)
    a.add("k", "big", now=0.0, samples=60)
    a.add("k", "small", now=0.0, samples=8)  # 68 > 64: goes in the next batch
    assert a.take(now=0.0, free_slots=1, in_flight=1) == [("k", ["big"])]
    a.add("k", "huge", now=0.0, samples=500)  # over the cap alone: still sent, alone
    assert a.take(now=1.0, free_slots=2, in_flight=0) == [("k", ["small"]), ("k", ["huge"])]


def test_a_redelivered_request_runs_alone() -> None:
    a = make(size=8)
    a.add("k", "r0", now=0.0)
    a.add("k", "again", now=0.0, alone=True)
    a.add("k", "r1", now=0.0)
    batches = a.take(now=0.0, free_slots=3, in_flight=0)
    assert sorted(items for _, items in batches) == [["again"], ["r0", "r1"]]


def test_drain_forgets_everything_waiting() -> None:
    a = make()
    a.add("k", "r0", now=0.0)
    a.add("j", "r1", now=0.0)
    assert sorted(a.drain()) == ["r0", "r1"] and len(a) == 0
    assert a.take(now=5.0, free_slots=1, in_flight=0) == []


def test_a_full_batch_may_wait_in_the_pool_queue_a_partial_one_may_not() -> None:
    a = make(size=2)
    for i in range(5):
        a.add("k", f"r{i}", now=0.0)
    # No free process: only full batches go ahead into the pool's queue, one per slot.
    assert a.take(now=0.0, free_slots=0, in_flight=1, queue_slots=1) == [("k", ["r0", "r1"])]
    assert a.take(now=0.0, free_slots=0, in_flight=2, queue_slots=0) == []
    assert a.take(now=0.0, free_slots=0, in_flight=1, queue_slots=5) == [("k", ["r2", "r3"])]
    assert len(a) == 1  # r4 alone is not full: it waits to grow


def test_a_request_s_limit_makes_its_key_full_sooner_and_it_joins_only_a_batch_within_it() -> None:
    a = make(size=8)
    a.add("k", "r0", now=0.0, limit=3)
    a.add("k", "r1", now=0.0, limit=3)
    assert a.take(now=0.0, free_slots=1, in_flight=1) == []  # 2 of its 3: not full
    a.add("k", "r2", now=0.0, limit=3)
    a.add("k", "r3", now=0.0, limit=3)
    assert a.take(now=0.0, free_slots=1, in_flight=1) == [("k", ["r0", "r1", "r2"])]
    # Requests without a limit ahead of a limited one: they go together up to its limit.
    b = make(size=8)
    for i in range(4):
        b.add("k", f"n{i}", now=0.0)
    b.add("k", "tight", now=0.0, limit=2)
    assert b.take(now=0.0, free_slots=1, in_flight=1) == [("k", ["n0", "n1", "n2", "n3"])]
    assert b.take(now=0.0, free_slots=1, in_flight=0) == [("k", ["tight"])]
    # A limit below a request's own samples is its own size: it still runs.
    c = make(size=8)
    c.add("k", "big", now=0.0, samples=5, limit=2)
    assert c.take(now=0.0, free_slots=1, in_flight=1) == [("k", ["big"])]
