"""Glue between Celery's ``task_routes`` and the capability router.

``task_routes = ["tasks.routes.route"]`` (set by the settings when
``INFER_ROUTING`` is on).  The router is built lazily in each client process,
on the first routed call: a registry snapshot refreshed in the background, a
sticky cache, and requirements derived from the model registry.

How to state requirements, from lowest to highest precedence:

1. the model registry: a worker must have the model's ``memory_mb`` free unless it holds it;
2. the call itself: ``infer(model, inputs, dtype="bf16")`` requires bf16;
3. a per-call header: ``infer.apply_async(args, headers={"requires": {"device":
   "cuda", "min_free_memory_mb": 8000, "min_compute_capability": "8.0"}})``.

An explicit ``queue=`` bypasses the router entirely.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from models.registry import get_spec
from routing.capabilities import TaskRequirements
from routing.registry import LiveRegistry, store_for
from routing.router import CapabilityRouter
from routing.sticky import StickyCache
from tasks.app import app
from tasks.settings import Settings

__all__ = [
    "AppRoute",
    "build_router",
    "get_router",
    "requirements_for",
    "route",
    "wait_for_workers",
]

ROUTED_TASKS = frozenset({"tasks.infer", "tasks.diag.noop", "tasks.gather"})

_router: CapabilityRouter | None = None
_lock = threading.Lock()


def requirements_for(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TaskRequirements | None:
    """Requirements of an inference call from the registry and its own arguments; None if not routed."""
    if name not in ROUTED_TASKS:
        return None
    if name != "tasks.infer":
        return TaskRequirements()  # any live worker
    model = args[0] if args else kwargs.get("model")
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    spec = get_spec(model)  # UnknownModel: refused before publishing, send_task included
    return TaskRequirements(
        model=spec.name,
        model_memory_mb=spec.memory_mb,
        dtype=None if dtype in (None, "auto") else dtype,
    )


def build_router(settings: Settings) -> CapabilityRouter:
    """A router over the registry ``settings`` name (backend, namespace, heartbeat)."""
    sticky = StickyCache(ttl_s=settings.sticky_ttl_s, max_size=settings.sticky_size)
    registry = LiveRegistry(
        store_for(settings.backend, settings.home, settings.registry_namespace),
        ttl_s=2 * settings.heartbeat_s,
        refresh_s=min(0.5, settings.heartbeat_s / 2),
        on_lost=sticky.drop_worker,
        on_evicted=lambda worker, model: sticky.invalidate(worker=worker, model=model),
    )
    router = CapabilityRouter(registry.workers, requirements_for, sticky)
    router.registry = registry
    return router


def get_router(app_: Any = None) -> CapabilityRouter:
    """The router of ``app_`` (default: ``tasks.app``) in this process, built on first use.

    A second :class:`tasks.app.InferenceApp` with its own settings (another
    result backend or registry namespace) gets a router of its own.
    """
    global _router
    with _lock:
        if app_ is None or app_ is app:
            if _router is None:
                _router = build_router(app.infer_settings)
            return _router
        router: CapabilityRouter | None = getattr(app_, "_infer_router", None)
        if router is None:
            router = build_router(app_.infer_settings)
            app_._infer_router = router
        return router


def wait_for_workers(hostnames: set[str], timeout: float = 60.0, app_: Any = None) -> None:
    """Block until the router's registry sees every one of ``hostnames`` (their heartbeats)."""
    registry = get_router(app_).registry
    deadline = time.monotonic() + timeout
    while not hostnames <= set(registry.workers()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {hostnames - set(registry.workers())} never advertised")
        registry.refresh()
        time.sleep(0.1)


def route(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
) -> dict[str, Any] | None:
    """The ``task_routes`` entry point (see :class:`routing.router.CapabilityRouter`)."""
    if name not in ROUTED_TASKS:
        return None
    return get_router()(name, args, kwargs, options, task, **kw)


class AppRoute:
    """The ``task_routes`` entry of one app: routes with that app's own router."""

    def __init__(self, app_: Any) -> None:
        self.app = app_

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, Any] | None:
        if name not in ROUTED_TASKS:
            return None
        return get_router(self.app)(name, args, kwargs, options, task, **kw)
