"""SIGTERM during a batch: the worker finishes the batch and loses nothing (issue 17).

``docker stop`` and Kubernetes send SIGTERM to the worker's main process:
Celery's warm shutdown.  A batching worker must then finish the batch its pool
child is computing (store every result, ack every message), stop taking new
batches, and hand back what still waits in its batcher: those messages return
to the queue unacked, and a worker started afterwards serves them.

The model is a user's model from a repository folder whose forward pass takes
``SLOW_S`` (it sleeps, then applies a linear layer), so a batch is certainly in
the child when the signal arrives.  The worker loads the fault suite's
execution ledger: every request's body starts exactly once, on one worker or
the other, and none is lost.
"""

from __future__ import annotations

import os
import signal
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from amqp.exceptions import NotFound
from celery.result import AsyncResult
from safetensors.torch import save_file

from routing.queues import dead_letter_queue, direct_queue
from tasks import app
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology
from tasks.worker.command import worker_argv
from tests.integration.conftest import eventually, queue_depth
from tests.reliability.ledger_hook import LEDGER_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW_S = 1.5  # one forward pass of the slow model, whatever its batch size
LEDGER = ["--include", "tests.reliability.ledger_hook"]

MODULE = """
import time

from torch import nn


class Slow(nn.Module):
    def __init__(self, features: int, seconds: float) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 2)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x)


def build(features: int = 4, seconds: float = 1.0) -> nn.Module:
    return Slow(features, seconds)
"""

MODEL_TOML = f"""
description = "sleeps {SLOW_S} s per forward pass, then 4 features -> 2 logits"
kind = "torch"
memory_mb = 16

[torch]
builder = "slowmodel:build"
kwargs = {{ features = 4, seconds = {SLOW_S} }}

[inputs]
dtype = "float32"
accept = ["float64"]
shape = [4]

[outputs]
shape = [2]

[batching]
max_batch_size = 32
max_wait_ms = 2
"""


def slow_model(root: Path) -> dict[str, str]:
    """Write the module, its repository and weights under ``root``; the worker's environment."""
    (root / "slowmodel").mkdir()
    (root / "slowmodel" / "__init__.py").write_text(textwrap.dedent(MODULE))
    version = root / "repo" / "slow" / "1"
    version.mkdir(parents=True)
    (root / "repo" / "slow" / "model.toml").write_text(MODEL_TOML)
    torch.manual_seed(0)
    save_file(
        {"linear.weight": torch.randn(2, 4), "linear.bias": torch.randn(2)},
        str(version / "model.safetensors"),
    )
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "INFER_MODEL_REPOSITORY": str(root / "repo"),
        "PYTHONPATH": path,
        "INFER_BATCH_SIZING": "false",  # every batch as large as what waits
    }


def batching_worker(name: str, fallback: str, logdir: Path, env: dict[str, str]) -> WorkerProcess:
    queues = [direct_queue(fallback, name), fallback]
    return WorkerProcess(
        name,
        "cpu",
        logdir=logdir,
        batching=True,
        queues=queues,
        preload=("slow",),
        command=[*worker_argv(name, "cpu", queues), *LEDGER],
        env=env,
    )


@pytest.fixture
def ledger() -> Iterator[str]:
    key = f"infer:ledger:sigterm:{uuid.uuid4().hex[:8]}"
    yield key
    app.backend.client.delete(key)


def started(ledger: str) -> dict[str, int]:
    """Task id -> how many times its body started (the ledger)."""
    return {k.decode(): int(v) for k, v in app.backend.client.hgetall(ledger).items()}


def ready(queue: str) -> int:
    """Ready messages of ``queue``; 0 if it was never declared."""
    try:
        return queue_depth(queue)
    except NotFound:
        return 0


def succeeded(results: list[AsyncResult]) -> set[str]:
    """The ids whose SUCCESS is stored (one MGET: fast enough to read mid-batch)."""
    backend = app.backend
    keys = [backend.get_key_for_task(r.id) for r in results]
    metas = backend.client.mget(keys)
    return {
        r.id
        for r, meta in zip(results, metas, strict=True)
        if meta is not None and backend.decode_result(meta)["status"] == "SUCCESS"
    }


def test_sigterm_during_a_batch_finishes_it_and_loses_nothing(
    run_id: str, tmp_path: Path, ledger: str
) -> None:
    env = slow_model(tmp_path)
    fallback = f"ws-{run_id}"
    victim = batching_worker(f"wsv-{run_id}", fallback, tmp_path, env)
    rescuer = batching_worker(f"wsr-{run_id}", fallback, tmp_path, env)
    queues = [fallback, victim.own_queue, rescuer.own_queue]

    def send(i: int) -> AsyncResult:
        # send_task with a queue: this client has no repository, so it does not check the call.
        return app.send_task(
            "tasks.infer",
            args=("slow", [[i / 10, 0.5, -0.5, 1.0]]),
            queue=fallback,
            headers={LEDGER_HEADER: ledger},
        )

    try:
        victim.start().wait_ready()
        # The first runs alone (an idle worker answers at once); the others wait for it and
        # then leave together as the next batch.
        first = [send(i) for i in range(12)]
        eventually(
            lambda: len(started(ledger)) == len(first),
            timeout=30,
            what="the second batch to start in the pool child",
        )
        in_child = set(started(ledger)) - succeeded(first)
        assert len(in_child) == len(first) - 1, "the second batch is not the other eleven"
        # More arrive while it computes: they wait in the batcher (or the queue).
        waiting = [send(i) for i in range(12, 20)]
        eventually(lambda: queue_depth(fallback) == 0, timeout=10, what="the victim to take them")
        os.kill(victim.pid, signal.SIGTERM)  # warm shutdown, as docker stop / Kubernetes
        assert not in_child <= succeeded(first), "the batch ended before the signal"
        assert victim.proc is not None and victim.proc.wait(timeout=60) == 0
        everything = first + waiting
        done = succeeded(everything)
        assert in_child <= done  # the batch in the child was finished and stored
        # What was not served went back to the queue, each message exactly once.
        eventually(
            lambda: queue_depth(fallback) == len(everything) - len(done),
            timeout=15,
            what="the unserved messages back in the class queue",
        )
        assert {r.id for r in waiting}.isdisjoint(done)  # they never reached the child
        assert queue_depth(victim.own_queue) == 0  # the rescuer's is not declared yet
        rescuer.start().wait_ready()
        replies = {r.id: r.get(timeout=60) for r in everything}
        by = {i: reply["worker"] for i, reply in replies.items()}
        assert {by[i] for i in done} == {victim.hostname}
        assert {by[r.id] for r in waiting} == {rescuer.hostname}
        # 0 lost, 0 run twice: every body started exactly once.
        assert started(ledger) == {r.id: 1 for r in everything}
    finally:
        victim.stop()
        rescuer.stop()
        dead = dead_letter_queue(fallback)
        depths = {q: ready(q) for q in [*queues, *([dead] if dead else [])]}
        remove_topology(app, queues)
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"
    assert victim.session_pids() == [] and rescuer.session_pids() == []
