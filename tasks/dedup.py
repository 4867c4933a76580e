"""Exactly one successful execution per task id, and an optional execution ledger.

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

**Ledger.** A task sent with ``headers={"infer_ledger": "<redis hash>"}``
increments ``HINCRBY <hash> <task id> 1`` each time its body really starts,
on the result backend's Redis.  The fault suite counts executions with it;
an operator can use it to audit a batch job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.states import SUCCESS

__all__ = ["LEDGER_HEADER", "IdempotentTask"]

LEDGER_HEADER = "infer_ledger"

log = logging.getLogger(__name__)


class IdempotentTask(Task):
    """A task whose body runs at most once successfully per task id."""

    Request = "tasks.poison:PoisonAwareRequest"  # a dead-lettered poison task fails visibly

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.id and not request.is_eager:
            if self.app.infer_settings.deduplicate and self._succeeded(request.id):
                log.warning(
                    "task %s[%s] already succeeded: duplicate delivery acked, not run again",
                    self.name,
                    request.id,
                )
                raise Ignore()
            ledger = getattr(request, LEDGER_HEADER, None)
            if isinstance(ledger, str) and ledger:
                self._count(ledger, request.id)
        return super().__call__(*args, **kwargs)

    def _succeeded(self, task_id: str) -> bool:
        try:
            meta = self.backend.get_task_meta(task_id, cache=False)
        except Exception as e:  # an unreachable backend must not stop the work
            log.warning("deduplication check for %s failed (%s): running it", task_id, e)
            return False
        return bool(meta.get("status") == SUCCESS)

    def _count(self, ledger: str, task_id: str) -> None:
        client = getattr(self.backend, "client", None)
        if client is None:
            log.warning("execution ledger %s needs a Redis result backend; not counted", ledger)
            return
        for attempt in range(50):  # ride out a Redis restart (the fault suite does one)
            try:
                client.hincrby(ledger, task_id, 1)
                return
            except Exception as e:
                if attempt == 49:
                    raise
                log.warning("ledger %s: %s; retrying", ledger, e)
                time.sleep(0.2)
