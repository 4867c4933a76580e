"""Requests past their deadline fail with ``DeadlineExceeded`` instead of Celery's bare REVOKED.

Celery's consumer drops a message whose ``expires`` has passed: it stores the
state REVOKED, and the caller's ``get()`` raises ``TaskRevokedError``, which
says nothing of why.  :class:`DeadlineRequest` (every task's ``Request``
class) checks the request's deadline (``expires`` and the ``deadline``
header, :mod:`tasks.wire.deadline`) first: past it, the request is never
computed, a :class:`~models.errors.DeadlineExceeded` failure is stored for
its id, a ``task-failed`` event is sent, the message is acked, and the drop
is counted for ``infer_requests_total{outcome="DeadlineExceeded"}``.

Where it runs: Celery's strategy asks ``Request.revoked()`` on arrival for
any request with an ``expires``; the batching strategy asks again when the
batch leaves for the pool (and on arrival for a ``deadline`` header alone).
A request revoked by id (``AsyncResult.revoke()``) stays Celery's REVOKED.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.state import revoked as revoked_tasks
from celery.worker.state import task_ready

from models.errors import DeadlineExceeded
from tasks.wire.deadline import check, of_request
from tasks.wire.request import infer_call
from tasks.worker import load
from tasks.worker.poison import PoisonAwareRequest

__all__ = ["DeadlineRequest", "model_of"]

log = logging.getLogger(__name__)


def model_of(args: Any, kwargs: Any) -> str:
    """The model name of an ``infer`` call (a version pin dropped), or ``unknown``."""
    try:
        model = infer_call(args, kwargs).model
    except Exception:
        return load.OTHER_MODEL
    return model.partition("@")[0] if isinstance(model, str) else load.OTHER_MODEL


class DeadlineRequest(PoisonAwareRequest):
    _dropped_late = False
    _deadline: float | bool | None = False  # False: not read yet

    @property
    def deadline(self) -> float | None:
        """This request's absolute deadline (epoch seconds), read once; None if it has none."""
        if self._deadline is False:
            self._deadline = of_request(self.request_dict, time.time())
        return self._deadline

    def past_deadline(self, now: float) -> DeadlineExceeded | None:
        """The error to store if this request's deadline is past at ``now``, else None."""
        if self.id in revoked_tasks:  # revoked by id (or already expired by Celery): REVOKED
            return None
        try:
            check(self.deadline, now, "the worker could start it")
        except DeadlineExceeded as e:
            return e
        return None

    def maybe_expire(self) -> bool:
        # Celery's own expiry check would store REVOKED for a deadline passing between our
        # check and its: ours (revoked(), and the pool child's before the forward pass) decides.
        return False

    def revoked(self) -> bool:
        if self._dropped_late:
            return True
        late = self.past_deadline(time.time())
        if late is None:
            return bool(super().revoked())
        self.drop_late(late)
        return True

    def drop_late(self, error: DeadlineExceeded) -> None:
        """Store ``error`` as this request's outcome, tell events and metrics, ack: never computed."""
        self._dropped_late = True
        task_ready(self)
        if self.store_errors:
            try:
                self.task.backend.mark_as_failure(self.id, error, request=self._context)
            except Exception as e:  # not acked: redelivered, and dropped again
                log.error("could not store DeadlineExceeded for %s (%s): requeued", self.id, e)
                self.reject(requeue=True)
                return
        self.send_event("task-failed", exception=repr(error), traceback="")
        self.acknowledge()
        shared = load.shared()
        if self.name == "tasks.infer" and shared is not None:
            shared.expired(model_of(self.args, self.kwargs))
        log.info("%s[%s] dropped: %s", self.name, self.id, error)
