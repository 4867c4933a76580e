"""The worker's consumer: a message no worker can run is dead-lettered, and its caller told.

Celery's consumer has one hook per kind of message it cannot run: a body it
cannot decode or whose content type is refused (``on_decode_error``, and
``on_invalid_task`` for ``ContentDisallowed``), an invalid task message
(``on_invalid_task``), an unregistered task name (``on_unknown_task``) and a
message that is no task at all (``on_unknown_message``).  Celery acks the
first and drops it, logs each with a traceback and a dump of the body, and
leaves the caller's ``AsyncResult.get()`` waiting forever on all but the
unknown task.  Here every one of them is rejected to ``<queue>.dead`` with
its headers intact, logged in one line, and, when the headers name a task id
(Celery's protocol 2: ``headers["id"]``, ``headers["task"]``), a
:class:`~models.errors.MalformedMessage` failure is stored for that id in the
result backend first, in Celery's own format, so ``get()`` raises it.  The
body is never deserialised for that: a refused content type (pickle) stays
undecoded.  What is not stored:

- a message without an id in its headers (protocol 1, no headers): only dead-lettered;
- a result already final for that id (a success is never overwritten; a
  message refused out of a direct queue is refused again out of its class
  queue, which finds the failure stored);
- ``ignore_result`` in the headers: the caller asked for no result;
- anything while message signing is on: headers are not signed, so a
  publisher without the key could otherwise fail a signed caller's task by
  naming its id;
- remote-control (pidbox, no-ack) messages: ignored, never rejected.

Events go out without publisher confirms: in Celery's consumer
``connection_for_write`` serves only the Events bootstep.  Events are
telemetry for Flower (transient messages on a fanout exchange), so the worker
need not wait for a broker confirm on each of the three it sends per task
(received, started, succeeded).  Measured with ``python -m benchmarks`` (3
runs each, events on): no-op p50 over celery_baseline 1.13 (median)
unconfirmed vs 1.19 confirmed.  Task messages and results keep their confirms.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from celery import signals, states
from celery.app.task import Context
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from models.errors import MalformedMessage, echo
from tasks.wire.codec import TEXT_CONTENT

__all__ = ["TelemetryConsumer", "caller_error", "task_id_of"]

log = logging.getLogger(__name__)

PICKLE = "application/x-python-serialize"
MAX_ID_CHARS = 255  # a Celery task id is a uuid; anything longer is not one
MAX_REASON_CHARS = 300  # of an exception's text repeated in a log line or a message

UNDECODABLE = "cannot be decoded"
INVALID = "is not a valid task message"
UNREGISTERED = "names an unregistered task"
NOT_A_TASK = "is not a task (no task name in its headers or body)"


def task_id_of(headers: Any) -> str | None:
    """The task id a protocol 2 message's headers name, or None (protocol 1, no headers)."""
    if not isinstance(headers, Mapping):
        return None
    task_id, name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not isinstance(name, str):
        return None
    return task_id if 0 < len(task_id) <= MAX_ID_CHARS else None


