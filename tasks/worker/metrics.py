"""Prometheus metrics of a worker (and of any process that routes), with prometheus-client.

Served over HTTP by the process that owns the device runtime (the prefork
child, or the main process of a ``threads``/``solo`` worker) on
``INFER_METRICS_ADDR:INFER_METRICS_PORT`` (default ``127.0.0.1:9808``; ``0``
switches it off).  One port per worker: give each worker on a host its own.
A replaced pool child starts its counters from zero, which Prometheus'
``rate()`` and ``increase()`` treat as a counter reset.

Per request (``task_success``/``task_failure`` of ``tasks.infer``):

- ``infer_requests_total{model,outcome}``: ``success`` or the error's class name
  (``DeadlineExceeded`` too for a request dropped past its deadline by the consumer)
- ``infer_queue_wait_seconds{model}``: publish to start, from the message's send stamp
- ``infer_batch_wait_seconds{model}``: wait for a dynamic batch to fill
- ``infer_service_seconds{model}``: start to finish on the worker

Per forward pass: ``infer_compute_seconds{model,dtype}`` and
``infer_batch_size{model}`` (samples in the pass).  Per model load and evict:
``infer_model_loads_total{model,dtype}``, ``infer_model_load_seconds{model}``
and ``infer_model_evictions_total{model,dtype}``.  Read at scrape time:
``infer_models_loaded``, ``infer_model_loaded{model,version,dtype}``,
``infer_model_cache_bytes{kind=used|budget}``,
``infer_device_memory_bytes{device,kind=used|free|total}`` and
``infer_tasks_running``.  Router (any process that has routed a request):
``infer_router_decisions_total{outcome}``, ``infer_router_sticky_hit_ratio``
and ``infer_router_decision_seconds{quantile}``.

Nothing happens at import but defining the metric objects; the HTTP server
starts only in :func:`serve`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery.signals import task_failure, task_success
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tasks.app import app
from tasks.wire.catalog import local_catalog
from tasks.wire.request import infer_call
from tasks.worker import load
from tasks.worker.device import RuntimeView, device_memory
from tasks.worker.running import running_tasks

if TYPE_CHECKING:
    from tasks.app import InferenceApp

__all__ = ["observe_eviction", "observe_forward", "observe_load", "serve"]

log = logging.getLogger(__name__)

INFER_TASK = "tasks.infer"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter(
    "infer_requests", "Inference requests finished, by model and outcome", ["model", "outcome"]
)
QUEUE_WAIT = Histogram(
    "infer_queue_wait_seconds",
    "Time from publish to task start",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_WAIT = Histogram(
    "infer_batch_wait_seconds",
    "Time a request waited for its dynamic batch to fill",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
SERVICE = Histogram(
    "infer_service_seconds",
    "Task start to finish on the worker",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE = Histogram(
    "infer_compute_seconds",
    "One forward pass, host-to-device copy and back included",
    ["model", "dtype"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "infer_batch_size", "Samples in one forward pass", ["model"], buckets=BATCH_BUCKETS
)
LOADS = Counter("infer_model_loads", "Models loaded into the cache", ["model", "dtype"])
LOAD_TIME = Histogram(
    "infer_model_load_seconds",
    "Time to load a model's safetensors weights onto the device",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
EVICTIONS = Counter("infer_model_evictions", "Models evicted from the cache", ["model", "dtype"])


def _model_label(model: object) -> str:
    """The model's name (a version pin dropped) if this worker serves it, else ``unknown``.

    Bounded label values: a caller cannot mint a label by naming models that do not exist.
    """
    if not isinstance(model, str):
        return "unknown"
    name = model.partition("@")[0]
    return name if name in local_catalog(app.infer_settings) else "unknown"


def observe_forward(model: str, dtype: str, batch_size: int, compute_ms: float) -> None:
    """Record one forward pass."""
    COMPUTE.labels(model, dtype).observe(compute_ms / 1000.0)
    BATCH_SIZE.labels(model).observe(batch_size)


def observe_load(model: str, dtype: str, seconds: float) -> None:
    LOADS.labels(model, dtype).inc()
    LOAD_TIME.labels(model).observe(seconds)


def observe_eviction(model: str, dtype: str) -> None:
    EVICTIONS.labels(model, dtype).inc()


@task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != INFER_TASK or not isinstance(result, dict):
        return
    model = _model_label(result.get("model"))
    REQUESTS.labels(model, "success").inc()
    timing = result.get("timing") or {}
    for histogram, key in (
        (QUEUE_WAIT, "queue_wait_ms"),
        (BATCH_WAIT, "batch_wait_ms"),
        (SERVICE, "service_ms"),
    ):
        value = timing.get(key)
        if isinstance(value, int | float):
            histogram.labels(model).observe(value / 1000.0)


@task_failure.connect
def _on_failure(
    sender: Any = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    if getattr(sender, "name", None) != INFER_TASK:
        return
    model = infer_call(args, kwargs, strict=False).model
    REQUESTS.labels(_model_label(model), type(exception).__name__).inc()


class RuntimeCollector(Collector):
    """Gauges read from the worker's runtime at scrape time."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        cache = self.runtime.cache
        keys = cache.keys()
        yield GaugeMetricFamily("infer_models_loaded", "Models in this worker's cache", len(keys))
        loaded = GaugeMetricFamily(
            "infer_model_loaded",
            "1 for each model version and precision held",
            labels=["model", "version", "dtype"],
        )
        for ref, dtype in keys:
            name, _, version = ref.partition("@")
            loaded.add_metric([name, version, dtype], 1)
        yield loaded
        cache_bytes = GaugeMetricFamily(
            "infer_model_cache_bytes", "Model cache size and budget", labels=["kind"]
        )
        cache_bytes.add_metric(["used"], cache.used_bytes)
        cache_bytes.add_metric(["budget"], cache.budget_bytes)
        yield cache_bytes
        memory = GaugeMetricFamily(
            "infer_device_memory_bytes",
            "Device memory: CUDA for a GPU worker, host RAM for a CPU worker",
            labels=["device", "kind"],
        )
        for kind, value in self._memory().items():
            memory.add_metric([str(self.runtime.device), kind], value)
        yield memory
        yield GaugeMetricFamily("infer_tasks_running", "Tasks running now", running_tasks())

    def _memory(self) -> dict[str, int]:
        memory = device_memory(self.runtime.device)
        used = memory.used
        if self.runtime.device.type != "cuda":
            import psutil

            used = psutil.Process().memory_info().rss  # this worker process, not the host
        return {"used": used, "free": memory.free, "total": memory.total}


