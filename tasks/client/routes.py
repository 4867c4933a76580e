"""Glue between Celery's ``task_routes`` and the capability router.

Every :class:`tasks.app.InferenceApp` puts one :class:`AppRoute` in its
``task_routes`` (when ``INFER_ROUTING`` is on).  Its router is built lazily in
each client process, on the first routed call, from that app's own settings:
a registry snapshot refreshed in the background, a sticky cache, and
requirements derived from the model registry.

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
from collections.abc import Callable
from typing import Any

from models.registry import get_spec
from routing.capabilities import TaskRequirements
from routing.registry import LiveRegistry
from routing.router import CapabilityRouter
from routing.sticky import StickyCache
from tasks.settings import Settings
from tasks.wire.backend import registry_store
from tasks.wire.request import infer_call

__all__ = ["ROUTED_TASKS", "AppRoute", "build_router", "requirements_for", "wait_for_workers"]

ROUTED_TASKS = frozenset({"tasks.infer", "tasks.diag.noop", "tasks.gather"})


def requirements_for(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TaskRequirements | None:
    """Requirements of an inference call from the registry and its own arguments; None if not routed."""
    if name not in ROUTED_TASKS:
        return None
    if name != "tasks.infer":
        return TaskRequirements()  # any live worker
    call = infer_call(args, kwargs)
    spec = get_spec(call.model)  # UnknownModel: refused before publishing, send_task included
    return TaskRequirements(
        model=spec.name,
        model_memory_mb=spec.memory_mb,
        dtype=None if call.dtype in (None, "auto") else call.dtype,
    )


def build_router(settings: Settings) -> CapabilityRouter:
    """A router over the registry ``settings`` name (backend, namespace, heartbeat)."""
    sticky = StickyCache(ttl_s=settings.sticky_ttl_s, max_size=settings.sticky_size)
    registry = LiveRegistry(
        registry_store(settings),
        ttl_s=2 * settings.heartbeat_s,
        refresh_s=min(0.5, settings.heartbeat_s / 2),
        on_lost=sticky.drop_worker,
        on_evicted=lambda worker, model: sticky.invalidate(worker=worker, model=model),
    )
    router = CapabilityRouter(registry.workers, requirements_for, sticky)
    router.registry = registry
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
