"""The Redis registry store on a real Redis: TTL expiry, index pruning, namespaces."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from routing.capabilities import WorkerCapabilities
from routing.registry import RedisStore

pytestmark = pytest.mark.integration


def record(name: str) -> WorkerCapabilities:
    return WorkerCapabilities(
        name=name,
        queue=f"cpu.direct.{name}",
        device_kind="cpu",
        device_name="cpu",
        device_index=None,
        total_memory_mb=1000,
        free_memory_mb=900,
        compute_capability=None,
        dtypes=("fp32",),
        heartbeat=time.time(),
        device_class_queue="cpu",
    )


def test_records_expire_and_the_index_is_pruned() -> None:
    ns = f"test-{uuid.uuid4().hex[:6]}"
    store = RedisStore(os.environ["CELERY_RESULT_BACKEND"], ns)
    other = RedisStore(os.environ["CELERY_RESULT_BACKEND"], ns + "-other")
    try:
        store.publish(record("a@h"), ttl_s=0.3)
        store.publish(record("b@h"), ttl_s=30)
        other.publish(record("c@h"), ttl_s=30)
        assert {w.name for w in store.load()} == {"a@h", "b@h"}  # namespaces do not mix
        assert store.load()[0] == record("a@h").__class__.from_json(store.load()[0].to_json())
        time.sleep(0.5)
        assert [w.name for w in store.load()] == ["b@h"]  # a's key expired ...
        assert store.client.smembers(store.index) == {b"b@h"}  # ... and left the index
        store.remove("b@h")
        assert store.load() == [] and store.client.scard(store.index) == 0
    finally:
        for s in (store, other):
            s.client.delete(s.index, *s.client.keys(s.prefix + "*"))
