"""Routing logic with fakes: matching, the sticky cache (fake clock), the ladder, the registry."""

from __future__ import annotations

from dataclasses import replace

import pytest

from models.errors import (
    BadRequirements,
    ConfigurationError,
    NoCapableWorker,
    UnsupportedDtype,
    unsupported_dtype,
)
from routing.capabilities import TaskRequirements, WorkerCapabilities, match, unmet
from routing.queues import (
    dead_letter_arguments,
    dead_letter_queue,
    direct_queue,
    fallback_of,
    queue_arguments,
)
from routing.registry import LiveRegistry
from routing.router import CapabilityRouter
from routing.sticky import StickyCache


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def worker(name: str, **kw: object) -> WorkerCapabilities:
    base = dict(
        name=f"{name}@h",
        queue=direct_queue("gpu", name),
        device_kind="cuda",
        device_name="H200",
        device_index=0,
        total_memory_mb=80_000,
        free_memory_mb=60_000,
        compute_capability=(9, 0),
        dtypes=("fp32", "fp16", "bf16"),
        models_loaded=(),
        in_flight=0,
        max_in_flight=4,
        heartbeat=1000.0,
        device_class_queue="gpu",
    )
    base.update(kw)
    return WorkerCapabilities(**base)  # type: ignore[arg-type]


CPU = worker(
    "cpu0",
    device_kind="cpu",
    device_name="cpu",
    device_index=None,
    compute_capability=None,
    dtypes=("fp32", "bf16"),
    free_memory_mb=4000,
    queue=direct_queue("cpu", "cpu0"),
)


# --- requirements and matching ---------------------------------------------------------------


def test_unmet_names_each_requirement() -> None:
    gpu = worker("gpu0")
    assert unmet(TaskRequirements(device="cuda"), CPU) == "device cuda (it is cpu)"
    assert "8000 MB free memory" in str(unmet(TaskRequirements(min_free_memory_mb=8000), CPU))
    assert "compute capability >= 9.0" in str(
        unmet(TaskRequirements(min_compute_capability=(9, 0)), CPU)
    )
    assert unmet(TaskRequirements(dtype="fp16"), CPU) == "dtype fp16 (it runs fp32, bf16)"
    assert (
        unmet(TaskRequirements(device="cuda", dtype="bf16", min_free_memory_mb=1000), gpu) is None
    )


def test_model_already_loaded_needs_no_free_memory() -> None:
    full = worker("gpu0", free_memory_mb=10, models_loaded=("cnn",))
    assert unmet(TaskRequirements(model="cnn", model_memory_mb=128), full) is None
    assert unmet(TaskRequirements(model="mlp", model_memory_mb=128), full) == (
        "128 MB free to load mlp (it has 10 MB)"
    )
    # Headroom the caller asks for holds even where the model is loaded.
    assert unmet(TaskRequirements(model="cnn", min_free_memory_mb=128), full) is not None


def test_match_prefers_loaded_model_then_least_loaded() -> None:
    a = worker("a", in_flight=0)
    b = worker("b", in_flight=3, models_loaded=("cnn",))
    c = worker("c", in_flight=1)
    ranked = match(TaskRequirements(model="cnn"), [a, b, c, CPU])
    assert [w.name for w in ranked] == ["b@h", "a@h", "cpu0@h", "c@h"]  # then memory breaks ties
    assert [w.name for w in match(TaskRequirements(device="cuda", model="x"), [CPU, c, a])] == [
        "a@h",
        "c@h",
    ]


def test_requirements_from_headers_and_key() -> None:
    req = TaskRequirements(model="cnn", min_free_memory_mb=128)
    merged = req.merged({"device": "cuda", "min_compute_capability": "8.0"})
    assert (
        merged.device == "cuda"
        and merged.min_compute_capability == (8, 0)
        and merged.model == "cnn"
    )
    assert (
        merged.key != req.key
        and req.key == TaskRequirements(model="cnn", min_free_memory_mb=128).key
    )
    with pytest.raises(BadRequirements, match="unknown requirement 'gpu'"):
        req.merged({"gpu": True})
    with pytest.raises(ConfigurationError, match="device"):
        TaskRequirements(device="tpu")


