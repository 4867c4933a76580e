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

from models.catalog import ModelCatalog
from models.spec import ModelSpec
from models.text import check_text, token_bucket
from tasks.app import app
from tasks.settings import Settings
from tasks.wire.catalog import local_catalog
from tasks.wire.request import checked_inputs
from tasks.worker import metrics
from tasks.worker.device import device_memory

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Batch", "WorkerRuntime", "get_runtime"]

# A checked batch: an array (N, *sample_shape), or a text model's token ids, one list per text.
Batch = np.ndarray | list[list[int]]

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
            on_evict=lambda key: metrics.observe_eviction(key[0].partition("@")[0], key[1]),
        )
        # Called after a load or unload (the heartbeat's beat, once it runs).
        self.on_change: Callable[[], None] | None = None
        self._sample_bytes: dict[Hashable, int] = {}

    @property
    def catalog(self) -> ModelCatalog:
        """The models this worker can serve (its own sources only)."""
        return local_catalog(self.settings)

    def checked_batch(self, spec: ModelSpec, precision: str, inputs: object) -> Batch:
        """``inputs`` checked for ``spec``: an array batch, or a text model's token ids.

        Tokenizing needs the model's tokenizer, so a text model is loaded here
        (TextTooLong past its ``max_tokens``, unless it truncates).
        """
        limit = self.settings.max_payload_bytes
        if spec.text is None:
            return checked_inputs(spec, inputs, limit)
        texts = check_text(spec, inputs, limit)
        return self.model(spec, precision).tokenize(texts)  # type: ignore[operator]

    @staticmethod
    def group_key(spec: ModelSpec, precision: str, batch: Batch) -> Hashable:
        """Requests with equal keys share a forward pass: (model@version, precision, shape, dtype).

        A text model's key is its padded-length bucket instead of a shape.
        """
        if isinstance(batch, np.ndarray):
            return (spec.ref, precision, batch.shape[1:], batch.dtype.str)
        assert spec.text is not None
        longest = max(len(row) for row in batch)
        return (spec.ref, precision, "text", token_bucket(longest, spec.text.max_tokens))

    def forward_batch(self, key: Hashable, stacked: Batch) -> tuple[np.ndarray, float]:
        """One forward pass over ``stacked`` for ``key`` (:meth:`group_key`); outputs and compute ms.

        On CUDA it measures the peak memory per sample, which :meth:`memory_cap` uses.
        """
        import torch

        from models.runner import forward, forward_text

        ref, precision = key[0], key[1]  # type: ignore[index]
        spec = self.catalog.resolve(ref)
        model = self.model(spec, precision)

        def run() -> tuple[np.ndarray, float]:
            if isinstance(stacked, np.ndarray):
                return forward(model, stacked, self.device, precision)
            return forward_text(model, stacked, self.device)

        if self.device.type != "cuda":
            result = run()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = run()
            peak = torch.cuda.max_memory_allocated(self.device) - before
            self._sample_bytes[key] = max(self._sample_bytes.get(key, 0), peak // len(stacked))
        metrics.observe_forward(spec.name, precision, len(stacked), result[1])
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

        ref, dtype = key
        spec = self.catalog.resolve(ref)
        started = time.perf_counter()
        module = load_model(spec, self.device, DTYPES[dtype])
        metrics.observe_load(spec.name, dtype, time.perf_counter() - started)
        return module

    def model(self, spec: ModelSpec, dtype: str) -> nn.Module:
        """The cached module for ``spec`` (its version) in precision ``dtype`` (loaded on a miss)."""
        return self.cache.get((spec.ref, dtype))

    def advertise(self) -> None:
        """Publish the capabilities now (after a load or unload), not at the next beat."""
        if self.on_change is not None:
            self.on_change()

    def preload(self, names: tuple[str, ...]) -> None:
        """Load each model in its default precision for this device."""
        from models.runner import resolve_dtype

        for name in names:
            spec = self.catalog.resolve(name)
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
