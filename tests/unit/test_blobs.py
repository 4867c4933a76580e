"""Claim checks (tasks.wire.blobs) on an in-memory Redis: the blob format, its checks, the threshold.

The real-Redis cases (a worker serving a blob, an expired and a tampered
one, ``infer_many`` by reference) are in tests/integration/test_claim_check.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from celery import Task

from models.errors import (
    ConfigurationError,
    InputExpired,
    MalformedPayload,
    NonNumericInput,
    PayloadTooLarge,
    RequestError,
    ShapeMismatch,
)
from tasks import infer
from tasks.app import InferenceApp
from tasks.inference import prepare_request
from tasks.settings import Settings
from tasks.wire import blobs
from tasks.wire.backend import ResilientRedisBackend


class MemoryRedis:
    """The few redis.Redis methods blobs uses, in memory; counts round trips."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int | None] = {}
        self.round_trips = 0
        self.commands: list[tuple[str, str]] = []

    def pipeline(self, transaction: bool = True) -> MemoryPipeline:
        assert transaction is False, "blobs need no MULTI/EXEC"
        return MemoryPipeline(self)

    def run(self, name: str, key: str, *args: Any, **kwargs: Any) -> Any:
        self.commands.append((name, key))
        if name == "get":
            return self.data.get(key)
        if name == "set":
            self.data[key], self.ttl[key] = args[0], kwargs.get("ex")
            return True
        raise AssertionError(name)

    def unlink(self, *keys: str) -> int:
        self.round_trips += 1
        self.commands += [("unlink", k) for k in keys]
        return sum(self.data.pop(k, None) is not None for k in keys)


class MemoryPipeline:
    def __init__(self, client: MemoryRedis) -> None:
        self.client = client
        self.queued: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []

    def get(self, key: str) -> MemoryPipeline:
        self.queued.append(("get", key, (), {}))
        return self

    def set(self, key: str, value: bytes, ex: int | None = None) -> MemoryPipeline:
        self.queued.append(("set", key, (value,), {"ex": ex}))
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.client.round_trips += 1
        return [self.client.run(n, k, *a, **kw) for n, k, a, kw in self.queued]


@pytest.fixture
def r() -> MemoryRedis:
    return MemoryRedis()


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any use of pickle fails the test."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    yield


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([[1, -2], [3, 2**40]], dtype=np.int64),
    np.zeros((0, 5), dtype=np.float16),
    np.arange(7, dtype=np.uint8),
    np.linspace(0, 1, 6, dtype=np.float64).reshape(2, 3)[:, ::2],  # not contiguous
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_blob_round_trip(array: np.ndarray, no_pickle: None) -> None:
    blob = blobs.pack(array)
    got = blobs.unpack(blob)
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)


def test_blob_is_magic_length_json_header_raw_bytes(no_pickle: None) -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    blob = blobs.pack(array)
    assert blob.startswith(blobs.MAGIC) and blobs.MAGIC == b"infer-blob/1\n"
    size = int.from_bytes(blob[len(blobs.MAGIC) : len(blobs.MAGIC) + 4], "big")
    start = len(blobs.MAGIC) + 4
    assert json.loads(blob[start : start + size]) == {"dtype": "float32", "shape": [2, 3]}
    assert blob[start + size :] == array.astype("<f4").tobytes()


def test_torch_tensor_and_envelope_pack_like_the_array() -> None:
    array = np.arange(4, dtype=np.float32)
    envelope = {"dtype": "float32", "shape": [4], "data": array.tobytes()}
    assert blobs.pack(torch.arange(4, dtype=torch.float32)) == blobs.pack(array)
    assert blobs.pack(envelope) == blobs.pack(array)


def test_put_stores_header_and_raw_bytes_with_a_ttl(r: MemoryRedis, no_pickle: None) -> None:
    array = np.ones((4, 64), np.float32)
    ref = blobs.put(r, array, ttl_s=90)
    assert set(ref) == {"ref", "nbytes", "sha256"} and blobs.is_reference(ref)
    stored = r.data[ref["ref"]]
    assert ref["ref"].startswith("infer:blob:") and r.ttl[ref["ref"]] == 90
    assert stored.startswith(blobs.MAGIC) and stored.endswith(array.tobytes())
    assert ref["nbytes"] == len(stored) and ref["sha256"] == hashlib.sha256(stored).hexdigest()
    assert r.round_trips == 1


