"""Custom remote-control commands for the ``celery`` CLI.

- ``celery -A tasks inspect capabilities``: what each worker advertises.
- ``celery -A tasks control load_model cnn [fp16]`` and
  ``celery -A tasks control unload_model cnn``: warm or drop a model.

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

from models.errors import InferenceError
from models.registry import get_spec
from routing.queues import own_queue
from tasks.app import app
from tasks.wire.backend import registry_store
from tasks.wire.request import check_dtype

__all__ = ["capabilities", "load", "load_model", "unload", "unload_model"]


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
        get_spec(args[0])
        if len(args) > 1:
            check_dtype(args[1])
    except InferenceError as e:
        return {"error": str(e)}
    result = app.send_task(task, args=(state.consumer.hostname, *args), queue=queue)
    return {"ok": f"{task} {' '.join(str(a) for a in args if a)} queued", "task_id": result.id}


@control_command(args=[("model", str), ("dtype", str)], signature="<model> [fp32|fp16|bf16]")
def load_model(state: Any, model: str, dtype: str | None = None) -> dict[str, Any]:
    """Load ``model`` into this worker's cache (in its default precision unless given)."""
    return _hand_to_child(state, "tasks.admin.load", model, dtype)


@control_command(args=[("model", str)], signature="<model>")
def unload_model(state: Any, model: str) -> dict[str, Any]:
    """Drop every precision of ``model`` from this worker's cache."""
    return _hand_to_child(state, "tasks.admin.unload", model)


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
    spec = get_spec(model)
    precision = resolve_dtype(dtype, spec, runtime.device)
    runtime.model(spec, precision)
    runtime.advertise()
    cached = runtime.cache.keys()  # a snapshot list
    return {"loaded": [model, precision], "cached": [list(k) for k in cached]}


@app.task(bind=True, name="tasks.admin.unload")
def unload(self: Any, target: str, model: str) -> dict[str, Any]:
    """Runs in the process that owns the device: evict every precision of ``model``."""
    from tasks.worker.runtime import get_runtime

    skipped = _check_target(self, target)
    if skipped:
        return skipped
    runtime = get_runtime()
    before = runtime.cache.keys()  # a snapshot list
    dropped = [key for key in before if key[0] == get_spec(model).name]
    for key in dropped:
        runtime.cache.evict(key)
    runtime.advertise()
    after = runtime.cache.keys()
    return {"unloaded": [list(k) for k in dropped], "cached": [list(k) for k in after]}
