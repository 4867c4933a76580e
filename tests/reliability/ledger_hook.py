"""The fault suite's execution counter, loaded into its workers with ``celery worker -I``.

A task sent with ``headers={"infer_ledger": "<redis hash>"}`` increments
``HINCRBY <hash> <task id> 1`` each time its body really starts, on the result
backend's Redis.  A task sent with ``headers={"infer_poison": True}`` then
kills its process (SIGKILL) on every delivery, like ``tasks.diag.crash``, but
it can be any task, an ``infer`` request riding in a batch included (the
batching worker fires ``task_prerun`` per request); only with
``INFER_FAULT_INJECTION=true``.  It connects Celery's ``task_prerun`` signal, so production
workers (which never import this module) pay nothing for it.  A delivery that
deduplication will skip (its SUCCESS is stored) is not counted: its body does
not run.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import task_prerun

__all__ = ["LEDGER_HEADER", "POISON_HEADER"]

LEDGER_HEADER = "infer_ledger"
POISON_HEADER = "infer_poison"

log = logging.getLogger(__name__)


@task_prerun.connect
def _count_execution(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    ledger = getattr(sender.request, LEDGER_HEADER, None) if sender is not None else None
    if not (isinstance(ledger, str) and ledger and task_id):
        return
    already = getattr(sender, "already_succeeded", None)
    if sender.app.infer_settings.deduplicate and already is not None and already(task_id):
        return  # IdempotentTask acks it without running the body
    client = getattr(sender.backend, "client", None)
    if client is None:
        log.warning("execution ledger %s needs a Redis result backend; not counted", ledger)
        return
    # The backend's connections reconnect through a Redis restart (tasks.wire.backend).
    client.hincrby(ledger, task_id, 1)


@task_prerun.connect
def _poison(sender: Any = None, **_: Any) -> None:
    # Connected after _count_execution, so the ledger counts the fatal start first.
    if sender is None or not getattr(sender.request, POISON_HEADER, None):
        return
    if sender.app.infer_settings.fault_injection:
        os.kill(os.getpid(), signal.SIGKILL)
