"""Pipelined publisher confirms (tasks.client.publish) against a fake py-amqp channel.

The fake implements what the pipeline uses of py-amqp: ``channel.events``
(the ``basic_ack`` / ``basic_nack`` callbacks its ``_on_basic_ack`` calls), a
plain non-waiting ``basic_publish``, and ``channel.connection.drain_events``,
here a scripted broker that answers with acks and nacks, or times out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from celery import Task

from models.errors import BadArguments, NonFiniteInput, PublishFailed, ShapeMismatch
from tasks import infer
from tasks.client.publish import ConfirmTracker, Pipeline, message_task_id


class FakeMessage:
    def __init__(self, task_id: str) -> None:
        self.properties = {"application_headers": {"id": task_id}, "correlation_id": task_id}


class FakeConnection:
    """``drain_events`` runs the broker's next answer: ``answer(channel)`` calls the event callbacks."""

    def __init__(self, channel: FakeChannel, answer: Callable[[FakeChannel], None]) -> None:
        self.channel, self.answer = channel, answer
        self.drains = 0

    def drain_events(self, timeout: float | None = None) -> None:
        self.drains += 1
        self.answer(self.channel)


class FakeChannel:
    def __init__(self, answer: Callable[[FakeChannel], None]) -> None:
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self.connection = FakeConnection(self, answer)
        self.published: list[str] = []
        self.most_unconfirmed = 0
        self.pipeline: Pipeline | None = None

    def basic_publish(self, msg: FakeMessage, exchange: str = "", routing_key: str = "") -> None:
        self.published.append(message_task_id(msg))

    def ack(self, tag: int, multiple: bool = False) -> None:  # what amqp's _on_basic_ack does
        for callback in self.events["basic_ack"]:
            callback(tag, multiple)

    def nack(self, tag: int, multiple: bool = False) -> None:
        for callback in self.events["basic_nack"]:
            callback(tag, multiple)


def ack_all_outstanding(channel: FakeChannel) -> None:
    """The broker confirms everything published so far with one ``multiple`` ack."""
    channel.ack(len(channel.published), multiple=True)


def run(
    n: int, answer: Callable[[FakeChannel], None], window: int = 4, timeout: float = 5.0
) -> tuple[FakeChannel, Pipeline]:
    channel = FakeChannel(answer)
    ids = [f"t{i}" for i in range(1, n + 1)]
    pipeline = Pipeline(channel, channel.basic_publish, window, timeout, expected=ids)
    channel.pipeline = pipeline
    for task_id in ids:
        pipeline.publish(FakeMessage(task_id), exchange="", routing_key="q", confirm_timeout=3)
        channel.most_unconfirmed = max(channel.most_unconfirmed, pipeline.tracker.unconfirmed)
    pipeline.finish()
    return channel, pipeline


def test_tracker_multiple_ack_confirms_every_tag_up_to_it() -> None:
    tracker = ConfirmTracker()
    tags = [tracker.sent(f"t{i}") for i in range(1, 6)]
    assert tags == [1, 2, 3, 4, 5]
    tracker.on_ack(3, True)
    assert list(tracker.pending) == [4, 5] and tracker.confirmed == 3
    tracker.on_ack(5, False)
    assert list(tracker.pending) == [4]
    tracker.on_nack(4, True)
    assert tracker.nacked == ["t4"] and tracker.unconfirmed == 0
    tracker.on_ack(2, True)  # an old tag again changes nothing
    assert tracker.confirmed == 4


def test_multiple_acks_in_windows_confirm_everything() -> None:
    channel, pipeline = run(1000, ack_all_outstanding, window=256)
    assert pipeline.tracker.confirmed == 1000 and pipeline.tracker.unconfirmed == 0
    assert channel.published == [f"t{i}" for i in range(1, 1001)]
    # Waited once per full window (3 of 256 in 1000) and once at the end, never per message.
    assert channel.connection.drains == 4
    assert channel.most_unconfirmed < 256
    assert pipeline.timing.messages == 1000


def test_window_bounds_the_unconfirmed() -> None:
    def one_at_a_time(channel: FakeChannel) -> None:  # the slowest broker: one ack per read
        assert channel.pipeline is not None
        channel.ack(min(channel.pipeline.tracker.pending))

    channel, pipeline = run(50, one_at_a_time, window=8)
    assert channel.most_unconfirmed < 8
    assert pipeline.tracker.confirmed == 50


def test_a_nack_names_its_task_id() -> None:
    def nack_t3(channel: FakeChannel) -> None:
        channel.ack(2, multiple=True)
        channel.nack(3)
        channel.ack(len(channel.published), multiple=True)

    with pytest.raises(PublishFailed, match="nacked") as raised:
        run(4, nack_t3, window=10)
    assert raised.value.task_ids == ("t3",)
    assert "t3" in str(raised.value) and "1 of 4" in str(raised.value)


def test_a_nack_stops_publishing_and_names_the_unsent() -> None:
    channel = FakeChannel(lambda ch: ch.nack(len(ch.published), multiple=True))
    ids = [f"t{i}" for i in range(1, 11)]
    pipeline = Pipeline(channel, channel.basic_publish, 2, 5.0, expected=ids)
    with pytest.raises(PublishFailed) as raised:
        for task_id in ids:
            pipeline.publish(FakeMessage(task_id))
    assert channel.published == ["t1", "t2"]  # the first full window was nacked: no more sent
    assert raised.value.task_ids == tuple(ids)


def test_no_confirm_in_time_names_the_unconfirmed() -> None:
    def silent(channel: FakeChannel) -> None:
        raise TimeoutError("timed out")  # py-amqp raises socket.timeout, the same class

    with pytest.raises(PublishFailed, match=r"no confirm within 0\.5s") as raised:
        run(3, silent, window=10, timeout=0.5)
    assert raised.value.task_ids == ("t1", "t2", "t3")


def test_a_partial_ack_then_timeout_names_only_the_rest() -> None:
    answers = iter([lambda ch: ch.ack(2, multiple=True)])

    def then_silent(channel: FakeChannel) -> None:
        step = next(answers, None)
        if step is None:
            raise TimeoutError("timed out")
        step(channel)

    with pytest.raises(PublishFailed) as raised:
        run(5, then_silent, window=10)
    assert raised.value.task_ids == ("t3", "t4", "t5")


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    def fake_publish(self: Task, args: Any = None, kwargs: Any = None, **options: Any) -> str:
        calls.append((args, kwargs, options))
        return "published"

    monkeypatch.setattr(Task, "apply_async", fake_publish)
    return calls


def test_map_bad_sample_publishes_nothing_and_names_its_index(published: list[Any]) -> None:
    samples = np.zeros((10, 64), np.float32)
    samples[7, 3] = np.nan
    with pytest.raises(NonFiniteInput, match=r"samples\[7\]"):
        infer.map("mlp", samples)
    ragged = [np.zeros(64, np.float32), np.zeros(64, np.float32), np.zeros(63, np.float32)]
    with pytest.raises(ShapeMismatch, match=r"samples\[2\]"):
        infer.map("mlp", ragged)
    assert published == []


def test_map_refuses_what_is_not_a_sequence_of_samples(published: list[Any]) -> None:
    with pytest.raises(BadArguments, match="sequence of samples"):
        infer.map("mlp", {"dtype": "float32"})
    with pytest.raises(BadArguments, match="task_id"):
        infer.map("mlp", np.zeros((2, 64), np.float32), task_id="x")
    assert published == []
