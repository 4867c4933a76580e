"""Exactly one successful execution per task id.

RabbitMQ and ``acks_late`` give at-least-once delivery: a message can arrive
twice (a worker died after storing its result but before its ack, or a client
republished after a lost publisher confirm).  Celery's
``worker_deduplicate_successful_tasks`` skips a *redelivered* message whose
SUCCESS is already stored; a republished copy is not flagged as redelivered,
so :class:`IdempotentTask` checks every message: if the result backend holds
SUCCESS for the task id, the body does not run, nothing is stored again (a
chord header is not counted twice) and the message is acked.  The check is
one backend read per task; ``INFER_DEDUPLICATE=false`` turns both off.

Two copies of one task that run *at the same time* on two workers both run:
deduplication is by stored outcome, not by a lock, which would block the
redelivery of a task whose worker died holding it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.states import SUCCESS

__all__ = ["IdempotentTask"]

log = logging.getLogger(__name__)


class IdempotentTask(Task):
    """A task whose body runs at most once successfully per task id."""

    # A dead-lettered poison task fails visibly; one past its deadline fails DeadlineExceeded.
    Request = "tasks.worker.expired:DeadlineRequest"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if (
            request.id
            and not request.is_eager
            and self.app.infer_settings.deduplicate
            and self.already_succeeded(request.id)
        ):
            log.warning(
                "task %s[%s] already succeeded: duplicate delivery acked, not run again",
                self.name,
                request.id,
            )
            raise Ignore()
        return super().__call__(*args, **kwargs)

    def already_succeeded(self, task_id: str) -> bool:
        """Whether the result backend holds SUCCESS for ``task_id`` (False if it cannot tell)."""
        try:
            meta = self.backend.get_task_meta(task_id, cache=False)
        except Exception as e:  # an unreachable backend must not stop the work
            log.warning("deduplication check for %s failed (%s): running it", task_id, e)
            return False
        return bool(meta.get("status") == SUCCESS)
