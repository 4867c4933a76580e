"""What a request needs, what a worker has, and which workers can serve it.

Pure Python (no torch, no celery): workers describe themselves as
:class:`WorkerCapabilities` (JSON-serialisable), callers' requests become
:class:`TaskRequirements`, and :func:`match` ranks the workers that satisfy
them.  :func:`unmet` says in words why a worker cannot serve a request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral
from typing import Any

from models.errors import (
    DTYPE_NAMES,
    BadRequirements,
    ConfigurationError,
    echo,
    unknown_dtype,
)

__all__ = [
    "CALLER_KEYS",
    "CLIENT_KEYS",
    "DEVICE_KINDS",
    "DTYPES",
    "MAX_CAPABILITY_PART",
    "MAX_MEMORY_MB",
    "TaskRequirements",
    "WorkerCapabilities",
    "best",
    "loaded_ref",
    "match",
    "serves",
    "unmet",
]

DEVICE_KINDS = ("any", "cpu", "cuda")
DTYPES = DTYPE_NAMES  # fp32, fp16, bf16: one list, shared with the worker's checks
MAX_MEMORY_MB = 2**40 - 1  # a megabyte figure above this (1 EiB) is a mistake, not a device
MAX_CAPABILITY_PART = 999  # compute capability major and minor: whole numbers 0..999
CALLER_KEYS = ("device", "min_free_memory_mb", "min_compute_capability", "dtype")
CLIENT_KEYS = ("model", "version", "model_memory_mb")  # derived from the call and its spec

_VALID = (
    "device ('any', 'cpu' or 'cuda'), "
    f"min_free_memory_mb (a whole number of MB, 0 to {MAX_MEMORY_MB}), "
    "min_compute_capability ('8.0', '8' or [8, 0]), "
    "dtype ('fp32', 'fp16', 'bf16' or 'auto')"
)
_CAPABILITY = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,3}))?", re.ASCII)


@dataclass(frozen=True)
class TaskRequirements:
    """What one request needs.  ``None``/``any``/``0`` mean "no constraint".

    ``model_memory_mb`` comes from the model registry and applies only to a
    worker that would have to load the model; ``min_free_memory_mb`` is
    headroom the caller asks for, on any worker.  ``dtype="auto"`` is stored
    as None.  The constructor is for code (the client, benchmarks): a bad
    device or memory figure there is a :class:`ConfigurationError`, a bad
    precision name :func:`~models.errors.unknown_dtype`.  What callers send
    (``headers={"requires": ...}``) goes through :meth:`merged` /
    :meth:`from_mapping`, which raise :class:`~models.errors.BadRequirements`.
    """

    device: str = "any"
    min_free_memory_mb: int = 0
    model_memory_mb: int = 0
    min_compute_capability: tuple[int, int] | None = None
    dtype: str | None = None
    model: str | None = None
    version: int | None = None  # pinned by the call (``name@version``); None: the default

    def __post_init__(self) -> None:
        if self.device not in DEVICE_KINDS:
            raise ConfigurationError(
                f"device {self.device!r}: use one of {', '.join(DEVICE_KINDS)}"
            )
        if isinstance(self.dtype, str) and self.dtype == "auto":
            object.__setattr__(self, "dtype", None)  # frozen: normalise once, here
        if self.dtype is not None and not (isinstance(self.dtype, str) and self.dtype in DTYPES):
            raise unknown_dtype(self.dtype)
        if self.min_free_memory_mb < 0 or self.model_memory_mb < 0:
            raise ConfigurationError("memory requirements must be >= 0")

    @classmethod
    def from_mapping(cls, data: object) -> TaskRequirements:
        """Requirements from a caller's ``requires`` value alone (see :meth:`merged`)."""
        return cls().merged(data)

    def merged(self, overrides: object) -> TaskRequirements:
        """These requirements with a caller's ``requires`` header applied on top (per-call wins).

        ``overrides`` must be a mapping of these keys (anything else raises
        :class:`~models.errors.BadRequirements` naming the key, the value and
        what to write instead):

        - ``device``: ``"any"``, ``"cpu"`` or ``"cuda"``;
        - ``min_free_memory_mb``: a whole number of MB from 0 to ``MAX_MEMORY_MB``
          (``8000`` or ``8000.0``; not a bool, a fraction or a string);
        - ``min_compute_capability``: ``"8.0"``, ``"8"``, ``[8, 0]`` or ``(8, 0)``,
          each part a whole number from 0 to 999; None adds no constraint;
        - ``dtype``: ``fp32``, ``fp16`` or ``bf16``; None or ``"auto"`` adds no
          constraint (the call's own ``dtype`` still applies); any other name
          raises :func:`~models.errors.unknown_dtype`, as the worker would.

        ``overrides=None`` means no requirements.  ``model`` and
        ``model_memory_mb`` are refused: the client sets them from the call's
        model argument and the model registry, and a caller who could set them
        would route one model's requests as another's, or skip the memory check
        (ask for headroom with ``min_free_memory_mb`` instead).
        """
        if overrides is None:
            return self
        parsed = _parse_requires(overrides)
        return replace(self, **parsed) if parsed else self

    @property
    def key(self) -> tuple[object, ...]:
        """Sticky key: the model, its version and every requirement (hashable; the cache is per process)."""
        return (
            self.model,
            self.version,
            self.device,
            self.dtype,
            self.min_free_memory_mb,
            self.model_memory_mb,
            self.min_compute_capability,
        )


