"""Dynamic batching in a real threads-pool worker, and infer_many through a real chord."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from celery import chord

from models import errors
from models.registry import get_spec
from models.runner import reference_forward
from routing.queues import direct_queue
from tasks import app, infer, infer_many
from tasks.canvas import ManyResult, gather
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology
from tests.integration.conftest import queue_depth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def batching_worker(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[WorkerProcess]:
    name, fallback = f"bw-{run_id}", f"bw-{run_id}"
    w = WorkerProcess(
        name,
        "cpu",
        logdir=tmp_path_factory.mktemp("batching"),
        batching=True,
        queues=[direct_queue(fallback, name), fallback],
        preload=("cnn", "mlp"),
    )
    with w:
        yield w
    remove_topology(app, w.consumed_queues)


def test_200_concurrent_requests_batch_and_match_unbatched(
    batching_worker: WorkerProcess, weights_dir: Path
) -> None:
    x = np.random.default_rng(5).standard_normal((200, 3, 32, 32), dtype=np.float32)
    pending = [
        infer.apply_async(("cnn", x[i]), queue=batching_worker.own_queue) for i in range(200)
    ]
    replies = [p.get(timeout=120) for p in pending]
    got = np.concatenate(
        [np.frombuffer(r["outputs"]["data"], np.float32).reshape(1, 10) for r in replies]
    )
    expected = np.concatenate(
        [reference_forward(get_spec("cnn"), x[i : i + 1], weights_dir) for i in range(200)]
    )
    assert np.allclose(got, expected, atol=1e-4)
    sizes = [r["forward_batch"] for r in replies]
    assert max(sizes) > 1 and sum(s > 1 for s in sizes) > 100  # most rode in a shared pass
    assert all(r["batch_size"] == 1 for r in replies)  # each is still its own task and result
    assert len({p.id for p in pending}) == 200


def test_a_bad_request_in_a_batch_fails_alone(batching_worker: WorkerProcess) -> None:
    good = [np.full(64, i / 10, np.float32) for i in range(20)]
    bad_env = {"dtype": "float32", "shape": [64], "data": [float("nan")] * 64}
    pending = [infer.apply_async(("mlp", g), queue=batching_worker.own_queue) for g in good[:10]]
    bad = app.send_task("tasks.infer", args=("mlp", bad_env), queue=batching_worker.own_queue)
    pending += [infer.apply_async(("mlp", g), queue=batching_worker.own_queue) for g in good[10:]]
    with pytest.raises(errors.NonFiniteInput):
        bad.get(timeout=60)
    assert all(p.get(timeout=60)["batch_size"] == 1 for p in pending)


def test_infer_many_over_2000_inputs_returns_them_in_order(
    batching_worker: WorkerProcess, weights_dir: Path
) -> None:
    x = np.random.default_rng(9).standard_normal((2000, 64), dtype=np.float32)
    result = infer_many("mlp", x, batch_size=128, queue=batching_worker.own_queue)
    got = result.get(timeout=180)
    assert got.shape == (2000, 10)
    assert np.allclose(got, reference_forward(get_spec("mlp"), x, weights_dir), atol=1e-4)
    assert len(result.ranges) == 16 and result.ranges[-1] == (1920, 2000)


def test_infer_many_refuses_a_bad_chunk_before_publishing(batching_worker: WorkerProcess) -> None:
    x = np.zeros((300, 64), np.float32)
    x[250, 3] = np.inf
    before = queue_depth(batching_worker.own_queue)
    with pytest.raises(errors.NonFiniteInput, match=r"inputs \[200:300\]"):
        infer_many("mlp", x, batch_size=100, queue=batching_worker.own_queue)
    assert queue_depth(batching_worker.own_queue) == before == 0


def test_a_failing_chunk_is_reported_with_its_range(batching_worker: WorkerProcess) -> None:
    """A chunk that fails on the worker: the body never runs, the error names the range."""
    q = batching_worker.own_queue
    good = np.zeros((10, 64), np.float32)
    # The middle chunk asks for fp16: it passes the client's checks, and a CPU worker refuses it.
    header = [
        infer.s("mlp", good).set(queue=q),
        infer.s("mlp", good, "fp16").set(queue=q),
        infer.s("mlp", good).set(queue=q),
    ]
    body = chord(header)(gather.s().set(queue=q))
    result = ManyResult(body, body.parent, [(0, 10), (10, 20), (20, 30)])
    with pytest.raises(errors.ChunkFailed, match=r"inputs \[10:20\] failed: UnsupportedDtype"):
        result.get(timeout=60)
    partial = result.partial()
    assert set(partial) == {(0, 10), (20, 30)} and partial[(0, 10)].shape == (10, 10)


def test_worker_killed_mid_batch_loses_nothing(
    run_id: str, tmp_path: Path, weights_dir: Path
) -> None:
    name, fallback = f"bk-{run_id}", f"bk-{run_id}"
    queues = [direct_queue(fallback, name), fallback]
    victim = WorkerProcess(
        name, "cpu", logdir=tmp_path, batching=True, queues=queues, preload=("cnn",)
    )
    rescuer = WorkerProcess(
        f"br-{run_id}",
        "cpu",
        logdir=tmp_path,
        batching=True,
        queues=[direct_queue(fallback, f"br-{run_id}"), fallback],
        preload=("cnn",),
    )
    try:
        victim.start().wait_ready()
        x = np.random.default_rng(3).standard_normal((120, 3, 32, 32), dtype=np.float32)
        pending = [infer.apply_async(("cnn", x[i]), queue=victim.own_queue) for i in range(120)]
        deadline = time.monotonic() + 60
        while not pending[0].ready():  # mid-stream: some done, the rest reserved or queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim.kill()
        rescuer.start().wait_ready()  # consumes the fallback queue the direct queue dead-letters to
        replies = [p.get(timeout=120) for p in pending]
        assert len(replies) == 120 and all(r["model"] == "cnn" for r in replies)
        assert {r["worker"] for r in replies} <= {victim.hostname, rescuer.hostname}
        assert any(r["worker"] == rescuer.hostname for r in replies)
    finally:
        victim.stop()
        rescuer.stop()
        remove_topology(app, [*queues, direct_queue(fallback, f"br-{run_id}")])