def test_fetch_many_is_one_pipeline_and_checks_each_alone(r: MemoryRedis, no_pickle: None) -> None:
    writer = blobs.BlobWriter(r, ttl_s=60)
    arrays = [np.full((2, 3), i, np.float32) for i in range(4)]
    refs: list[Any] = [writer.add(a) for a in arrays]
    assert len(writer) == 4 and r.round_trips == 0
    writer.write()
    assert r.round_trips == 1 and len(writer) == 0
    del r.data[refs[1]["ref"]]  # expired
    r.data[refs[2]["ref"]] = r.data[refs[2]["ref"]][:-1] + b"\x01"  # tampered, same length
    refs.append({"ref": "celery-task-meta-x", "nbytes": 1, "sha256": "0" * 64})  # not ours
    got = blobs.fetch_many(r, refs)
    assert r.round_trips == 2  # the write, then one pipeline for all the reads
    assert ("get", "celery-task-meta-x") not in r.commands  # never read
    assert np.array_equal(got[0], arrays[0]) and np.array_equal(got[3], arrays[3])
    assert type(got[1]) is InputExpired and "resubmit" in str(got[1])
    assert "INFER_CLAIM_CHECK_TTL_S" in str(got[1])
    assert type(got[2]) is MalformedPayload and "sha256" in str(got[2])
    assert type(got[4]) is MalformedPayload and "infer:blob:" in str(got[4])


def test_wrong_length_is_malformed(r: MemoryRedis) -> None:
    ref = blobs.put(r, np.zeros(8, np.float32), ttl_s=60)
    r.data[ref["ref"]] += b"\x00"
    with pytest.raises(MalformedPayload, match="bytes but its reference says"):
        blobs.fetch(r, ref)


def test_missing_blob_raises_input_expired(r: MemoryRedis) -> None:
    ref = blobs.put(r, np.zeros(8, np.float32), ttl_s=60)
    r.data.clear()
    with pytest.raises(InputExpired) as caught:
        blobs.fetch(r, ref)
    assert isinstance(caught.value, RequestError)


@pytest.mark.parametrize(
    "ref",
    [
        {"ref": "infer:blob:" + "a" * 32, "nbytes": 10},
        {"ref": "infer:blob:" + "a" * 32, "nbytes": 10, "sha256": "0" * 64, "x": 1},
        {"ref": "infer:blob:../x", "nbytes": 10, "sha256": "0" * 64},
        {"ref": "infer:blob:" + "a" * 32, "nbytes": True, "sha256": "0" * 64},
        {"ref": "infer:blob:" + "a" * 32, "nbytes": -1, "sha256": "0" * 64},
        {"ref": "infer:blob:" + "a" * 32, "nbytes": 10, "sha256": "XYZ"},
        "infer:blob:" + "a" * 32,
    ],
)
def test_malformed_references_are_refused_unread(r: MemoryRedis, ref: Any) -> None:
    (got,) = blobs.fetch_many(r, [ref])
    assert type(got) is MalformedPayload
    assert r.commands == []
    assert blobs.delete_many(r, [ref]) == 0 and r.commands == []


def test_a_blob_over_the_limit_is_refused_before_it_is_read(r: MemoryRedis) -> None:
    ref = {"ref": "infer:blob:" + "b" * 32, "nbytes": 10**9, "sha256": "0" * 64}
    (got,) = blobs.fetch_many(r, [ref], max_bytes=1024 * 1024)
    assert type(got) is PayloadTooLarge and r.commands == []
    small = blobs.put(r, np.zeros(300, np.float32), ttl_s=60)  # 1,200 bytes of tensor
    with pytest.raises(PayloadTooLarge):
        blobs.fetch(r, small, max_bytes=1024)


