"""Custom remote-control commands for the ``celery`` CLI.

- ``celery -A tasks inspect capabilities``: what each worker advertises.
- ``celery -A tasks control load_model resnet50@2 [fp16]`` and
  ``celery -A tasks control unload_model resnet50@1``: warm or drop a model
  version (a bare name: its default version to load, every version to drop).
  A version folder added to the repository since the worker started is found
  by ``load_model`` (it reads the repository again).
- ``celery -A tasks control set_default_version resnet50 2``: what an
  unpinned ``resnet50`` means on these workers from now on (until they
  restart; make it permanent with ``default_version`` in ``model.toml``).

Hot reload is these three in turn: load the new version while the old one
serves, move the default, drop the old one.  Requests pinned to the old
version still run (it loads again on demand); unpinned ones move over.

Control commands run in the worker's main process, but with the prefork pool
the models live in the pool child, which owns the device.  So
``load_model``/``unload_model`` check the model name, then hand the work to
the child as a ``tasks.admin.*`` task on the worker's own direct queue, and
reply at once with that task's id (waiting in the main process would stall
the consumer that has to deliver it).  The next heartbeat advertises the
change to the router; ``inspect capabilities`` shows it.
"""

from __future__ import annotations

import json
from typing import Any

from celery.worker.control import control_command, inspect_command

from models.errors import InferenceError, UnknownVersion
from routing.queues import own_queue
from tasks.app import app
from tasks.wire.backend import registry_store
from tasks.wire.catalog import local_catalog, rescan
from tasks.wire.request import check_dtype

__all__ = [
    "capabilities",
    "load",
    "load_model",
    "set_default",
    "set_default_version",
    "unload",
    "unload_model",
]


@inspect_command()
def capabilities(state: Any) -> dict[str, Any]:
    """This worker's advertised capabilities (device, memory, dtypes, models, load)."""
    settings = app.infer_settings
    hostname = state.consumer.hostname
    for record in registry_store(settings).load():
        if record.name == hostname:
            return json.loads(record.to_json())
    return {
        "error": f"no capability record for {hostname} yet (heartbeat every {settings.heartbeat_s}s)"
    }


def _hand_to_child(state: Any, task: str, *args: Any) -> dict[str, Any]:
    queue = own_queue(list(state.consumer.app.amqp.queues.consume_from or {}))
    if queue is None:
        return {"error": "this worker consumes no direct queue, so it cannot be told to load"}
    try:
        _known(args[0])
        if task == "tasks.admin.default":
            local_catalog(app.infer_settings).set_default(*_pinned(args[0], args[1]))
        elif len(args) > 1:
            check_dtype(args[1])
    except InferenceError as e:
        return {"error": str(e)}
    result = app.send_task(task, args=(state.consumer.hostname, *args), queue=queue)
    return {"ok": f"{task} {' '.join(str(a) for a in args if a)} queued", "task_id": result.id}


@control_command(args=[("model", str), ("dtype", str)], signature="<model> [fp32|fp16|bf16]")
def load_model(state: Any, model: str, dtype: str | None = None) -> dict[str, Any]:
    """Load ``model`` into this worker's cache (in its default precision unless given)."""
    return _hand_to_child(state, "tasks.admin.load", model, dtype)


@control_command(args=[("model", str)], signature="<model>[@version]")
def unload_model(state: Any, model: str) -> dict[str, Any]:
    """Drop every precision of ``model`` (one version, or all without ``@version``)."""
    return _hand_to_child(state, "tasks.admin.unload", model)


@control_command(args=[("model", str), ("version", int)], signature="<model> <version>")
def set_default_version(state: Any, model: str, version: int) -> dict[str, Any]:
    """Make ``version`` what an unpinned ``model`` means on this worker (and advertise it)."""
    return _hand_to_child(state, "tasks.admin.default", model, version)


def _known(model: str) -> Any:
    """The spec ``model`` names here, reading the repository again if it is not known yet."""
    try:
        return local_catalog(app.infer_settings).resolve(model)
    except InferenceError:
        return rescan(app.infer_settings).resolve(model)


def _pinned(model: str, version: Any) -> tuple[str, int]:
    name, _, _ = model.partition("@")
    try:
        return name, int(version)
    except (TypeError, ValueError):
        raise UnknownVersion(f"version {version!r} is not a whole number: e.g. 2") from None


def _check_target(self: Any, target: str) -> dict[str, Any] | None:
    # A direct queue falls back to its class queue after its TTL: never act on another worker.
    if self.request.hostname != target:
        return {"skipped": f"meant for {target}, reached {self.request.hostname}; send it again"}
    return None


@app.task(bind=True, name="tasks.admin.load")
def load(self: Any, target: str, model: str, dtype: str | None = None) -> dict[str, Any]:
    """Runs in the process that owns the device: load ``model`` and report the cache."""
    from models.runner import resolve_dtype
    from tasks.worker.runtime import get_runtime

    skipped = _check_target(self, target)
    if skipped:
        return skipped
    runtime = get_runtime()
    spec = _known(model)
    precision = resolve_dtype(dtype, spec, runtime.device)
    runtime.model(spec, precision)
    runtime.advertise()
    cached = runtime.cache.keys()  # a snapshot list
    return {"loaded": [spec.ref, precision], "cached": [list(k) for k in cached]}


@app.task(bind=True, name="tasks.admin.unload")
def unload(self: Any, target: str, model: str) -> dict[str, Any]:
    """Runs in the process that owns the device: evict every precision of ``model``."""
    from tasks.worker.runtime import get_runtime

    skipped = _check_target(self, target)
    if skipped:
        return skipped
    runtime = get_runtime()
    before = runtime.cache.keys()  # a snapshot list
    _known(model)
    pinned = "@" in model
    dropped = [k for k in before if (k[0] == model if pinned else k[0].partition("@")[0] == model)]
    for key in dropped:
        runtime.cache.evict(key)
    runtime.advertise()
    after = runtime.cache.keys()
    return {"unloaded": [list(k) for k in dropped], "cached": [list(k) for k in after]}


@app.task(bind=True, name="tasks.admin.default")
def set_default(self: Any, target: str, model: str, version: int) -> dict[str, Any]:
    """Runs in the process that owns the device: move ``model``'s default version, advertise it."""
    from tasks.worker.runtime import get_runtime

    skipped = _check_target(self, target)
    if skipped:
        return skipped
    _known(f"{model}@{version}")
    spec = local_catalog(app.infer_settings).set_default(*_pinned(model, version))
    get_runtime().advertise()
    return {"default": spec.ref}
