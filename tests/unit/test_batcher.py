"""The dynamic batcher's assembly, timeout flush, memory cap and error isolation (fakes, fake clock)."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pytest

from tasks.worker.batcher import BatchPolicy, DynamicBatcher


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeModel:
    """Doubles its input; raises on a sample holding -1; records batch sizes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, int]] = []

    def __call__(self, key: Hashable, stacked: np.ndarray) -> tuple[np.ndarray, float]:
        self.calls.append((key, len(stacked)))
        if (stacked == -1).any():
            raise ValueError("poisoned sample")
        return stacked * 2, 1.5


DEFAULT = BatchPolicy(4, 10.0)


def make(
    policy: BatchPolicy = DEFAULT, cap: int | None = None
) -> tuple[DynamicBatcher, FakeModel, Clock]:
    model, clock = FakeModel(), Clock()
    batcher = DynamicBatcher(
        model, lambda key: policy, (lambda key, s: cap) if cap else None, clock
    )
    return batcher, model, clock


def enqueue(batcher: DynamicBatcher, key: str, value: float) -> object:
    # Bypass the runner thread: put the sample in the pending table as submit() would.
    from concurrent.futures import Future

    from tasks.worker.batcher import Pending

    future: Future[object] = Future()
    batcher._pending.setdefault(key, []).append(
        Pending(np.array([value]), future, batcher._clock())
    )
    return future


def test_batches_assemble_per_key_up_to_the_size_limit() -> None:
    batcher, _, clock = make()
    futures = [enqueue(batcher, "a", i) for i in range(6)] + [enqueue(batcher, "b", 9)]
    ready, next_due = batcher.take_ready(clock())
    assert [(r.key, len(r.items)) for r in ready] == [("a", 4)]  # full batch goes at once
    assert next_due == pytest.approx(0.010)  # the rest waits for the timeout
    for r in ready:
        batcher.run(r, clock())
    assert [f.result(0)[:2] for f in futures[:4]] == [
        (np.array([0.0]), 4),
        (np.array([2.0]), 4),
        (np.array([4.0]), 4),
        (np.array([6.0]), 4),
    ]
    assert not futures[4].done() and not futures[6].done()


def test_timeout_flushes_a_partial_batch() -> None:
    batcher, _, clock = make()
    f1, f2 = enqueue(batcher, "a", 1), enqueue(batcher, "a", 2)
    assert batcher.take_ready(clock())[0] == []
    clock.t += 0.009
    assert batcher.take_ready(clock())[0] == []
    clock.t += 0.002  # the oldest has now waited 11 ms > 10 ms
    ready, next_due = batcher.take_ready(clock())
    assert [len(r.items) for r in ready] == [2] and next_due is None
    batcher.run(ready[0], clock())
    _, size, wait_ms, compute_ms = f1.result(0)  # type: ignore[attr-defined]
    assert size == 2 and wait_ms == pytest.approx(11.0) and compute_ms == 1.5
    assert f2.result(0)[0] == np.array([4.0])  # type: ignore[attr-defined]


def test_memory_cap_limits_the_batch() -> None:
    batcher, _, clock = make(BatchPolicy(32, 10.0), cap=3)
    for i in range(7):
        enqueue(batcher, "a", i)
    ready, _ = batcher.take_ready(clock())
    assert [len(r.items) for r in ready] == [3, 3]  # capped by memory, not by the 32 limit
    clock.t += 1
    assert [len(r.items) for r in batcher.take_ready(clock())[0]] == [1]


def test_one_bad_sample_fails_alone() -> None:
    batcher, model, clock = make()
    futures = [enqueue(batcher, "a", v) for v in (1, -1, 3, 4)]
    (ready,), _ = batcher.take_ready(clock())
    batcher.run(ready, clock())
    assert isinstance(futures[1].exception(0), ValueError)  # type: ignore[attr-defined]
    assert [futures[i].result(0)[0][0] for i in (0, 2, 3)] == [2.0, 6.0, 8.0]  # type: ignore[attr-defined]
    assert [size for _, size in model.calls] == [4, 1, 1, 1, 1]  # the batch, then one by one


def test_submit_runs_through_the_real_thread() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, lambda key: BatchPolicy(8, 2.0))
    futures = [batcher.submit("k", np.array([float(i)])) for i in range(8)]
    assert [f.result(timeout=5)[0][0] for f in futures] == [2.0 * i for i in range(8)]
    batcher.stop()


def test_goes_at_once_when_every_active_request_is_waiting() -> None:
    model, clock = FakeModel(), Clock()
    active = [3]
    batcher = DynamicBatcher(
        model, lambda key: BatchPolicy(32, 50.0), None, clock, active=lambda: active[0]
    )
    enqueue(batcher, "a", 1)
    enqueue(batcher, "a", 2)
    assert batcher.take_ready(clock())[0] == []  # a third running task may still join
    enqueue(batcher, "a", 3)
    assert [len(r.items) for r in batcher.take_ready(clock())[0]] == [
        3
    ]  # all here: no timeout wait
    active[0] = 1
    enqueue(batcher, "b", 4)
    assert [len(r.items) for r in batcher.take_ready(clock())[0]] == [
        1
    ]  # a lone request is not delayed
