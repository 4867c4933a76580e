"""What a request needs, what a worker has, and which workers can serve it.

Pure Python (no torch, no celery): workers describe themselves as
:class:`WorkerCapabilities` (JSON-serialisable), callers' requests become
:class:`TaskRequirements`, and :func:`match` ranks the workers that satisfy
them.  :func:`unmet` says in words why a worker cannot serve a request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.errors import ConfigurationError

__all__ = [
    "DEVICE_KINDS",
    "DTYPES",
    "TaskRequirements",
    "WorkerCapabilities",
    "best",
    "match",
    "unmet",
]

DEVICE_KINDS = ("any", "cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TaskRequirements:
    """What one request needs.  ``None``/``any``/``0`` mean "no constraint".

    ``model_memory_mb`` comes from the model registry and applies only to a
    worker that would have to load the model; ``min_free_memory_mb`` is
    headroom the caller asks for, on any worker.
    """

    device: str = "any"
    min_free_memory_mb: int = 0
    model_memory_mb: int = 0
    min_compute_capability: tuple[int, int] | None = None
    dtype: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICE_KINDS:
            raise ConfigurationError(
                f"device {self.device!r}: use one of {', '.join(DEVICE_KINDS)}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigurationError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.min_free_memory_mb < 0 or self.model_memory_mb < 0:
            raise ConfigurationError("memory requirements must be >= 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TaskRequirements:
        """Build from a header/option dict; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigurationError(
                f"unknown requirement(s) {sorted(unknown)}: use {', '.join(sorted(known))}"
            )
        values = dict(data)
        cc = values.get("min_compute_capability")
        if cc is not None:
            values["min_compute_capability"] = _capability(cc)
        return cls(**values)

    def merged(self, overrides: Mapping[str, Any]) -> TaskRequirements:
        """These requirements with ``overrides`` applied on top (per-call wins)."""
        base = {k: v for k, v in asdict(self).items() if k not in overrides}
        return TaskRequirements.from_mapping({**base, **overrides})

    @property
    def key(self) -> tuple[object, ...]:
        """Sticky key: the model and every requirement (hashable; the cache is per process)."""
        return (
            self.model,
            self.device,
            self.dtype,
            self.min_free_memory_mb,
            self.model_memory_mb,
            self.min_compute_capability,
        )


def _capability(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return int(major), int(minor or 0)
    major, minor = value
    return int(major), int(minor)


@dataclass(frozen=True)
class WorkerCapabilities:
    """One worker's advertised state, refreshed on every heartbeat."""

    name: str  # Celery node name, e.g. gpu0@host
    queue: str  # its own direct queue
    device_kind: str  # cpu or cuda
    device_name: str
    device_index: int | None
    total_memory_mb: int
    free_memory_mb: int
    compute_capability: tuple[int, int] | None
    dtypes: tuple[str, ...]
    models_loaded: tuple[str, ...] = ()
    in_flight: int = 0
    max_in_flight: int = 4
    heartbeat: float = 0.0  # wall-clock seconds of the last beat
    device_class_queue: str = field(default="")  # shared fallback queue (cpu / gpu)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerCapabilities:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # newer workers may add fields
        if data.get("compute_capability") is not None:
            data["compute_capability"] = tuple(data["compute_capability"])
        data["dtypes"] = tuple(data.get("dtypes", ()))
        data["models_loaded"] = tuple(data.get("models_loaded", ()))
        return cls(**data)


def unmet(req: TaskRequirements, worker: WorkerCapabilities) -> str | None:
    """Why ``worker`` cannot serve ``req``, or None when it can."""
    if req.device != "any" and worker.device_kind != req.device:
        return f"device {req.device} (it is {worker.device_kind})"
    loaded = req.model is not None and req.model in worker.models_loaded
    if not loaded and worker.free_memory_mb < req.model_memory_mb:
        return (
            f"{req.model_memory_mb} MB free to load {req.model} (it has {worker.free_memory_mb} MB)"
        )
    if worker.free_memory_mb < req.min_free_memory_mb:
        return f"{req.min_free_memory_mb} MB free memory (it has {worker.free_memory_mb} MB)"
    if req.min_compute_capability is not None and (
        worker.compute_capability is None or worker.compute_capability < req.min_compute_capability
    ):
        want = ".".join(map(str, req.min_compute_capability))
        return f"compute capability >= {want} (it has {worker.compute_capability or 'none'})"
    if req.dtype is not None and req.dtype not in worker.dtypes:
        return f"dtype {req.dtype} (it runs {', '.join(worker.dtypes)})"
    return None


def _rank(
    model: str | None, w: WorkerCapabilities, affinity: Mapping[str, int] | None = None
) -> tuple[bool, int, int, str]:
    load = w.in_flight + (affinity.get(w.name, 0) if affinity else 0)
    return (model not in w.models_loaded, load, -w.free_memory_mb, w.name)


def match(req: TaskRequirements, workers: Iterable[WorkerCapabilities]) -> list[WorkerCapabilities]:
    """Capable workers, best first: model already loaded, then least loaded, then most free memory."""
    capable = [w for w in workers if unmet(req, w) is None]
    capable.sort(key=lambda w: _rank(req.model, w))
    return capable


def best(
    req: TaskRequirements,
    workers: Iterable[WorkerCapabilities],
    exclude: str | None = None,
    affinity: Mapping[str, int] | None = None,
) -> tuple[WorkerCapabilities | None, WorkerCapabilities | None]:
    """In one pass: the best capable worker under its in-flight limit, and the best capable one.

    Same order as :func:`match`, without sorting (the router's hot path).
    ``affinity`` (worker -> sticky keys it already serves) counts as load, so
    new keys spread over the workers instead of piling onto the idlest one.
    """
    top_free: WorkerCapabilities | None = None
    top_any: WorkerCapabilities | None = None
    free_rank: tuple[bool, int, int, str] | None = None
    any_rank: tuple[bool, int, int, str] | None = None
    for w in workers:
        if w.name == exclude or unmet(req, w) is not None:
            continue
        rank = _rank(req.model, w, affinity)
        if any_rank is None or rank < any_rank:
            top_any, any_rank = w, rank
        if w.in_flight < w.max_in_flight and (free_rank is None or rank < free_rank):
            top_free, free_rank = w, rank
    return top_free, top_any
