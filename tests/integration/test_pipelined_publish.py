"""infer.map: many requests published with pipelined confirms, on real RabbitMQ and a real worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import errors
from routing.queues import direct_queue
from tasks import app, infer
from tasks.app import SENT_AT_HEADER
from tasks.client.results import outputs
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology
from tests.integration.conftest import queue_depth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def map_worker(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[WorkerProcess]:
    name = f"pm-{run_id}"
    w = WorkerProcess(
        name,
        "cpu",
        logdir=tmp_path_factory.mktemp("pipelined"),
        batching=True,
        queues=[direct_queue(name, name), name],
        preload=("mlp",),
    )
    with w:
        yield w
    remove_topology(app, w.consumed_queues)


@pytest.fixture
def idle_queue(run_id: str) -> Iterator[str]:
    """A queue no worker consumes: what is on it after a call is exactly what that call published."""
    name = f"pm-idle-{run_id}-{time.monotonic_ns() % 10**6}"
    yield name
    remove_topology(app, [name])


def get_one(queue: str) -> Any:
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(queue=queue, no_ack=True)
    assert message is not None
    return message


def test_map_of_2000_returns_in_order_and_matches_sequential(map_worker: WorkerProcess) -> None:
    x = np.random.default_rng(14).standard_normal((2000, 64), dtype=np.float32)
    result = infer.map("mlp", x, queue=map_worker.own_queue)
    assert len(result.ids) == len(set(result.ids)) == 2000
    assert result.timing.messages == 2000 and result.timing.publish_s > 0
    replies = result.get(timeout=300)
    got = np.concatenate([outputs(r) for r in replies])
    assert got.shape == (2000, 10)
    assert all(r["batch_size"] == 1 for r in replies)
    picked = np.random.default_rng(2).choice(2000, size=40, replace=False)
    sequential = [
        outputs(infer.apply_async(("mlp", x[i]), queue=map_worker.own_queue).get(timeout=60))
        for i in picked
    ]
    assert np.allclose(got[picked], np.concatenate(sequential), atol=1e-5)


def test_every_message_is_on_the_broker_when_map_returns(idle_queue: str) -> None:
    x = np.random.default_rng(3).standard_normal((1200, 64), dtype=np.float32)
    result = infer.map("mlp", x, queue=idle_queue, window=64)
    assert queue_depth(idle_queue) == 1200  # confirmed means enqueued, before any worker ran
    first = get_one(idle_queue)
    assert first.headers["id"] == result.ids[0]  # published in input order


def test_map_messages_are_what_apply_async_publishes(idle_queue: str) -> None:
    sample = np.random.default_rng(4).standard_normal(64, dtype=np.float32)
    single = infer.apply_async(("mlp", sample), queue=idle_queue)
    mapped = infer.map("mlp", [sample], queue=idle_queue)
    a, b = get_one(idle_queue), get_one(idle_queue)
    assert (a.headers["id"], b.headers["id"]) == (single.id, mapped.ids[0])
    varying = {"id", "root_id", SENT_AT_HEADER}
    assert {k: v for k, v in a.headers.items() if k not in varying} == {
        k: v for k, v in b.headers.items() if k not in varying
    }
    assert a.headers["argsrepr"].startswith("('mlp', ")  # before_task_publish ran for both
    assert isinstance(b.headers[SENT_AT_HEADER], float)
    assert a.body == b.body and a.content_type == b.content_type
    keep = ("delivery_mode", "content_encoding", "priority")
    assert {k: a.properties.get(k) for k in keep} == {k: b.properties.get(k) for k in keep}
    assert a.delivery_info["routing_key"] == b.delivery_info["routing_key"] == idle_queue


def test_a_bad_sample_publishes_nothing_and_names_its_index(idle_queue: str) -> None:
    x = np.random.default_rng(5).standard_normal((500, 64), dtype=np.float32)
    x[321, 0] = np.inf
    infer.apply_async(("mlp", x[0]), queue=idle_queue)  # the queue exists: its depth is readable
    with pytest.raises(errors.NonFiniteInput, match=r"samples\[321\]"):
        infer.map("mlp", x, queue=idle_queue)
    assert queue_depth(idle_queue) == 1


def test_map_subscribes_to_every_result_in_one_subscribe(idle_queue: str) -> None:
    """Pins tasks.wire.backend.ManyResultConsumer: one SUBSCRIBE, every channel live on Redis."""
    x = np.zeros((50, 64), np.float32)
    commands_before = _subscribe_calls()
    result = infer.map("mlp", x, queue=idle_queue)
    keys = [app.backend.get_key_for_task(i) for i in result.ids]
    assert set(keys) <= app.backend.result_consumer.subscribed_to
    live = dict(app.backend.client.pubsub_numsub(*keys))  # Redis' own count per channel
    assert all(live[k] >= 1 for k in keys), live
    # One SUBSCRIBE for the 50 (the first call may also open the consumer: at most 2).
    assert _subscribe_calls() - commands_before <= 2


def _subscribe_calls() -> int:
    stats = app.backend.client.info("commandstats")
    return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))


def test_a_plain_group_is_published_pipelined_and_durable(
    idle_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``group(...).apply_async()`` publishes without waiting per message, then all confirms."""
    from celery import group

    from tasks.client import publish

    sent: list[str] = []
    original = publish.Pipeline.publish

    def counting(self: publish.Pipeline, message: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(publish.message_task_id(message))
        return original(self, message, *args, **kwargs)

    monkeypatch.setattr(publish.Pipeline, "publish", counting)
    infer.apply_async(("mlp", np.zeros(64, np.float32)), queue=idle_queue)
    assert sent == []  # one apply_async: Celery's own confirmed publish, with its retries
    result = group(
        infer.s("mlp", np.full(64, i, np.float32)).set(queue=idle_queue) for i in range(300)
    ).apply_async()
    assert sorted(sent) == sorted(r.id for r in result.results)  # every one through the pipeline
    assert queue_depth(idle_queue) == 301  # all confirmed on the broker when apply_async returned
