"""The runtime of the process that owns the device: device, model cache, batched forward passes.

Pool choice: device workers run Celery's prefork pool with one child
(``-P prefork -c 1``).  The parent never imports CUDA; the child creates the
runtime (device, cache, models) in ``worker_process_init`` or on its first
task (:mod:`tasks.worker.lifecycle`).  Prefork is the only Celery pool that
enforces ``task_time_limit`` (it kills the child), and a crash in native code
(a CUDA fault, an OOM kill) takes down only the child: the parent reports it,
respawns a child, and ``task_reject_on_worker_lost`` sends the message back to
the queue.  A ``solo``/``threads`` pool also works (the runtime is then built
in the main process, which never forks), but without enforced hard time
limits.  Workers with dynamic batching (``--batching``) stay prefork with one
child: the main process assembles batches (:mod:`tasks.worker.strategy`) and
hands each to the child as one pool job (:mod:`tasks.worker.batch_job`), which
runs it through :meth:`WorkerRuntime.forward_batch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np

from models.registry import ModelSpec, get_spec
from tasks.app import app
from tasks.settings import Settings
from tasks.worker import metrics
from tasks.worker.device import device_memory

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["WorkerRuntime", "get_runtime"]

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
        # Called after a load or unload (the heartbeat's beat, once it runs).
        self.on_change: Callable[[], None] | None = None
        self._sample_bytes: dict[Hashable, int] = {}

    # Batch key: (model, compute precision, sample shape, input dtype).
    def forward_batch(self, key: Hashable, stacked: np.ndarray) -> tuple[np.ndarray, float]:
        """One forward pass over ``stacked`` for ``key``; outputs and compute ms.

        On CUDA it measures the peak memory per sample, which :meth:`memory_cap` uses.
        """
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

    def memory_cap(self, key: Hashable) -> int | None:
        """Largest batch the device's free memory allows for this key (measured per sample)."""
        per_sample = self._sample_bytes.get(key)
        if self.device.type != "cuda" or not per_sample:
            return None  # host RAM, or not measured yet (the first batch measures it)
        return int(device_memory(self.device).free * 0.8 // per_sample)

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
        if self.on_change is not None:
            self.on_change()

    def preload(self, names: tuple[str, ...]) -> None:
        """Load each model in its default precision for this device."""
        from models.runner import resolve_dtype

        for name in names:
            spec = get_spec(name)
            self.model(spec, resolve_dtype(None, spec, self.device))
        if names:
            log.info("preloaded %s on %s", ", ".join(names), self.device)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, created on first use (never in a parent that forks)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(app.infer_settings)
        return _runtime
