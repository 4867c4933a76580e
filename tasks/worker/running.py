"""How many tasks this process is running right now (Celery's prerun/postrun signals).

Read by the heartbeat (the worker's advertised load), the metrics
(``infer_tasks_running``) and the dynamic batcher (flush when nothing else is
in flight).  The same signals feed this process's service meter
(:func:`meter`), which the heartbeat advertises when the consumer does not
measure (a worker that does not batch).  The handlers connect when this
module is imported, which the app's ``include`` list does in every worker.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.signals import task_postrun, task_prerun

from tasks.worker import load
from tasks.worker.load import ServiceMeter

__all__ = ["meter", "running_tasks"]

_running = 0
_lock = threading.Lock()
_meter: ServiceMeter | None = None


def meter() -> ServiceMeter:
    """This process's service meter (made on first use, with the app's window)."""
    global _meter
    if _meter is None:
        from tasks.app import app

        _meter = ServiceMeter(app.infer_settings.service_rate_window_s)
    return _meter


def running_tasks() -> int:
    """Tasks running in this process right now."""
    return _running


@task_prerun.connect
def _task_started(task: Any = None, **_: Any) -> None:
    global _running
    with _lock:
        _running += 1
    shared = load.shared()
    if shared is not None and shared.outstanding is not None:
        return  # the batching consumer measures load and queue heads
    meter().arrived()
    if shared is not None and task is not None:
        # No batching consumer records queue heads: the queue wait of the message it runs.
        request = task.request
        routing_key = (getattr(request, "delivery_info", None) or {}).get("routing_key")
        load.observe_head(routing_key, getattr(request, "infer_sent_at", None), time.time())


@task_postrun.connect
def _task_done(state: str | None = None, **_: Any) -> None:
    global _running
    with _lock:
        _running = max(0, _running - 1)
    shared = load.shared()
    if shared is None or shared.outstanding is None:  # else the batching consumer measures
        meter().left(1, completed=int(state == "SUCCESS"))
