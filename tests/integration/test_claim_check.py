"""Large inputs by reference (claim check) through real Redis, RabbitMQ and a real worker.

The suite's payload limit is 1 MiB (tests/conftest.py), the default claim-check
threshold too, so these tests lower the threshold to 4 KiB in this process
(the client decides; the worker resolves any reference it is sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from models import errors
from models.runner import reference_forward
from routing.queues import direct_queue
from tasks import app, infer, infer_many
from tasks.app import InferenceApp
from tasks.client.results import outputs
from tasks.ops.launcher import WorkerProcess
from tasks.settings import Settings
from tasks.wire import blobs
from tasks.wire.codec import encode
from tasks.wire.topology import remove_topology
from tests.integration.conftest import eventually
from tests.specs import spec_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

THRESHOLD = 4096


@pytest.fixture(scope="module", params=[False, True], ids=["batch1", "batching"])
def worker(
    request: pytest.FixtureRequest,
    run_id: str,
    tmp_path_factory: pytest.TempPathFactory,
    weights_dir: Path,
) -> Iterator[WorkerProcess]:
    """A batch-1 worker, then a batching one (its blobs fetched in one pipeline per batch)."""
    name = f"cc-{run_id}" + ("-b" if request.param else "")
    w = WorkerProcess(
        name,
        "cpu",
        logdir=tmp_path_factory.mktemp("claim-check"),
        queues=[direct_queue(name, name), name],
        preload=("mlp",),
        batching=request.param,
    )
    with w:
        yield w
    remove_topology(app, w.consumed_queues)


@pytest.fixture
def client() -> redis.Redis:
    return blobs.blob_client(app)  # the result backend's Redis


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setattr(InferenceApp, "infer_settings", property(lambda self: settings))


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch, client: redis.Redis) -> Iterator[list[dict[str, Any]]]:
    """Claim checks over 4 KiB in this process; the references written, all gone at teardown."""
    use_settings(monkeypatch, replace(app.infer_settings, claim_check_bytes=THRESHOLD))
    refs: list[dict[str, Any]] = []
    add = blobs.BlobWriter.add

    def recording(self: blobs.BlobWriter, value: Any) -> dict[str, Any]:
        ref = add(self, value)
        refs.append(ref)
        return ref

    monkeypatch.setattr(blobs.BlobWriter, "add", recording)
    yield refs
    left = [r["ref"] for r in refs if client.exists(r["ref"])]
    blobs.delete_many(client, refs)
    assert left == [], "blobs the worker did not delete"


def gone(client: redis.Redis, refs: list[dict[str, Any]]) -> bool:
    return not any(client.exists(r["ref"]) for r in refs)


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_a_big_input_goes_by_reference_and_its_blob_is_deleted(
    worker: WorkerProcess,
    written: list[dict[str, Any]],
    client: redis.Redis,
    weights_dir: Path,
    serializer: str,
) -> None:
    x = np.random.default_rng(1).standard_normal((100, 64), dtype=np.float32)  # 25,600 bytes
    res = infer.apply_async(("mlp", x), queue=worker.own_queue, serializer=serializer)
    (ref,) = written
    assert ref["nbytes"] > x.nbytes > THRESHOLD
    reply = res.get(timeout=60)
    assert reply["batch_size"] == 100
    assert np.allclose(outputs(reply), reference_forward(spec_of("mlp"), x), atol=1e-4)
    # The same input inline (send_task skips the claim check) gives the same outputs.
    inline = app.send_task(
        "tasks.infer", args=("mlp", encode(x, binary=True)), queue=worker.own_queue
    )
    assert np.array_equal(outputs(inline.get(timeout=60)), outputs(reply))
    eventually(lambda: gone(client, written), timeout=10, what="blob deleted after the result")


def test_an_expired_blob_raises_input_expired(worker: WorkerProcess, client: redis.Redis) -> None:
    ref = blobs.put(client, np.ones((100, 64), np.float32), ttl_s=1)
    eventually(lambda: not client.exists(ref["ref"]), timeout=5, what="blob expired")
    res = app.send_task("tasks.infer", args=("mlp", ref), queue=worker.own_queue)
    with pytest.raises(errors.InputExpired) as caught:
        res.get(timeout=30)
    assert type(caught.value) is errors.InputExpired
    assert "resubmit" in str(caught.value) and "INFER_CLAIM_CHECK_TTL_S" in str(caught.value)
    assert res.state == "FAILURE" and not res.retries


def test_a_blob_deleted_before_the_worker_takes_it(
    worker: WorkerProcess, written: list[dict[str, Any]], client: redis.Redis
) -> None:
    """apply_async's own reference, its blob deleted while the message waits in a queue."""
    idle = f"{worker.name}-idle"
    try:
        res = infer.apply_async(("mlp", np.ones((50, 64), np.float32)), queue=idle)
        (ref,) = written
        assert client.delete(ref["ref"]) == 1
        with app.connection_for_write() as conn:
            message = conn.default_channel.basic_get(queue=idle, no_ack=True)
            assert message is not None and message.headers["id"] == res.id
            conn.Producer().publish(
                message.body,
                exchange="",
                routing_key=worker.own_queue,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=message.headers,
                correlation_id=message.properties.get("correlation_id"),
                delivery_mode=2,
            )
        with pytest.raises(errors.InputExpired):
            res.get(timeout=30)
    finally:
        remove_topology(app, [idle])


