"""Diagnostic tasks for operators, benchmarks and the fault suite.

``tasks.diag.noop`` measures the deployment's own overhead (same app,
settings and queues as ``tasks.infer``, no model).  ``tasks.diag.sleep``
stands in for a long inference when testing redelivery.  ``tasks.diag.crash``
kills the process running it (a poison task), only on a worker started with
``INFER_FAULT_INJECTION=true``; anywhere else it fails with a RequestError.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from models.errors import RequestError
from tasks.app import SENT_AT_HEADER, app

__all__ = ["count", "crash", "noop", "on_error", "sleep"]

log = logging.getLogger(__name__)


@app.task(bind=True, name="tasks.diag.noop")
def noop(self: Any) -> dict[str, Any]:
    """Do nothing; return the worker's node name and how long the message queued."""
    sent_at = getattr(self.request, SENT_AT_HEADER, None)
    wait = (time.time() - sent_at) * 1000.0 if isinstance(sent_at, int | float) else None
    return {"worker": self.request.hostname, "timing": {"queue_wait_ms": wait}}


@app.task(bind=True, name="tasks.diag.sleep")
def sleep(self: Any, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds`` (below the soft time limit); report who ran it and whether redelivered."""
    limit = app.infer_settings.task_soft_time_limit
    if not isinstance(seconds, int | float) or not 0 <= seconds < limit:
        raise RequestError(f"seconds must be a number in [0, {limit}) (INFER_TASK_SOFT_TIME_LIMIT)")
    time.sleep(seconds)
    info = self.request.delivery_info or {}
    return {"worker": self.request.hostname, "redelivered": bool(info.get("redelivered"))}


@app.task(bind=True, name="tasks.diag.crash")
def crash(self: Any) -> None:
    """SIGKILL the process running this task, every time it is delivered (fault tests only)."""
    if not app.infer_settings.fault_injection:
        raise RequestError(
            "tasks.diag.crash kills its worker: it runs only on workers started with "
            "INFER_FAULT_INJECTION=true"
        )
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, name="tasks.diag.on_error")
def on_error(self: Any, task_id: str) -> dict[str, Any]:
    """An errback (``link_error``) that records which task failed; returns its id."""
    log.error("errback: task %s failed", task_id)
    return {"failed_task": task_id, "worker": self.request.hostname}


@app.task(bind=True, name="tasks.diag.count")
def count(self: Any, results: list[Any]) -> dict[str, Any]:
    """A chord body that counts its header results."""
    workers = sorted({r["worker"] for r in results if isinstance(r, dict) and "worker" in r})
    return {"count": len(results), "workers": workers, "worker": self.request.hostname}