def test_capabilities_json_round_trip() -> None:
    w = worker("gpu0", models_loaded=("cnn", "mlp"))
    assert WorkerCapabilities.from_json(w.to_json()) == w


# --- sticky cache -----------------------------------------------------------------------------


def test_sticky_ttl_with_fake_clock() -> None:
    clock = Clock()
    cache = StickyCache(ttl_s=10, max_size=8, now=clock)
    cache.put("k", "gpu0@h", "cnn")
    clock.t += 9.9
    assert cache.get("k") == "gpu0@h"
    clock.t += 0.2
    assert cache.get("k") is None and len(cache) == 0


def test_sticky_bounded_lru_and_invalidation() -> None:
    cache = StickyCache(ttl_s=60, max_size=2, now=Clock())
    cache.put("a", "w1", "cnn")
    cache.put("b", "w2", "mlp")
    cache.get("a")
    cache.put("c", "w1", "mlp")  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") == "w1"
    assert cache.keys_per_worker() == {"w1": 2}
    assert cache.invalidate(worker="w1", model="cnn") == 1 and cache.get("a") is None
    assert cache.drop_worker("w1") == 1 and len(cache) == 0


# --- the ladder -------------------------------------------------------------------------------


def reqs(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> TaskRequirements | None:
    return TaskRequirements(model=str(args[0])) if name == "tasks.infer" else None


def make_router(workers: dict[str, WorkerCapabilities]) -> CapabilityRouter:
    return CapabilityRouter(lambda: workers, reqs, StickyCache(now=Clock()))


def test_ladder_sticky_hit_spill_and_fallback() -> None:
    workers = {w.name: w for w in (worker("a"), worker("b", in_flight=1))}
    router = make_router(workers)
    first = router("tasks.infer", ("cnn",), {}, {})
    assert first == {"queue": "gpu.direct.a"}  # miss: least loaded
    assert router("tasks.infer", ("cnn",), {}, {}) == first  # sticky hit
    workers["a@h"] = replace(workers["a@h"], in_flight=4)  # at its limit: spill this one request
    assert router("tasks.infer", ("cnn",), {}, {}) == {"queue": "gpu.direct.b"}
    workers["a@h"] = replace(workers["a@h"], in_flight=0)  # ... the entry survived the burst
    assert router("tasks.infer", ("cnn",), {}, {}) == first
    del workers["a@h"]  # the sticky worker died: fall back and remember the new one
    assert router("tasks.infer", ("cnn",), {}, {}) == {"queue": "gpu.direct.b"}
    assert router("tasks.infer", ("cnn",), {}, {}) == {"queue": "gpu.direct.b"}
    stats = router.stats.as_dict()
    assert {k: stats[k] for k in ("decisions", "sticky_hits", "spills", "fallbacks", "misses")} == {
        "decisions": 6,
        "sticky_hits": 3,
        "spills": 1,
        "fallbacks": 1,
        "misses": 1,
    }


def test_new_keys_spread_over_workers() -> None:
    workers = {w.name: w for w in (worker("a"), worker("b"))}
    router = make_router(workers)
    chosen = {router("tasks.infer", (m,), {}, {})["queue"] for m in ("m1", "m2")}
    assert chosen == {"gpu.direct.a", "gpu.direct.b"}  # sticky keys count as load


def test_explicit_queue_and_other_tasks_are_not_routed() -> None:
    router = make_router({})
    assert router("tasks.infer", ("cnn",), {}, {"queue": "cpu"}) is None
    assert router("tasks.diag.noop", (), {}, {}) is None


def test_no_capable_worker_names_the_unmet_requirement() -> None:
    router = make_router({CPU.name: CPU})
    with pytest.raises(NoCapableWorker, match=r"cpu0@h lacks device cuda \(it is cpu\)"):
        router("tasks.infer", ("cnn",), {}, {"headers": {"requires": {"device": "cuda"}}})
    with pytest.raises(NoCapableWorker, match="no live worker is registered"):
        make_router({})("tasks.infer", ("cnn",), {}, {})
    assert router.stats.errors == 1


def test_a_precision_no_live_worker_runs_is_unsupported_dtype() -> None:
    router = make_router({CPU.name: CPU})  # CPU workers run fp32 and bf16
    with pytest.raises(UnsupportedDtype) as caught:
        router("tasks.infer", ("cnn",), {}, {"headers": {"requires": {"dtype": "fp16"}}})
    assert type(caught.value) is UnsupportedDtype
    assert str(caught.value) == str(unsupported_dtype("fp16", "any live worker", ["fp32", "bf16"]))
    assert "not supported on any live worker (supported: fp32, bf16)" in str(caught.value)
    assert router.stats.errors == 1 and router.stats.decisions == 0
    # the fleet's precisions in fp32, fp16, bf16 order, whatever order workers list them in
    odd = {
        w.name: w
        for w in (replace(CPU, name="c1@h", dtypes=("bf16", "fp32")), replace(CPU, name="c2@h"))
    }
    with pytest.raises(UnsupportedDtype, match=r"\(supported: fp32, bf16\)"):
        make_router(odd)("tasks.infer", ("cnn",), {}, {"headers": {"requires": {"dtype": "fp16"}}})
    lines = router.explain(TaskRequirements(model="cnn", dtype="fp16"))
    assert lines[-1].startswith("3. decision: UnsupportedDtype: dtype 'fp16' is not supported")


def test_other_reasons_stay_no_capable_worker_even_with_a_dtype() -> None:
    gpu = worker("gpu0", free_memory_mb=100)
    router = make_router({CPU.name: CPU, gpu.name: gpu})
    # fp16 runs on gpu0, which lacks the memory: the dtype is not why nobody can serve it
    with pytest.raises(NoCapableWorker, match=r"gpu0@h lacks 8000 MB free memory") as caught:
        router(
            "tasks.infer",
            ("cnn",),
            {},
            {"headers": {"requires": {"dtype": "fp16", "min_free_memory_mb": 8000}}},
        )
    assert "cpu0@h lacks 8000 MB free memory (it has 4000 MB)" in str(caught.value)
    # bf16 runs on cpu0, which is not a GPU
    old_gpu = worker("gpu1", dtypes=("fp32", "fp16"), compute_capability=(7, 5))
    mixed = make_router({CPU.name: CPU, old_gpu.name: old_gpu})
    with pytest.raises(NoCapableWorker, match=r"cpu0@h lacks device cuda"):
        mixed(
            "tasks.infer",
            ("cnn",),
            {},
            {"headers": {"requires": {"dtype": "bf16", "device": "cuda"}}},
        )
    with pytest.raises(NoCapableWorker, match=r"compute capability >= 8.0"):
        mixed(
            "tasks.infer",
            ("cnn",),
            {},
            {"headers": {"requires": {"dtype": "fp16", "min_compute_capability": "8.0"}}},
        )
    # no live worker at all: that, not the dtype, is what to fix
    with pytest.raises(NoCapableWorker, match="no live worker is registered"):
        make_router({})("tasks.infer", ("cnn",), {}, {"headers": {"requires": {"dtype": "fp16"}}})


# --- refresh before refusing ------------------------------------------------------------------


class ScriptedStore:
    """A registry store whose reads return ``reads`` in turn (the last one repeats)."""

    def __init__(self, *reads: list[WorkerCapabilities] | Exception) -> None:
        self.reads = list(reads)
        self.loads = 0

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def load(self) -> list[WorkerCapabilities]:
        self.loads += 1
        read = self.reads[min(self.loads, len(self.reads)) - 1]
        if isinstance(read, Exception):
            raise read
        return read


def registry_router(store: ScriptedStore, clock: Clock) -> tuple[CapabilityRouter, LiveRegistry]:
    """A router over a LiveRegistry on ``clock`` whose background refresher never fires."""
    registry = LiveRegistry(store, ttl_s=4.0, refresh_s=3600, now=clock)  # heartbeat: 2 s
    router = CapabilityRouter(registry.workers, reqs, StickyCache(now=clock))
    router.registry = registry
    return router, registry


def test_a_stale_snapshot_is_refreshed_once_before_refusing() -> None:
    clock = Clock()
    live = worker("gpu0", heartbeat=clock.t + 2.5)
    store = ScriptedStore([], [live])  # empty on the first read, the worker on the second
    router, registry = registry_router(store, clock)
    try:
        # a fresh empty snapshot refuses, without another read
        with pytest.raises(NoCapableWorker, match="no live worker is registered"):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 1
        clock.t += 2.5  # the snapshot is now older than a heartbeat interval
        assert router("tasks.infer", ("cnn",), {}, {}) == {"queue": live.queue}
        assert store.loads == 2 and router.stats.misses == 1 and router.stats.errors == 1
        clock.t += 10  # stale again, but a decision that succeeds never reads the store
        assert router("tasks.infer", ("cnn",), {}, {}) == {"queue": live.queue}
        assert store.loads == 2
    finally:
        registry.close()


def test_the_refresh_before_refusing_is_rate_limited() -> None:
    clock = Clock()
    store = ScriptedStore([], ConnectionError("registry down"))
    router, registry = registry_router(store, clock)
    try:
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})  # first read: empty, and fresh
        clock.t += 2.5  # stale; every read from now on fails, so it stays stale
        for _ in range(3):
            with pytest.raises(NoCapableWorker):
                router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 2  # one attempt for three refusals within the same instant
        clock.t += 0.099
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 2  # still within 100 ms of that attempt
        clock.t += 0.002
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 3  # 101 ms later: one more attempt
        assert router.stats.errors == 6
    finally:
        registry.close()


