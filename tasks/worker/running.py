"""How many tasks this process is running right now (Celery's prerun/postrun signals).

Read by the heartbeat (the worker's advertised load), the metrics
(``infer_tasks_running``) and the dynamic batcher (flush when nothing else is
in flight).  The handlers connect when this module is imported, which the
app's ``include`` list does in every worker.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.signals import task_postrun, task_prerun

__all__ = ["running_tasks"]

_running = 0
_lock = threading.Lock()


def running_tasks() -> int:
    """Tasks running in this process right now."""
    return _running


@task_prerun.connect
def _task_started(**_: Any) -> None:
    global _running
    with _lock:
        _running += 1


@task_postrun.connect
def _task_done(**_: Any) -> None:
    global _running
    with _lock:
        _running = max(0, _running - 1)
