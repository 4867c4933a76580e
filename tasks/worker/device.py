"""What the heartbeat and the metrics read from a worker's runtime, and device memory.

:class:`RuntimeView` is the small surface of
:class:`tasks.worker.runtime.WorkerRuntime` that observers need: its device
and its model cache.  They take it as a ``Protocol``, so neither imports the
runtime (and the runtime can import them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["CacheView", "DeviceMemory", "RuntimeView", "device_memory"]


class CacheView(Protocol):
    """The model cache as observers see it (:class:`models.cache.ModelCache`)."""

    @property
    def used_bytes(self) -> int: ...

    @property
    def budget_bytes(self) -> int: ...

    def keys(self) -> list[tuple[str, str]]: ...


class RuntimeView(Protocol):
    """A worker runtime as observers see it: its device and its model cache."""

    @property
    def device(self) -> torch.device: ...

    @property
    def cache(self) -> CacheView: ...


class DeviceMemory(NamedTuple):
    """Bytes of memory on a device: CUDA memory for a GPU, host RAM for the CPU."""

    free: int
    total: int

    @property
    def used(self) -> int:
        return self.total - self.free


def device_memory(device: torch.device) -> DeviceMemory:
    """Free and total memory of ``device`` now (``torch.cuda.mem_get_info``, or psutil's host RAM)."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(int(free), int(total))
    import psutil

    host = psutil.virtual_memory()
    return DeviceMemory(int(host.available), int(host.total))