@pytest.mark.parametrize(
    ("blob", "error", "fragment"),
    [
        (b"\x80\x04\x95pickle", MalformedPayload, "does not start with"),
        (blobs.MAGIC + (10**6).to_bytes(4, "big") + b"{}", MalformedPayload, "does not fit"),
        (blobs.MAGIC + (3).to_bytes(4, "big") + b"{x}", MalformedPayload, "not JSON"),
        (blobs.MAGIC + (2).to_bytes(4, "big") + b"[]", MalformedPayload, "exactly the keys"),
    ],
)
def test_bad_blobs_are_malformed(blob: bytes, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        blobs.unpack(blob)


def test_non_numeric_header_dtype_is_the_codecs_error() -> None:
    header = json.dumps({"dtype": "object", "shape": [1]}).encode()
    blob = blobs.MAGIC + len(header).to_bytes(4, "big") + header + b"x"
    with pytest.raises(NonNumericInput):
        blobs.unpack(blob)


def test_bytes_that_do_not_fit_the_header_shape() -> None:
    blob = blobs.pack(np.zeros(4, np.float32))[:-1]
    with pytest.raises(MalformedPayload, match="needs 16"):
        blobs.unpack(blob)


def test_delete_many_is_one_command_and_counts(r: MemoryRedis) -> None:
    refs = [blobs.put(r, np.zeros(2, np.float32), ttl_s=60) for _ in range(3)]
    before = r.round_trips
    del r.data[refs[0]["ref"]]
    assert blobs.delete_many(r, refs) == 2
    assert r.round_trips == before + 1 and r.data == {}
    assert blobs.delete_many(r, []) == 0 and r.round_trips == before + 1


def test_is_reference_tells_a_reference_from_a_tensor() -> None:
    assert blobs.is_reference({"ref": "infer:blob:x", "nbytes": 1, "sha256": "0"})
    assert not blobs.is_reference({"dtype": "float32", "shape": [1], "data": b"\0\0\0\0"})
    assert not blobs.is_reference([1.0, 2.0]) and not blobs.is_reference("ref")


@pytest.mark.parametrize(
    ("nbytes", "threshold", "by_reference"),
    [(0, 0, False), (10**9, 0, False), (1024, 1024, False), (1025, 1024, True), (1, 0, False)],
)
def test_threshold_decision(nbytes: int, threshold: int, by_reference: bool) -> None:
    assert blobs.over_threshold(nbytes, threshold) is by_reference
    assert blobs.BlobWriter(MemoryRedis(), 60, threshold).wants(nbytes) is by_reference


def test_default_threshold_and_ttl() -> None:
    s = Settings()
    assert s.claim_check_bytes == 1024 * 1024 and s.claim_check_ttl_s > s.task_time_limit
    assert s.blob_url is None


def fake_app(settings: Settings, backend: object = None) -> Any:
    return SimpleNamespace(infer_settings=settings, backend=backend)


def test_blob_client_is_the_backends_redis_or_the_blob_url(tmp_path: Path) -> None:
    redis_app = InferenceApp(Settings(home=tmp_path, result_backend="redis://127.0.0.1:6379/3"))
    assert isinstance(redis_app.backend, ResilientRedisBackend)
    assert blobs.blob_client(redis_app) is redis_app.backend.client  # nothing connects yet
    own = fake_app(Settings(blob_url="redis://127.0.0.1:6379/4"), backend=object())
    client = blobs.blob_client(own)
    assert client.connection_pool.connection_kwargs["db"] == 4
    assert blobs.blob_client(own) is client  # one pool per URL


def test_no_redis_means_configuration_error_and_claim_checks_off() -> None:
    file_app = fake_app(Settings(), backend=object())  # the embedded broker's file backend
    with pytest.raises(ConfigurationError, match="INFER_BLOB_URL"):
        blobs.blob_client(file_app)
    assert blobs.writer_for(file_app) is None
    off = fake_app(Settings(claim_check_bytes=0, blob_url="redis://127.0.0.1:6379/4"))
    assert blobs.writer_for(off) is None
    on = blobs.writer_for(fake_app(Settings(claim_check_bytes=77, blob_url="redis://h:1/0")))
    assert on is not None and on.threshold == 77 and on.ttl_s == Settings.claim_check_ttl_s


# --- the client: prepare_request, apply_async, infer.map ---------------------------------


def test_prepare_request_sends_big_inputs_by_reference(r: MemoryRedis) -> None:
    writer = blobs.BlobWriter(r, 60, threshold=1024)
    big, small = np.ones((5, 64), np.float32), np.ones((1, 64), np.float32)  # 1,280 and 256 bytes
    (_, ref), _ = prepare_request(("mlp", big), None, "msgpack", writer)
    (_, envelope), _ = prepare_request(("mlp", small), None, "msgpack", writer)
    _, kwargs = prepare_request(None, {"model": "mlp", "inputs": [[0.5] * 64] * 3}, "json", writer)
    assert blobs.is_reference(ref) and set(envelope) == {"dtype", "shape", "data"}
    assert blobs.is_reference(kwargs["inputs"])  # a list of 1,536 bytes as float64
    assert len(writer) == 2 and r.round_trips == 0  # the caller writes them
    writer.write()
    assert np.array_equal(blobs.fetch(r, ref), big)
    assert blobs.fetch(r, kwargs["inputs"]).shape == (3, 64)
    again = prepare_request(("mlp", ref), None, "msgpack", writer)  # a reference passes as is
    assert again == (["mlp", ref], {}) and len(writer) == 0


def test_prepare_request_checks_before_writing(r: MemoryRedis) -> None:
    writer = blobs.BlobWriter(r, 60, threshold=16)
    with pytest.raises(ShapeMismatch):
        prepare_request(("mlp", np.ones((5, 63), np.float32)), None, "msgpack", writer)
    assert len(writer) == 0


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch, r: MemoryRedis) -> list[tuple[Any, Any]]:
    """What would be published, with claim checks on an in-memory Redis at a 1 KiB threshold."""
    calls: list[tuple[Any, Any]] = []

    def fake_publish(self: Task, args: Any = None, kwargs: Any = None, **options: Any) -> str:
        calls.append((args, kwargs))
        return "published"

    monkeypatch.setattr(Task, "apply_async", fake_publish)
    monkeypatch.setattr(blobs, "writer_for", lambda app: blobs.BlobWriter(r, 60, 1024))
    return calls