def _reason(exc: BaseException) -> str:
    """``exc``'s text on one line, cut short; its wrapped error's name when it has no text."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    text = str(exc) or (type(inner).__name__ if inner is not None else type(exc).__name__)
    text = " ".join(text.split())  # one line, whatever the exception says
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def caller_error(
    what: str, content_type: str | None, exc: BaseException | None, task: object, accepted: str
) -> MalformedMessage:
    """The failure a refused message's caller gets: what is wrong and what to do.

    ``what`` is the kind of refusal (one of this module's constants);
    ``accepted`` the serializers the worker takes, e.g. ``msgpack or json``.
    """
    if isinstance(exc, ContentDisallowed) or content_type == TEXT_CONTENT:
        why = {
            PICKLE: " (pickle executes code)",
            TEXT_CONTENT: " (kombu would hand its body to the task undecoded)",
        }.get(content_type or "", "")
        return MalformedMessage(
            f"content type {content_type} is refused{why}: send with serializer {accepted}"
        )
    if what == UNREGISTERED:
        return MalformedMessage(
            f"task {echo(task)} is not registered on this worker: check the name "
            "(celery -A tasks inspect registered)"
        )
    if what == UNDECODABLE:
        return MalformedMessage(
            f"the message body is not valid {content_type} ({_reason(exc) if exc else '?'}): "
            "publish the task with Celery (apply_async or send_task), or encode its body "
            f"in the format its content type names ({accepted})"
        )
    return MalformedMessage(
        f"the message is not a valid Celery task message ({_reason(exc) if exc else '?'}): "
        "publish with apply_async or send_task (Celery's task message protocol 2)"
    )


class TelemetryConsumer(Consumer):
    """Dead-letters every message it cannot run and fails its task id; events without confirms.

    It also keeps the batching strategies (:mod:`tasks.worker.strategy`) by
    task name, so that a lost connection drops the requests waiting in a batch
    with Celery's other reserved requests.
    """

    class Blueprint(Consumer.Blueprint):
        """Celery's consumer steps, with delayed delivery set up through one node of a cluster."""

        default_steps = [
            "tasks.worker.delayed_delivery:ClusterDelayedDelivery"
            if step.endswith(":DelayedDelivery")
            else step
            for step in Consumer.Blueprint.default_steps
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.batching_strategies: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def on_close(self) -> None:
        from celery.worker import state

        from tasks.worker.strategy import discard_waiting

        dropped = discard_waiting(self)
        if dropped:
            stopping = state.should_stop or state.should_terminate
            log.warning(
                "%s: %d requests waiting in a batch go back to the queue for another worker",
                "shutting down" if stopping else "connection lost",
                dropped,
            )
        super().on_close()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if message.delivery_info.get("consumer_tag") in (message.channel.no_ack_consumers or ()):
            # A remote-control broadcast (no-ack pidbox queue): there is nothing to reject,
            # and rejecting a tag the broker never tracked makes it close the channel.
            log.error(
                "ignored a remote-control message that %s (%s: %s); content type %r",
                UNDECODABLE,
                type(exc).__name__,
                _reason(exc),
                message.content_type,
            )
            return
        self._refuse(message, UNDECODABLE, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, UNDECODABLE if isinstance(exc, ContentDisallowed) else INVALID, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        task_id = self._refuse(message, UNREGISTERED, None)
        signals.task_unknown.send(
            sender=self,
            message=message,
            exc=exc,
            name=(message.headers or {}).get("task"),
            id=task_id,
        )

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, NOT_A_TASK, None)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def _refuse(self, message: Any, what: str, exc: BaseException | None) -> str | None:
        """Store the caller's failure (when its id is known), log one line, dead-letter."""
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        task = headers.get("task")
        task_id = task_id_of(message.headers)
        accepted = " or ".join(self.app.conf.accept_content)
        error = caller_error(what, message.content_type, exc, task, accepted)
        outcome = (
            self._fail(task_id, task, message, error) if task_id else "no task id in its headers"
        )
        cause = f" ({type(exc).__name__}: {_reason(exc)})" if exc is not None else ""
        named = f"task {echo(task)}[{task_id}]" if task_id else f"headers {echo(message.headers)}"
        log.error(
            "refused a message that %s%s; %s, content type %r: dead-lettered, not run; %s",
            what,
            cause,
            named,
            message.content_type,
            outcome,
        )
        message.reject_log_error(log, self.connection_errors, requeue=False)
        return task_id

    def _fail(self, task_id: str, task: object, message: Any, error: MalformedMessage) -> str:
        """Store ``error`` as ``task_id``'s failure; say what was done, for the log line."""
        headers = message.headers
        if "auth" in self.app.conf.accept_content:  # tasks.wire.signing is on
            return "no result stored: signing is on and headers are not signed"
        if headers.get("ignore_result"):
            return "no result stored: the message asks for none (ignore_result)"
        backend = self.app.backend
        try:
            if backend.get_state(task_id) in states.READY_STATES:
                return f"{task_id} already has its result, left alone"
            request = Context(
                id=task_id,
                task=task,
                group=headers.get("group"),
                root_id=headers.get("root_id"),
                parent_id=headers.get("parent_id"),
                hostname=self.hostname,
                delivery_info=message.delivery_info,
                correlation_id=message.properties.get("correlation_id"),
                reply_to=message.properties.get("reply_to"),
            )
            backend.mark_as_failure(task_id, error, request=request)
        except Exception as e:  # the message still goes to the dead letters
            return f"could not store its failure ({type(e).__name__}: {_reason(e)})"
        if self.event_dispatcher is not None:  # Flower shows the failure (when events are on)
            with contextlib.suppress(Exception):
                self.event_dispatcher.send("task-failed", uuid=task_id, exception=repr(error))
        return f"its caller gets MalformedMessage: {error}"

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
            )
        )
