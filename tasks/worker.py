"""Worker lifecycle: the device this process is bound to, its model cache, preloading.

Pool choice: device workers run Celery's prefork pool with one child
(``-P prefork -c 1``).  The parent never imports CUDA; the child creates the
runtime (device, cache, models) in ``worker_process_init`` or on its first
task.  Prefork is the only Celery pool that enforces ``task_time_limit`` (it
kills the child), and a crash in native code (a CUDA fault, an OOM kill) takes
down only the child: the parent reports it, respawns a child, and
``task_reject_on_worker_lost`` sends the message back to the queue.  A
``solo``/``threads`` pool also works (the runtime is then built in the main
process, which never forks), but without enforced hard time limits.
Workers with dynamic batching (``--batching``) use ``-P threads``: batching
needs many requests in flight in the one process that owns the device.

Each worker also advertises its capabilities (:mod:`tasks.heartbeat`) from the
process that owns the runtime, for the router.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from celery.worker.consumer import Consumer

from models.registry import ModelSpec, get_spec
from routing.queues import direct_queue, fallback_of
from routing.registry import store_for
from tasks import metrics
from tasks.app import app
from tasks.batcher import BatchPolicy, DynamicBatcher
from tasks.codec import refuse_text_content
from tasks.settings import Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tasks.heartbeat import Heartbeat

__all__ = ["TelemetryConsumer", "WorkerRuntime", "get_runtime", "main", "worker_argv"]

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Everything one worker process needs to run models on its device."""

    def __init__(self, settings: Settings) -> None:
        import torch

        from models.cache import ModelCache
        from models.loader import size_of
        from models.runner import resolve_device

        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device: torch.device = resolve_device(settings.device)
        self.cache: ModelCache[tuple[str, str], nn.Module] = ModelCache(
            settings.cache_budget_mb * 1024 * 1024,
            load=self._load,
            size_of=size_of,
            on_evict=lambda key: metrics.observe_eviction(*key),
        )
        self.batcher: DynamicBatcher | None = None
        if settings.batching:
            from tasks.heartbeat import running_tasks

            self.batcher = DynamicBatcher(
                self._run_batch, self._policy, self._memory_cap, active=running_tasks
            )
        self._sample_bytes: dict[Hashable, int] = {}

    # Batch key: (model, compute precision, sample shape, input dtype).
    def _policy(self, key: Hashable) -> BatchPolicy:
        spec = get_spec(key[0])  # type: ignore[index]
        return BatchPolicy(
            max_batch_size=spec.max_batch_size or self.settings.max_batch_size,
            max_wait_ms=spec.max_wait_ms
            if spec.max_wait_ms is not None
            else self.settings.max_wait_ms,
        )

    def _run_batch(self, key: Hashable, stacked: np.ndarray) -> tuple[np.ndarray, float]:
        import torch

        from models.runner import forward

        name, precision = key[0], key[1]  # type: ignore[index]
        model = self.model(get_spec(name), precision)
        if self.device.type != "cuda":
            result = forward(model, stacked, self.device, precision)
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = forward(model, stacked, self.device, precision)
            peak = torch.cuda.max_memory_allocated(self.device) - before
            self._sample_bytes[key] = max(self._sample_bytes.get(key, 0), peak // len(stacked))
        metrics.observe_forward(name, precision, len(stacked), result[1])
        return result

    def _memory_cap(self, key: Hashable, sample: np.ndarray) -> int | None:
        """Largest batch the device's free memory allows for this key (measured per sample)."""
        per_sample = self._sample_bytes.get(key)
        if self.device.type != "cuda" or not per_sample:
            return None  # host RAM, or not measured yet (the first batch measures it)
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * 0.8 // per_sample)

    def _load(self, key: tuple[str, str]) -> nn.Module:
        from models.loader import load_model
        from models.runner import DTYPES

        name, dtype = key
        assert self.settings.weights_dir is not None
        started = time.perf_counter()
        module = load_model(get_spec(name), self.settings.weights_dir, self.device, DTYPES[dtype])
        metrics.observe_load(name, dtype, time.perf_counter() - started)
        return module

    def model(self, spec: ModelSpec, dtype: str) -> nn.Module:
        """The cached module for ``spec`` in precision ``dtype`` (loaded on a miss)."""
        return self.cache.get((spec.name, dtype))

    def advertise(self) -> None:
        """Publish the capabilities now (after a load or unload), not at the next beat."""
        if _heartbeat is not None:
            _heartbeat.beat()

    def preload(self, names: tuple[str, ...]) -> None:
        """Load each model in its default precision for this device."""
        from models.runner import resolve_dtype

        for name in names:
            spec = get_spec(name)
            self.model(spec, resolve_dtype(None, spec, self.device))
        if names:
            log.info("preloaded %s on %s", ", ".join(names), self.device)


class TelemetryConsumer(Consumer):
    """The worker's consumer: dead-letters undecodable messages; events without confirms.

    In Celery's consumer ``connection_for_write`` serves only the Events
    bootstep.  Events are telemetry for Flower (transient messages on a
    fanout exchange), so the worker need not wait for a broker confirm on
    each of the three it sends per task (received, started, succeeded).
    Measured with ``python -m benchmarks`` (3 runs each, events on): no-op
    p50 over celery_baseline 1.13 (median) unconfirmed vs 1.19 confirmed.
    Task messages and results keep their confirms; only events skip them.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Dead-letter a message that cannot be decoded (Celery's default acks and drops it).

        Covers bodies that are not valid JSON/msgpack and refused content
        types such as pickle (``ContentDisallowed``: never deserialised).  The
        message goes to ``<queue>.dead`` with its headers intact for inspection.
        """
        log.critical(
            "refused a message that cannot be decoded (%s: %s); content type %r, headers %r: "
            "dead-lettered, not run",
            type(exc).__name__,
            exc,
            message.content_type,
            message.headers,
        )
        if message.delivery_info.get("consumer_tag") in (message.channel.no_ack_consumers or ()):
            # A remote-control broadcast (no-ack pidbox queue): there is nothing to reject,
            # and rejecting a tag the broker never tracked makes it close the channel.
            return
        message.reject_log_error(log, self.connection_errors, requeue=False)

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
            )
        )


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, created on first use (never in a parent that forks)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(app.infer_settings)
        return _runtime