def test_apply_async_writes_the_blob_before_publishing(
    published: list[Any], r: MemoryRedis
) -> None:
    big = np.ones((8, 64), np.float32)
    infer.apply_async(("mlp", big))
    ((args, _),) = published
    assert blobs.is_reference(args[1]) and args[1]["ref"] in r.data
    assert np.array_equal(blobs.fetch(r, args[1]), big)


def test_map_writes_every_blob_in_one_pipeline(
    published: list[Any], r: MemoryRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "writer_for", lambda app: blobs.BlobWriter(r, 60, 200))
    sent: list[Any] = []
    monkeypatch.setattr(
        "tasks.inference.publish_many",
        lambda app, send_all, ids, **kw: (sent.extend(send_all(None)), None),
    )
    samples = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)  # 256 B each
    infer.map("mlp", samples)
    assert r.round_trips == 1 and len(r.data) == 3
    refs = [args[1] for args, _ in published]
    assert all(blobs.is_reference(ref) for ref in refs)
    assert np.array_equal(np.stack(blobs.fetch_many(r, refs)), samples)


# --- the worker: resolve and release --------------------------------------------------------


def test_resolve_and_release(r: MemoryRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs, "blob_client", lambda app: r)
    array = np.arange(64, dtype=np.float32)
    ref = blobs.put(r, array, ttl_s=60)
    assert np.array_equal(blobs.resolve(None, ref, 1024), array)
    listed = [1.0, 2.0]
    assert blobs.resolve(None, listed, 1024) is listed
    blobs.release(None, listed)
    assert ref["ref"] in r.data
    blobs.release(None, ref)
    assert r.data == {}