def test_a_renewed_snapshot_is_not_read_again_within_a_heartbeat() -> None:
    clock = Clock()
    store = ScriptedStore([])  # the fleet stays empty
    router, registry = registry_router(store, clock)
    try:
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        clock.t += 2.5
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 2  # renewed: fresh for another heartbeat interval
        clock.t += 1.9
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 2
        clock.t += 0.2
        with pytest.raises(NoCapableWorker):
            router("tasks.infer", ("cnn",), {}, {})
        assert store.loads == 3
    finally:
        registry.close()


def test_a_stale_cpu_only_snapshot_is_refreshed_before_unsupported_dtype() -> None:
    clock = Clock()
    cpu = replace(CPU, heartbeat=clock.t)
    gpu = worker("gpu0", heartbeat=clock.t + 2.5)
    store = ScriptedStore([cpu], [cpu, gpu])
    router, registry = registry_router(store, clock)
    fp16 = {"headers": {"requires": {"dtype": "fp16"}}}
    try:
        with pytest.raises(UnsupportedDtype, match=r"supported: fp32, bf16"):
            router("tasks.infer", ("cnn",), {}, fp16)
        clock.t += 2.5
        assert router("tasks.infer", ("cnn",), {}, fp16) == {"queue": gpu.queue}
        assert store.loads == 2
    finally:
        registry.close()


