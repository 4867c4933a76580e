"""The batch result pipeline writes what Celery's Redis backend writes (pins ``_get_result_meta``).

A fake Redis (the few commands both writers use) stands in for the server;
the same result is stored once through ``backend.store_result`` and once
through :mod:`tasks.worker.result_pipeline`, and the keys, values, expiries
and PUBLISHed messages must be equal.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from celery import states
from celery.app.task import Context

from models.errors import ShapeMismatch
from tasks.app import InferenceApp
from tasks.settings import Settings
from tasks.worker import result_pipeline


class FakeRedis:
    """Strings with expiry and a publish log: what both writers touch."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.ttl: dict[str, int | None] = {}
        self.published: list[tuple[str, Any]] = []
        self.round_trips = 0

    def get(self, key: str) -> Any:
        self.round_trips += 1
        return self.data.get(key)

    def mget(self, keys: list[str]) -> list[Any]:
        self.round_trips += 1
        return [self.data.get(k) for k in keys]

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.ops: list[tuple[str, tuple[Any, ...]]] = []

    def __enter__(self) -> FakePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ops.clear()

    def setex(self, key: str, seconds: int, value: Any) -> None:
        self.ops.append(("setex", (key, seconds, value)))

    def set(self, key: str, value: Any) -> None:
        self.ops.append(("set", (key, value)))

    def publish(self, channel: str, value: Any) -> None:
        self.ops.append(("publish", (channel, value)))

    def execute(self) -> list[Any]:
        self.redis.round_trips += 1
        for op, args in self.ops:
            if op == "setex":
                key, seconds, value = args
                self.redis.data[key], self.redis.ttl[key] = value, seconds
            elif op == "set":
                key, value = args
                self.redis.data[key], self.redis.ttl[key] = value, None
            else:
                self.redis.published.append(args)
        return [True] * len(self.ops)


NOW = datetime.datetime(2026, 12, 6, 10, 0, tzinfo=datetime.UTC)


def backend_with_fake(serializer: str, extended: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    settings = Settings.from_env(
        {
            "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
            "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/0",  # never connected: the fake answers
            "INFER_SERIALIZER": serializer,
            "INFER_RESULT_EXTENDED": "true" if extended else "false",
        }
    )
    app = InferenceApp(settings)
    monkeypatch.setattr(app, "now", lambda: NOW)
    backend = app.backend
    backend.__dict__["client"] = FakeRedis()
    return backend


def request(task_id: str) -> Context:
    return Context(
        id=task_id,
        task="tasks.infer",
        args=["mlp", {"dtype": "float32", "shape": [4], "data": b"\0" * 16}],
        kwargs={},
        group="g-1",
        parent_id="p-1",
        hostname="cpu0@host",
        retries=0,
        delivery_info={"routing_key": "cpu"},
    )


REPLY = {"model": "mlp", "outputs": {"dtype": "float32", "shape": [1, 2], "data": b"\1" * 8}}


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize(
    ("result", "state"),
    [(REPLY, states.SUCCESS), (ShapeMismatch("expected [64], got [3]"), states.FAILURE)],
    ids=["success", "failure"],
)
def test_pipeline_writes_what_store_result_writes(
    serializer: str, extended: bool, result: Any, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    celery_side = backend_with_fake(serializer, extended, monkeypatch)
    ours = backend_with_fake(serializer, extended, monkeypatch)
    celery_side.store_result("t-1", result, state, request=request("t-1"))
    entry = result_pipeline.result_entry(ours, "t-1", result, state, None, request("t-1"))
    result_pipeline.store_all(ours, [entry])
    theirs, mine = celery_side.client, ours.client
    assert mine.data == theirs.data and list(mine.data) == [b"celery-task-meta-t-1"]
    assert mine.ttl == theirs.ttl
    assert mine.published == theirs.published  # AsyncResult.get() listens on this channel
    meta = ours.decode_result(mine.data[b"celery-task-meta-t-1"])
    assert meta["status"] == state and meta["group_id"] == "g-1" and meta["task_id"] == "t-1"
    assert ("name" in meta) is extended


def test_a_batch_is_one_round_trip_and_dedup_one_more(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_with_fake("msgpack", False, monkeypatch)
    ids = [f"t-{i}" for i in range(32)]
    assert result_pipeline.succeeded_ids(backend, ids) == set()
    entries = [
        result_pipeline.result_entry(backend, i, REPLY, states.SUCCESS, None, request(i))
        for i in ids[:31]
    ]
    entries.append(
        result_pipeline.result_entry(
            backend, ids[31], ShapeMismatch("bad"), states.FAILURE, None, request(ids[31])
        )
    )
    result_pipeline.store_all(backend, entries)
    assert backend.client.round_trips == 2  # one MGET, one pipeline: not 32 GETs + 32 SETs
    assert len(backend.client.published) == 32
    assert result_pipeline.succeeded_ids(backend, ids) == set(ids[:31])  # the failure reruns


def test_dedup_read_failing_means_run_them(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_with_fake("msgpack", False, monkeypatch)

    def down(keys: list[str]) -> list[Any]:
        raise ConnectionError("redis is away")

    monkeypatch.setattr(backend.client, "mget", down)
    assert result_pipeline.succeeded_ids(backend, ["a", "b"]) == set()
