"""Tell the caller when a poison task is dead-lettered, instead of leaving it PENDING.

A task that kills its pool child (a segfault in native code, an OOM kill) is
requeued by ``task_reject_on_worker_lost``; the quorum queue counts each
delivery in the ``x-delivery-count`` header and dead-letters the message once
it exceeds ``INFER_DELIVERY_LIMIT``.  The broker does that silently, so on the
last delivery out of a class queue this request stores a
:class:`models.errors.TaskCrashed` failure for the task id first: the
caller's ``get()`` raises it instead of waiting forever.
"""

from __future__ import annotations

from typing import Any

from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from models.errors import TaskCrashed
from routing.queues import dead_letter_queue
from tasks.wire.codec import redact_bytes

__all__ = ["PoisonAwareRequest", "deliveries"]


def deliveries(headers: dict[str, Any] | None) -> int:
    """How many times a quorum queue delivered this message before (0 on the first delivery)."""
    try:
        return int((headers or {}).get("x-delivery-count") or 0)
    except (TypeError, ValueError):
        return 0


class PoisonAwareRequest(Request):
    def send_event(self, type: str, **fields: Any) -> None:
        # Flower shows the result text of task-succeeded: bytes (tensor data) as their size only.
        if not (self.eventer and self.eventer.enabled):
            return  # events are off (Flower switches them on): nothing to send or redact
        if type == "task-succeeded" and isinstance(fields.get("result"), str):
            fields["result"] = redact_bytes(fields["result"])
        super().send_event(type, **fields)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        # billiard >= 4.3 may report the lost child as SystemExit before it is reaped
        if isinstance(exc, WorkerLostError | SystemExit):
            self._report_if_last(exc)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _report_if_last(self, exc: BaseException) -> None:
        settings = self.app.infer_settings
        queue = (self.delivery_info or {}).get("routing_key") or ""
        dead = dead_letter_queue(queue)
        message = getattr(self, "_message", None)
        headers = getattr(message, "headers", None)
        if settings.queue_type != "quorum" or dead is None:
            return  # a direct queue hands it to its class queue, which tries again
        if deliveries(headers) < settings.delivery_limit:
            return
        error = TaskCrashed(
            f"task {self.name}[{self.id}] killed its worker process on each of "
            f"{settings.delivery_limit + 1} deliveries ({exc}); it was moved to the dead-letter "
            f"queue {dead!r}. Inspect it there, fix the input or the model, and publish it again"
        )
        self.task.backend.mark_as_failure(self.id, error, request=self._context)