# --- registry ---------------------------------------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, WorkerCapabilities] = {}

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        self.records[caps.name] = caps

    def remove(self, name: str) -> None:
        self.records.pop(name, None)

    def load(self) -> list[WorkerCapabilities]:
        return list(self.records.values())


def test_registry_expires_dead_workers_and_reports_evictions() -> None:
    clock, store = Clock(), FakeStore()
    lost: list[str] = []
    evicted: list[tuple[str, str]] = []
    reg = LiveRegistry(
        store,
        ttl_s=4.0,
        now=clock,
        on_lost=lost.append,
        on_evicted=lambda w, m: evicted.append((w, m)),
    )
    store.publish(worker("a", heartbeat=clock.t, models_loaded=("cnn", "mlp")), 4)
    store.publish(worker("b", heartbeat=clock.t), 4)
    reg.refresh()
    assert set(reg.workers()) == {"a@h", "b@h"}
    clock.t += 3.0
    store.publish(
        worker("a", heartbeat=clock.t, models_loaded=("mlp",)), 4
    )  # a evicted cnn; b silent
    reg.refresh()
    assert set(reg.workers()) == {"a@h", "b@h"}  # b's last beat is 3 s old: still alive
    assert evicted == [("a@h", "cnn")]
    clock.t += 1.5  # b's last beat is now 4.5 s old > 2 intervals
    reg.refresh()
    assert set(reg.workers()) == {"a@h"} and lost == ["b@h"]
    reg.close()