# Set in the worker's main process before the pool forks, so children inherit them.
_node: str | None = None
_own_queue: str | None = None
_heartbeat: Heartbeat | None = None


def _queue_depth(queue: str) -> Any:
    """A callable counting ready messages in ``queue`` over its own broker connection."""
    conn = app.connection_for_write()

    def depth() -> int:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)

    return depth


def _preload() -> None:
    global _heartbeat
    settings = app.infer_settings
    runtime = get_runtime()
    runtime.preload(settings.preload)
    if _node is not None and _own_queue is not None and _heartbeat is None:
        from tasks.heartbeat import Heartbeat

        fallback = fallback_of(_own_queue) or _own_queue
        store = store_for(settings.backend, settings.home, settings.registry_namespace)
        _heartbeat = Heartbeat(
            _node, _own_queue, fallback, settings, runtime, store, _queue_depth(_own_queue)
        ).start()
    metrics.serve(settings.metrics_port, settings.metrics_addr, runtime)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@celeryd_after_setup.connect
def _announce(sender: str, instance: Any, **_: Any) -> None:
    settings = app.infer_settings
    line = f"[{sender}] device={settings.device} preload={','.join(settings.preload) or '-'}; {settings.describe()}"
    log.warning(line)  # WARNING so it shows at any log level


@worker_init.connect
def _preload_in_main(sender: Any = None, **_: Any) -> None:
    global _node, _own_queue
    _node = getattr(sender, "hostname", None)
    consumed = list(getattr(sender.app.amqp.queues, "consume_from", {}) or {}) if sender else []
    _own_queue = next((q for q in consumed if fallback_of(q) is not None), None)
    if _own_queue is None:
        log.warning(
            "worker %s consumes no direct queue (%s): it will not advertise "
            "capabilities, so the router never picks it",
            _node,
            consumed,
        )
    if sender is not None:
        _declare(list(consumed))
    refuse_text_content()  # kombu would hand such a body on undecoded and stop the worker
    # prefork children preload in worker_process_init; every other pool runs
    # tasks in this very process, which never forks, so load here.
    pool = getattr(sender, "pool_cls", None)
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in str(pool_name):
        _preload()


def _declare(queues: list[str]) -> None:
    from tasks.queues import declare_topology

    try:
        declared = declare_topology(app, queues)
    except Exception as e:  # the consumer still declares what it consumes on connect
        log.error("could not declare the queue topology (dead-letter queues, default queue): %s", e)
    else:
        if declared:
            log.info("declared queues %s", ", ".join(declared))


@worker_process_init.connect
def _preload_in_child(**_: Any) -> None:
    _preload()


def worker_argv(
    name: str,
    device: str,
    queues: list[str] | None = None,
    loglevel: str = "INFO",
    batching: bool = False,
    concurrency: int = 32,
) -> list[str]:
    """The ``celery worker`` command line for a worker bound to ``device``.

    ``name`` is the node name prefix (``gpu0@host``).  The worker consumes its
    own direct queue (``gpu.direct.gpu0``) and the shared queue of its device
    class (``gpu`` or ``cpu``), where its direct queue's expired messages fall
    back, unless ``queues`` says otherwise.  compose.yaml uses exactly this.
    """
    device_class = "gpu" if device.startswith("cuda") else "cpu"
    queues = queues or [direct_queue(device_class, name), device_class]
    return [
        "celery",
        "-A",
        "tasks",
        "worker",
        "-n",
        f"{name}@%h",
        "-Q",
        ",".join(queues),
        "-P",
        "threads" if batching else "prefork",
        "-c",
        str(concurrency) if batching else "1",
        "--without-gossip",
        "--without-mingle",
        "-l",
        loglevel,
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.worker --name cpu0 --device cpu``: exec the celery worker."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.worker", description=main.__doc__)
    parser.add_argument("--name", default="cpu0", help="node name and own queue, e.g. gpu0 or cpu1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument(
        "--batching", action="store_true", help="dynamic batching (threads pool, many in flight)"
    )
    parser.add_argument(
        "--print", action="store_true", help="print the command instead of running it"
    )
    args = parser.parse_args(argv)
    cmd = worker_argv(args.name, args.device, batching=args.batching)
    print(" ".join(cmd), flush=True)
    if args.print:
        return 0
    os.environ["INFER_DEVICE"] = args.device
    if args.batching:
        os.environ["INFER_BATCHING"] = "true"
    # Run celery with this interpreter, so a virtualenv need not be on PATH.
    os.execv(sys.executable, [sys.executable, "-m", "celery", *cmd[1:]])  # noqa: S606
    return 1  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
