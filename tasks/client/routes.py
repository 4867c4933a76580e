"""Glue between Celery's ``task_routes`` and the capability router.

Every :class:`tasks.app.InferenceApp` puts one :class:`AppRoute` in its
``task_routes`` (when ``INFER_ROUTING`` is on).  Its router is built lazily in
each client process, on the first routed call, from that app's own settings:
a registry snapshot refreshed in the background, a sticky cache, and
requirements derived from the model's spec (local or advertised, :mod:`tasks.client.specs`).

How to state requirements, from lowest to highest precedence:

1. the model's spec: a worker must serve the model (and the pinned version,
   ``name@version``), and have its ``memory_mb`` free unless it holds it;
2. the call itself: ``infer(model, inputs, dtype="bf16")`` requires bf16;
3. a per-call header: ``infer.apply_async(args, headers={"requires": {"device":
   "cuda", "min_free_memory_mb": 8000, "min_compute_capability": "8.0"}})``.

An explicit ``queue=`` bypasses the router entirely.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from models.spec import ModelSpec, parse_ref
from models.text import check_text
from routing.admission import Admission
from routing.capabilities import TaskRequirements
from routing.registry import LiveRegistry
from routing.router import CapabilityRouter
from routing.sticky import StickyCache
from tasks.client.specs import SpecLookup
from tasks.settings import Settings
from tasks.wire.backend import registry_store
from tasks.wire.blobs import is_reference as blobs_reference
from tasks.wire.codec import NO_LIMIT, refuse_oversized
from tasks.wire.request import check_dtype, infer_call

__all__ = [
    "ROUTED_TASKS",
    "AppRoute",
    "build_router",
    "call_requirements",
    "requirements_for",
    "wait_for_workers",
]

ROUTED_TASKS = frozenset({"tasks.infer", "tasks.diag.noop", "tasks.gather"})


SpecOf = Callable[[object], ModelSpec]


def _local_specs() -> SpecOf:
    return SpecLookup(Settings.from_env())


def requirements_for(
    name: str,
    args: Any,
    kwargs: Any,
    max_payload_bytes: int = NO_LIMIT,
    specs: SpecOf | None = None,
) -> TaskRequirements | None:
    """Requirements of a call from the model's spec and its own arguments; None if not routed.

    Runs at submit for ``send_task`` too, so a call that can never run is refused
    here with the class the worker would raise: wrong arguments
    (:class:`~models.errors.BadArguments`), an unknown model, version or
    precision, or inputs whose size estimate is over ``max_payload_bytes``
    (nothing converted).  ``specs`` looks a model up (default: this
    environment's local sources only).
    """
    if name not in ROUTED_TASKS:
        return None
    if name != "tasks.infer":
        return TaskRequirements()  # any live worker
    call = infer_call(args, kwargs)
    spec = (specs or _local_specs())(call.model)  # UnknownModel: refused before publishing
    requirements = _requirements(spec, call.model, call.dtype)
    if spec.text is not None and not blobs_reference(call.inputs):
        check_text(spec, call.inputs, max_payload_bytes)  # strings: cheap to check
    else:
        refuse_oversized(call.inputs, max_payload_bytes)
    return requirements


def call_requirements(
    model: object, dtype: object = None, specs: SpecOf | None = None
) -> TaskRequirements:
    """What serving ``model`` (``name`` or ``name@version``) in precision ``dtype`` needs.

    ``celery -A tasks route`` asks too.  The version is pinned only when the
    call pins it: an unpinned request goes to any worker serving the model,
    which answers with its default version.
    """
    return _requirements((specs or _local_specs())(model), model, dtype)


def _requirements(spec: ModelSpec, model: object, dtype: object) -> TaskRequirements:
    """The requirements of a call whose model (``model``, as the caller named it) is ``spec``."""
    check_dtype(dtype)
    _, version = parse_ref(model)
    return TaskRequirements(
        model=spec.name,
        version=version,
        model_memory_mb=spec.memory_mb,
        dtype=None if dtype in (None, "auto") else str(dtype),
    )


def build_router(settings: Settings) -> CapabilityRouter:
    """A router over the registry ``settings`` name (backend, namespace, heartbeat)."""
    sticky = StickyCache(ttl_s=settings.sticky_ttl_s, max_size=settings.sticky_size)
    admission = Admission(
        margin=settings.admission_margin,
        enabled=settings.admission,
        batch_share=settings.batch_deadline_share,
    )

    def lost(worker: str) -> None:
        sticky.drop_worker(worker)
        admission.forget(worker)

    registry = LiveRegistry(
        registry_store(settings),
        ttl_s=2 * settings.heartbeat_s,
        refresh_s=min(0.5, settings.heartbeat_s / 2),
        on_lost=lost,
        # A worker dropped name@version: forget its sticky keys for that model.
        on_evicted=lambda worker, ref: sticky.invalidate(worker=worker, model=ref.split("@")[0]),
    )
    specs = SpecLookup(settings, registry)
    requirements = functools.partial(
        requirements_for, max_payload_bytes=settings.max_payload_bytes, specs=specs
    )
    router = CapabilityRouter(registry.workers, requirements, sticky, admission=admission)
    router.registry = registry
    router.specs = specs
    return router


class AppRoute:
    """The ``task_routes`` entry of one app: routes with a router of its own.

    ``settings`` returns the app's settings; the router is built from them on
    the first routed call (or the first read of :attr:`router`), once per process.
    """

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self._router: CapabilityRouter | None = None
        self._lock = threading.Lock()

    @property
    def router(self) -> CapabilityRouter:
        """The router, built on first use; assign one to route with it instead."""
        with self._lock:
            if self._router is None:
                self._router = build_router(self._settings())
            return self._router

    @router.setter
    def router(self, router: CapabilityRouter) -> None:
        with self._lock:
            self._router = router

    def spec(self, model: object) -> ModelSpec:
        """The spec a call is checked against: local sources, else what live workers advertise.

        Without routing (``INFER_ROUTING=false``) there is no registry to read:
        local sources only.
        """
        settings = self._settings()
        if not settings.routing:
            return SpecLookup(settings)(model)
        return self.router.specs(model)

    @property
    def built(self) -> CapabilityRouter | None:
        """The router if it has been built, else None (never builds one)."""
        return self._router

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, Any] | None:
        if name not in ROUTED_TASKS:
            return None
        return self.router(name, args, kwargs, options, task, **kw)


def wait_for_workers(router: CapabilityRouter, hostnames: set[str], timeout: float = 60.0) -> None:
    """Block until ``router``'s registry sees every one of ``hostnames`` (their heartbeats)."""
    registry = router.registry
    deadline = time.monotonic() + timeout
    while not hostnames <= set(registry.workers()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {hostnames - set(registry.workers())} never advertised")
        registry.refresh()
        time.sleep(0.1)