# --- queues -----------------------------------------------------------------------------------


def test_direct_queue_names_carry_their_fallback() -> None:
    q = direct_queue("gpu", "gpu0")
    assert q == "gpu.direct.gpu0" and fallback_of(q) == "gpu"
    assert fallback_of("gpu") is None and fallback_of("a.b") is None
    with pytest.raises(ValueError):
        direct_queue("gpu", "x.direct.y")
    assert dead_letter_arguments("cpu", 4000) == {
        "x-message-ttl": 4000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "cpu",
    }


def test_queue_arguments_per_kind_of_queue() -> None:
    quorum = {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    # a class queue dead-letters poison messages to <class>.dead
    assert queue_arguments("gpu") == {
        **quorum,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "gpu.dead",
    }
    # a direct queue expires and dead-letters into its class queue
    assert queue_arguments("gpu.direct.gpu0", direct_ttl_ms=250) == {
        **quorum,
        **dead_letter_arguments("gpu", 250),
    }
    # a dead-letter queue keeps what it gets: no limit, no further dead-lettering
    assert queue_arguments("gpu.dead") == {"x-queue-type": "quorum"}
    assert dead_letter_queue("gpu") == "gpu.dead"
    assert dead_letter_queue("gpu.direct.gpu0") is None and dead_letter_queue("gpu.dead") is None
    # classic queues: no delivery limit, the direct-queue fallback stays
    assert queue_arguments("cpu", "classic") == {}
    assert queue_arguments("cpu.direct.c0", "classic", direct_ttl_ms=9) == dead_letter_arguments(
        "cpu", 9
    )
    with pytest.raises(ValueError, match="queue type"):
        queue_arguments("cpu", "stream")
    # INFER_MAX_QUEUE_LENGTH bounds task queues (a publish past it is nacked), any type
    bounded = {"x-max-length": 7, "x-overflow": "reject-publish"}
    assert queue_arguments("gpu", max_length=7) == {**queue_arguments("gpu"), **bounded}
    assert queue_arguments("cpu", "classic", max_length=7) == bounded
    direct = "gpu.direct.gpu0"
    assert queue_arguments(direct, max_length=7) == {**queue_arguments(direct), **bounded}
    assert queue_arguments("gpu.dead", max_length=7) == {"x-queue-type": "quorum"}


def test_celery_declares_every_queue_with_its_arguments() -> None:
    from tasks import app

    settings = app.infer_settings
    for name in (direct_queue("cpu", "cpu7"), "cpu-plain", "cpu"):
        assert app.amqp.queues[name].queue_arguments == queue_arguments(
            name,
            settings.queue_type,
            settings.delivery_limit,
            settings.direct_queue_ttl_ms,
            settings.max_queue_length,
        )
    assert app.amqp.queues["cpu"].queue_arguments["x-max-length"] == settings.max_queue_length
    assert app.amqp.queues["cpu"].exchange.type == "topic"  # for native delayed delivery


def test_delivery_count_header() -> None:
    from tasks.worker.poison import deliveries

    assert deliveries(None) == 0 and deliveries({}) == 0
    assert deliveries({"x-delivery-count": 5}) == 5
    assert deliveries({"x-delivery-count": "junk"}) == 0