class RouterCollector(Collector):
    """The capability router's counters, if this process has routed anything."""

    OUTCOMES = (
        ("sticky_hit", "sticky_hits"),
        ("spill", "spills"),
        ("fallback", "fallbacks"),
        ("miss", "misses"),
        ("no_capable_worker", "errors"),
        ("overloaded", "overloaded"),
        ("rerouted", "rerouted"),
    )

    def __init__(self, app: InferenceApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        router = self.app.built_router  # never build one just to report on it
        if router is None:
            return
        stats = router.stats
        decisions = CounterMetricFamily(
            "infer_router_decisions", "Routing decisions by outcome", labels=["outcome"]
        )
        for label, attr in self.OUTCOMES:
            decisions.add_metric([label], getattr(stats, attr))
        yield decisions
        yield GaugeMetricFamily(
            "infer_router_sticky_hit_ratio",
            "Share of decisions that went to the model's sticky worker",
            stats.sticky_hit_rate,
        )
        quantiles = GaugeMetricFamily(
            "infer_router_decision_seconds",
            "Decision time over the last 10,000 decisions",
            labels=["quantile"],
        )
        percentiles = stats.as_dict()["decision_us"]  # {"p50": µs, "p99": µs}; {} before any
        for label, key in (("0.5", "p50"), ("0.99", "p99")):
            if key in percentiles:
                quantiles.add_metric([label], percentiles[key] / 1e6)
        yield quantiles


class ExpiredSync(Collector):
    """Adds the consumer's deadline drops to ``infer_requests_total`` at each scrape.

    A request dropped past its deadline by the worker's consumer (its main
    process, :mod:`tasks.worker.expired`) is counted there, in memory shared
    with this process (:mod:`tasks.worker.load`); registered ahead of the
    requests counter, so one scrape shows them.  Yields no metric of its own.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def collect(self) -> Iterator[Any]:
        shared = load.shared()
        if shared is not None:
            for model, count in shared.expired_counts().items():
                delta = count - self._seen.get(model, 0)
                if delta > 0:
                    REQUESTS.labels(model, "DeadlineExceeded").inc(delta)
                    self._seen[model] = count
        yield from ()


_served: tuple[str, int] | None = None
_lock = threading.Lock()


def serve(
    port: int,
    addr: str = "127.0.0.1",
    runtime: RuntimeView | None = None,
    app: InferenceApp | None = None,
) -> bool:
    """Start the ``/metrics`` HTTP server in this process; False if off or the port is taken.

    Workers call it once the runtime exists.  A client application can call
    ``tasks.worker.metrics.serve(9810, app=app)`` to export its router's decisions too.
    """
    global _served
    if port == 0:
        return False
    with _lock:
        if _served is not None:
            return True
        try:
            start_http_server(port, addr)
        except OSError as e:
            log.error(
                "metrics not served: cannot listen on %s:%d (%s); give each worker on this host "
                "its own INFER_METRICS_PORT, or 0 to switch metrics off",
                addr,
                port,
                e,
            )
            return False
        # Collected in registration order: the consumer's deadline drops are added first.
        REGISTRY.unregister(REQUESTS)
        REGISTRY.register(ExpiredSync())
        REGISTRY.register(REQUESTS)
        if app is not None:
            REGISTRY.register(RouterCollector(app))
        if runtime is not None:
            REGISTRY.register(RuntimeCollector(runtime))
        _served = (addr, port)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
    return True