def _parse_requires(requires: object) -> dict[str, Any]:
    """The fields a ``requires`` header sets, checked; BadRequirements for anything else."""
    if not isinstance(requires, Mapping):
        raise BadRequirements(
            f"the requires header is {echo(requires)} ({type(requires).__name__}), not a mapping: "
            f"write headers={{'requires': {{'device': 'cuda', 'min_free_memory_mb': 8000}}}}; "
            f"valid keys: {_VALID}"
        )
    client = [k for k in CLIENT_KEYS if k in requires]
    if client:
        raise BadRequirements(
            f"requires[{client[0]!r}] cannot be set by a caller: the client sets model, version "
            "and model_memory_mb from the call's model argument (pin a version with "
            "'name@version') and the model's spec. Drop it, "
            f"and ask for headroom with min_free_memory_mb; valid keys: {_VALID}"
        )
    unknown = sorted((k for k in requires if k not in CALLER_KEYS), key=repr)
    if unknown:
        shown = ", ".join(echo(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BadRequirements(
            f"unknown requirement {shown}{more} in the requires header: valid keys: {_VALID}"
        )
    parsed: dict[str, Any] = {}
    if "device" in requires:
        parsed["device"] = _device(requires["device"])
    if "min_free_memory_mb" in requires:
        parsed["min_free_memory_mb"] = _memory(requires["min_free_memory_mb"])
    cc = requires.get("min_compute_capability")
    if cc is not None:
        parsed["min_compute_capability"] = _capability(cc)
    dtype = requires.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype == "auto"):
        if not (isinstance(dtype, str) and dtype in DTYPES):
            raise unknown_dtype(dtype)
        parsed["dtype"] = dtype
    return parsed


def _bad(key: str, value: object, hint: str) -> BadRequirements:
    return BadRequirements(f"requires[{key!r}] = {echo(value)} is not valid: {hint}")


def _whole(value: object, limit: int) -> int | None:
    """``value`` as an int in ``0..limit`` (an integral float counts), else None."""
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            return None
    elif isinstance(value, bool) or not isinstance(value, Integral):
        return None
    number = int(value)
    return number if 0 <= number <= limit else None


def _device(value: object) -> str:
    if isinstance(value, str) and value in DEVICE_KINDS:
        return value
    raise _bad("device", value, "write 'any' (no constraint), 'cpu' or 'cuda'")


def _memory(value: object) -> int:
    number = _whole(value, MAX_MEMORY_MB)
    if number is None:
        raise _bad(
            "min_free_memory_mb",
            value,
            f"write a whole number of megabytes from 0 (no constraint) to {MAX_MEMORY_MB}, "
            "e.g. 8000",
        )
    return number


def _capability(value: object) -> tuple[int, int]:
    parts: tuple[int | None, int | None] = (None, None)
    if isinstance(value, str):
        found = _CAPABILITY.fullmatch(value)
        if found:
            parts = (int(found[1]), int(found[2] or 0))
    elif isinstance(value, list | tuple) and len(value) == 2:
        parts = (_whole(value[0], MAX_CAPABILITY_PART), _whole(value[1], MAX_CAPABILITY_PART))
    major, minor = parts
    if major is None or minor is None:
        raise _bad(
            "min_compute_capability",
            value,
            "write major.minor as a string ('8.0' or '8') or a pair ([8, 0] or (8, 0)), "
            f"each a whole number from 0 to {MAX_CAPABILITY_PART}; None for no constraint",
        )
    return major, minor


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
    models_loaded: tuple[str, ...] = ()  # name@version of each model in its cache
    # What it can serve: name -> {"default": version, "versions": {"1": spec as JSON, ...}}.
    # Empty in a record from a release before model repositories: taken to serve every model.
    models: Mapping[str, Any] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 4
    heartbeat: float = 0.0  # wall-clock seconds of the last beat
    device_class_queue: str = field(default="")  # shared fallback queue (cpu / gpu)
    # Admission control (routing.admission): requests per second this worker completes while
    # it has work (0.0: not measured yet), and the requests ahead of a new one here: waiting or
    # running in the worker, ready in its direct queue, and its share of its class queue.
    service_rate: float = 0.0
    backlog: int = 0
    batch_s: float = 0.0  # running average of one batch's service time (0.0: not measured)
    # False while it cannot consume (no broker answers, or its consumer is reconnecting).
    accepting: bool = True
    # queue -> [queue wait in s of the latest message taken from it, wall time it was taken].
    queue_heads: Mapping[str, Any] = field(default_factory=dict)

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
        data["models"] = dict(data.get("models") or {})
        data["queue_heads"] = dict(data.get("queue_heads") or {})
        return cls(**data)


def serves(req: TaskRequirements, worker: WorkerCapabilities) -> str | None:
    """Why ``worker`` does not serve ``req``'s model and version, or None when it does."""
    if req.model is None or not worker.models:
        return None
    served = worker.models.get(req.model)
    if not isinstance(served, Mapping):
        shown = ", ".join(sorted(worker.models)[:8])
        return f"model {req.model} (it serves {shown})"
    versions = served.get("versions") or {}
    if req.version is not None and str(req.version) not in versions:
        return f"{req.model}@{req.version} (it has versions {', '.join(sorted(versions))})"
    return None


def loaded_ref(req: TaskRequirements, worker: WorkerCapabilities) -> str | None:
    """``name@version`` that ``req`` would run on ``worker`` (the pinned or its default version)."""
    if req.model is None:
        return None
    version = req.version
    if version is None:
        served = worker.models.get(req.model) if worker.models else None
        version = served.get("default") if isinstance(served, Mapping) else 1
    return f"{req.model}@{version}"


def _holds(req: TaskRequirements, worker: WorkerCapabilities) -> bool:
    if req.model is None:
        return False
    if not worker.models:  # an older release's record: plain model names
        return req.model in worker.models_loaded
    return loaded_ref(req, worker) in worker.models_loaded


def unmet(req: TaskRequirements, worker: WorkerCapabilities) -> str | None:
    """Why ``worker`` cannot serve ``req``, or None when it can."""
    if req.device != "any" and worker.device_kind != req.device:
        return f"device {req.device} (it is {worker.device_kind})"
    missing = serves(req, worker)
    if missing is not None:
        return missing
    loaded = _holds(req, worker)
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
    req: TaskRequirements, w: WorkerCapabilities, affinity: Mapping[str, int] | None = None
) -> tuple[bool, bool, int, int, str]:
    # A worker that cannot consume now (accepting false) comes last, even behind busy ones.
    load = w.in_flight + (affinity.get(w.name, 0) if affinity else 0)
    return (not w.accepting, not _holds(req, w), load, -w.free_memory_mb, w.name)


def match(req: TaskRequirements, workers: Iterable[WorkerCapabilities]) -> list[WorkerCapabilities]:
    """Capable workers, best first: accepting, model already loaded, least loaded, most free memory."""
    capable = [w for w in workers if unmet(req, w) is None]
    capable.sort(key=lambda w: _rank(req, w))
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
    free_rank: tuple[bool, bool, int, int, str] | None = None
    any_rank: tuple[bool, bool, int, int, str] | None = None
    for w in workers:
        if w.name == exclude or unmet(req, w) is not None:
            continue
        rank = _rank(req, w, affinity)
        if any_rank is None or rank < any_rank:
            top_any, any_rank = w, rank
        if w.in_flight < w.max_in_flight and (free_rank is None or rank < free_rank):
            top_free, free_rank = w, rank
    return top_free, top_any