def test_a_tampered_blob_raises_malformed_payload(
    worker: WorkerProcess, client: redis.Redis
) -> None:
    x = np.ones((100, 64), np.float32)
    same_length = blobs.put(client, x, ttl_s=60)
    blob = client.get(same_length["ref"])
    assert isinstance(blob, bytes)
    client.set(same_length["ref"], blob[:-4] + np.float32(2).tobytes(), keepttl=True)
    longer = blobs.put(client, x, ttl_s=60)
    client.append(longer["ref"], b"\0")
    for ref, fragment in ((same_length, "sha256"), (longer, "its reference says")):
        res = app.send_task("tasks.infer", args=("mlp", ref), queue=worker.own_queue)
        with pytest.raises(errors.MalformedPayload, match=fragment):
            res.get(timeout=30)
    # A failed request's blob goes too, once its failure is stored.
    eventually(lambda: gone(client, [same_length, longer]), timeout=10, what="blobs deleted")
    ok = infer.apply_async(("mlp", x[0]), queue=worker.own_queue).get(timeout=30)
    assert ok["worker"] == worker.hostname and worker.alive()


def test_infer_many_over_the_threshold_uses_blobs_and_matches_inline(
    worker: WorkerProcess,
    written: list[dict[str, Any]],
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = np.random.default_rng(4).standard_normal((400, 64), dtype=np.float32)
    writes: list[int] = []
    write = blobs.BlobWriter.write

    def counting(self: blobs.BlobWriter) -> None:
        writes.append(len(self))
        write(self)

    monkeypatch.setattr(blobs.BlobWriter, "write", counting)
    by_reference = infer_many("mlp", x, batch_size=100, queue=worker.own_queue).get(timeout=120)
    # Four 25,600-byte chunks in one pipeline (each chunk's apply_async then has none to write).
    assert len(written) == 4 and [n for n in writes if n] == [4]
    use_settings(monkeypatch, replace(app.infer_settings, claim_check_bytes=0))  # off: inline
    inline = infer_many("mlp", x, batch_size=100, queue=worker.own_queue).get(timeout=120)
    assert len(written) == 4
    assert by_reference.shape == (400, 10) and np.array_equal(by_reference, inline)
    eventually(lambda: gone(client, written), timeout=10, what="chunk blobs deleted")


def test_fetch_many_on_real_redis_is_one_pipeline_each_checked_alone(client: redis.Redis) -> None:
    arrays = [np.full((3, 64), i, np.float32) for i in range(5)]
    writer = blobs.BlobWriter(client, ttl_s=30)
    refs = [writer.add(a) for a in arrays]
    writer.write()
    client.delete(refs[2]["ref"])
    got = blobs.fetch_many(client, refs, max_bytes=1024 * 1024)
    assert type(got[2]) is errors.InputExpired
    assert all(
        np.array_equal(g, a) for i, (g, a) in enumerate(zip(got, arrays, strict=True)) if i != 2
    )
    assert blobs.delete_many(client, refs) == 4
    assert gone(client, refs)
