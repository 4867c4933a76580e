"""Pipelined publisher confirms: publish many task messages, then wait for their confirms together.

The app publishes with ``confirm_publish``: py-amqp's ``basic_publish_confirm``
sends one ``basic.publish`` and then blocks until the broker's
``basic.ack`` for it, one round trip per message.  :func:`publish_many` keeps
the guarantee (it returns only once every message is confirmed, so a returned
publish is durable) but lets up to ``window`` messages be unconfirmed at once:

1. It takes a connection from the app's pool and opens a channel of its own
   (``connection.channel()``), calls ``channel.confirm_select()`` on it, and
   replaces that one channel's ``basic_publish`` (the connection's
   ``confirm_publish`` had made it py-amqp's waiting ``basic_publish_confirm``)
   with :meth:`Pipeline.publish`, which calls the class's plain
   ``amqp.Channel.basic_publish`` (no wait).  On a fresh channel in confirm
   mode RabbitMQ numbers the publishes 1, 2, 3, ...: the n-th
   ``basic.publish`` has delivery tag n, recorded with the message's task id.
2. The messages are built and sent by Celery's own machinery, given a kombu
   ``Producer`` on that channel: ``send_all(producer)`` runs e.g. a loop of
   ``Task.apply_async(..., producer=producer)`` (-> ``app.send_task`` -> the
   router's ``route()`` -> ``app.amqp.create_task_message`` ->
   ``send_task_message``, which fires ``before_task_publish``: the send stamp
   and argsrepr are the same) or ``group.apply_async(producer=producer)``.
   Only the final write does not wait; ``after_task_publish`` fires before
   the confirm.
3. The broker's ``basic.ack`` / ``basic.nack`` frames reach py-amqp's
   ``Channel._on_basic_ack`` / ``_on_basic_nack``, which call the callbacks in
   ``channel.events["basic_ack"]`` / ``["basic_nack"]``; ours feed a
   :class:`ConfirmTracker`, which honours the ``multiple`` flag (one ack
   confirms every tag up to it).  ``connection.drain_events(timeout=...)``
   reads them whenever ``window`` messages are unconfirmed (so memory and
   the broker's outstanding confirms stay bounded for any N), and at the end
   until none is.

A nack, a confirm that does not come within ``confirm_timeout``, or a lost
connection raises :class:`~models.errors.PublishFailed`, whose ``task_ids``
are the messages not known to be durable (nacked, unconfirmed, never sent);
the confirmed ones stand and will run, so resubmit only those.  Messages go
out with ``retry=False``: a reconnect would open a new channel whose tags no
longer match, so a connection loss fails the call instead of retrying it.

Off AMQP (the embedded broker) there are no confirms: ``send_all`` runs with
the app's own producer, as ``apply_async`` would.

Bounded: the pipeline holds at most ``window`` unconfirmed tags; what grows
with N is only what the caller asked for (its N AsyncResults, and in
``infer.map`` the N checked requests, prepared before anything is sent).
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from celery.result import AsyncResult, GroupResult
from celery.utils import uuid

from models.errors import ConfigurationError, Overloaded, PublishFailed

__all__ = [
    "DEFAULT_WINDOW",
    "ConfirmTracker",
    "MapResult",
    "Pipeline",
    "PublishTiming",
    "confirming_producer",
    "drain",
    "message_task_id",
    "on_amqp",
    "pipelined",
    "publish_many",
]

DEFAULT_WINDOW = 256  # the most messages unconfirmed at once (memory stays flat for any N)
logger = logging.getLogger(__name__)

NAMED_IDS = 5  # how many task ids an error message spells out

T = TypeVar("T")


class ConfirmTracker:
    """Which task ids are unconfirmed, by delivery tag; fed by ``basic.ack`` / ``basic.nack``.

    Tags are counted here as RabbitMQ counts them on a channel in confirm
    mode: the first publish is tag 1.  Pure logic, no I/O.
    """

    def __init__(self) -> None:
        self.next_tag = 1
        self.pending: dict[int, str] = {}  # delivery tag -> task id, unconfirmed
        self.nacked: list[str] = []
        self.confirmed = 0

    def sent(self, task_id: str) -> int:
        """Record one ``basic.publish`` of ``task_id``; return its delivery tag."""
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self.pending[tag] = task_id
        return tag

    def _settle(self, tag: int, multiple: bool) -> list[str]:
        if not multiple:
            task_id = self.pending.pop(tag, None)
            return [] if task_id is None else [task_id]
        done = []
        for t in self.pending:  # a dict keeps the tags in send order
            if t > tag:
                break
            done.append(t)
        return [self.pending.pop(t) for t in done]

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        """``basic.ack``: the message (or, with ``multiple``, every one up to it) is durable."""
        self.confirmed += len(self._settle(delivery_tag, multiple))

    def on_nack(self, delivery_tag: int, multiple: bool) -> None:
        """``basic.nack``: the broker refused the message (or every one up to it)."""
        self.nacked.extend(self._settle(delivery_tag, multiple))

    @property
    def unconfirmed(self) -> int:
        return len(self.pending)


@dataclass
class PublishTiming:
    """How long :func:`publish_many` took (seconds): the benchmark's publish figures."""

    messages: int = 0
    publish_s: float = 0.0  # first publish to last confirm: the whole durable publish
    confirm_wait_s: float = 0.0  # of which spent waiting for confirms
    window: int = DEFAULT_WINDOW


class MapResult(GroupResult):
    """The results of ``infer.map``, in input order: ``get()`` -> list of replies; ``ids``; ``timing``."""

    def __init__(self, results: list[AsyncResult], timing: PublishTiming, **kwargs: Any) -> None:
        # An id of its own (never saved): Celery's backend drops a ready GroupResult by id.
        super().__init__(uuid(), results, **kwargs)
        self.timing = timing

    @property
    def ids(self) -> list[str]:
        return [str(r.id) for r in self.results]

    def get(self, timeout: float | None = 300.0, **kwargs: Any) -> list[Any]:
        kwargs.setdefault("interval", 0.01)
        return list(super().get(timeout=timeout, **kwargs))


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:NAMED_IDS])
    return shown + (f" and {len(ids) - NAMED_IDS} more" if len(ids) > NAMED_IDS else "")


def _failed(why: str, ids: list[str], total: int) -> PublishFailed:
    error = PublishFailed(
        f"{len(ids)} of {total} messages are not known to be on the broker ({why}): "
        f"{_named(ids)}; the others are confirmed and will run: resubmit only these "
        "(PublishFailed.task_ids lists them all)"
    )
    error.task_ids = tuple(ids)
    return error


def nacked(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, the broker's nack of the message."""
    from amqp.exceptions import MessageNacked

    return any(isinstance(e, MessageNacked) for e in causes(error))


def full_queue(app: Any, queue: str | None, task_id: str) -> Overloaded | None:
    """After a nack: :class:`~models.errors.Overloaded` if ``queue`` is at its ``x-max-length``.

    A bounded queue (``INFER_MAX_QUEUE_LENGTH``, ``x-overflow=reject-publish``)
    nacks a publish while it is full; a quorum queue also nacks while it
    elects a new leader, which a retry mends.  One passive declare tells them
    apart: full means Overloaded at once (never retried into a full queue).
    """
    limit = app.infer_settings.max_queue_length
    if not queue or not limit:
        return None
    try:
        with app.connection_for_write(connect_timeout=2.0) as conn:
            ready = int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception:  # the broker is away: the usual retries decide
        return None
    if ready < limit:
        return None
    return Overloaded(
        f"queue {queue} is full ({ready} ready messages, INFER_MAX_QUEUE_LENGTH={limit}): "
        f"the broker refused task {task_id}, nothing was queued. Retry later, add workers, "
        "or send it with a deadline so admission control refuses it before publishing"
    )


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or during, in order."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def tls_refused(task_id: str, error: BaseException) -> ConfigurationError | None:
    """A ConfigurationError when ``error`` is a failed TLS handshake with the broker, else None.

    Retrying cannot help and nothing was published: the certificates or the
    broker's host name are wrong, so the caller is told which settings to check.
    """
    import ssl

    failed = next((e for e in causes(error) if isinstance(e, ssl.SSLError)), None)
    if failed is None:
        return None
    return ConfigurationError(
        f"task {task_id} was not published: the TLS handshake with the broker failed "
        f"({type(failed).__name__}: {failed}): check INFER_BROKER_TLS_CA (the CA that signed "
        "the broker's certificate), INFER_BROKER_TLS_CERT/INFER_BROKER_TLS_KEY (a client "
        "certificate the broker trusts) and that CELERY_BROKER_URL names a host in the "
        "broker's certificate"
    )


def unconfirmed(task_id: str, error: BaseException, retries: int, nacks: int = 0) -> PublishFailed:
    """The typed error of one ``send_task`` whose publish failed after its retries.

    The message may still have reached a queue (a confirm lost with its
    connection), so the caller is told to resend with the same id: a worker
    does not run again a task whose SUCCESS is stored.
    """
    if nacks:
        why = f"the broker nacked it {nacks} times (a queue without a leader, or full)"
    else:
        cause = error.__cause__ or error.__context__
        why = f"{type(error).__name__}: {error}".rstrip(": ")
        if cause is not None and not str(error):
            why = f"{why} from {type(cause).__name__}: {cause}".rstrip(": ")
        why = f"{why}, after {retries} publish retries"
    failed = PublishFailed(
        f"task {task_id} is not known to be on the broker ({why}): check that a broker node "
        "is reachable, then resend it with the same task_id (a stored result is not computed twice)"
    )
    failed.task_ids = (task_id,)
    return failed


def message_task_id(message: Any) -> str:
    """The task id of a Celery message (protocol 2 header ``id``, else ``correlation_id``)."""
    properties = getattr(message, "properties", {}) or {}
    headers = properties.get("application_headers") or {}
    return str(headers.get("id") or properties.get("correlation_id") or "?")


class Pipeline:
    """The ``basic_publish`` of one channel in confirm mode, pipelined in windows.

    :meth:`publish` takes ``raw_publish``'s arguments (py-amqp's plain
    ``basic_publish``, which does not wait), records the message's delivery
    tag, and reads confirms (``connection.drain_events``) whenever ``window``
    are outstanding.  :meth:`finish` waits for the rest.  ``expected`` names
    every task id the caller means to send, so a failure names the unsent too.
    """

    def __init__(
        self,
        channel: Any,
        raw_publish: Callable[..., Any],
        window: int = DEFAULT_WINDOW,
        confirm_timeout: float = 30.0,
        expected: Sequence[str] = (),
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.channel, self.raw_publish = channel, raw_publish
        self.window, self.confirm_timeout = window, confirm_timeout
        self.expected = list(expected)
        self.tracker = ConfirmTracker()
        self.sent: set[str] = set()
        self.timing = PublishTiming(messages=0, window=window)
        self.started: float | None = None
        channel.events["basic_ack"].add(self.tracker.on_ack)
        channel.events["basic_nack"].add(self.tracker.on_nack)

    def publish(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        """Send ``message`` without waiting; wait only when ``window`` are unconfirmed."""
        if self.started is None:
            self.started = time.perf_counter()
        kwargs.pop("confirm_timeout", None)  # ours is per window, not per message
        returned = self.raw_publish(message, *args, **kwargs)
        task_id = message_task_id(message)
        self.tracker.sent(task_id)
        self.sent.add(task_id)
        self.timing.messages += 1
        if self.tracker.unconfirmed >= self.window:
            self.wait(self.window)
        return returned

    def wait(self, below: int) -> None:
        """Read confirms until fewer than ``below`` are outstanding; PublishFailed on a nack or timeout."""
        waited = time.perf_counter()
        try:
            drain(
                self.channel.connection,
                self.tracker,
                below,
                time.monotonic() + self.confirm_timeout,
            )
        except TimeoutError as e:  # py-amqp's socket.timeout
            raise self.failed(f"no confirm within {self.confirm_timeout}s") from e
        finally:
            self.timing.confirm_wait_s += time.perf_counter() - waited
        if self.tracker.nacked:
            raise self.failed("nacked by the broker")  # and send no more

    def finish(self) -> PublishTiming:
        """Wait for every outstanding confirm; the timings once all are in."""
        self.wait(1)
        if self.started is not None:
            self.timing.publish_s = time.perf_counter() - self.started
        return self.timing

    def unsettled(self) -> list[str]:
        """Task ids not known to be durable: nacked, unconfirmed, or expected and never sent."""
        unsent = [i for i in self.expected if i not in self.sent]
        return self.tracker.nacked + list(self.tracker.pending.values()) + unsent

    def failed(self, why: str) -> PublishFailed:
        total = max(len(self.expected), self.timing.messages)
        return _failed(why, self.unsettled(), total)


@contextmanager
def confirming_producer(
    app: Any,
    window: int = DEFAULT_WINDOW,
    confirm_timeout: float = 30.0,
    expected: Sequence[str] = (),
) -> Iterator[tuple[Any, Pipeline]]:
    """A kombu Producer on a fresh channel in confirm mode whose publishes are pipelined.

    Yields ``(producer, pipeline)``; call ``pipeline.finish()`` before leaving
    to wait for the confirms.  The channel is closed on exit and its
    connection goes back to the app's pool.
    """
    import amqp

    with app.pool.acquire(block=True) as conn:
        conn.ensure_connection(max_retries=app.infer_settings.publish_retries)
        channel = conn.channel()
        try:
            channel.confirm_select()
            # py-amqp made this channel's basic_publish the waiting basic_publish_confirm
            # (confirm_publish); the class's plain basic_publish does not wait.
            raw = types.MethodType(amqp.Channel.basic_publish, channel)
            pipeline = Pipeline(channel, raw, window, confirm_timeout, expected)
            channel.basic_publish = pipeline.publish
            yield app.amqp.Producer(channel, auto_declare=False), pipeline
        finally:
            try:
                channel.close()
            except Exception as e:  # a dead connection: the error that killed it is what counts
                logger.debug("closing the confirm channel failed: %r", e)


def drain(connection: Any, tracker: ConfirmTracker, below: int, deadline: float) -> None:
    """Read broker frames until fewer than ``below`` messages are unconfirmed.

    ``connection`` is py-amqp's (``channel.connection``); raises ``TimeoutError``
    (py-amqp's ``socket.timeout``) past ``deadline`` (a ``time.monotonic()`` value).
    """
    while tracker.unconfirmed >= below and not tracker.nacked:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no publisher confirm before the deadline")
        connection.drain_events(timeout=left)


def publish_many(
    app: Any,
    send_all: Callable[[Any], T],
    ids: Sequence[str],
    window: int = DEFAULT_WINDOW,
    confirm_timeout: float = 30.0,
) -> tuple[T, PublishTiming]:
    """Run ``send_all(producer)`` with pipelined confirms; return its value once all are confirmed.

    ``send_all`` publishes the messages whose task ids are ``ids`` through
    Celery calls given ``producer=producer, retry=False`` (e.g. a loop of
    ``Task.apply_async``, or ``group.apply_async``) and returns their results.
    The :class:`PublishTiming` is for benchmarks.  Raises :class:`PublishFailed`
    naming the ids not known to be durable; an error before anything was
    published propagates unchanged (the same one ``apply_async`` raises).
    """
    if not on_amqp(app):  # no publisher confirms off AMQP: the app's own producer, as apply_async
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            value = send_all(producer)
        return value, PublishTiming(len(ids), time.perf_counter() - started, 0.0, window)
    with pipelined(app, window, confirm_timeout, ids) as (producer, pipeline):
        value = send_all(producer)
    return value, pipeline.timing


def on_amqp(app: Any) -> bool:
    """Whether ``app`` publishes to an AMQP broker (the only kind with publisher confirms)."""
    with app.connection_for_write() as probe:
        return bool(probe.transport.driver_type == "amqp")


@contextmanager
def pipelined(
    app: Any,
    window: int = DEFAULT_WINDOW,
    confirm_timeout: float = 30.0,
    ids: Sequence[str] = (),
) -> Iterator[tuple[Any, Pipeline]]:
    """A producer whose publishes do not wait; leaving the block waits for all their confirms.

    Yields ``(producer, pipeline)``.  Publish with ``producer=producer,
    retry=False`` (a retry would republish on a new channel, whose delivery
    tags the pipeline does not track).  Everything published with the producer
    inside the block is confirmed when the block is left (the timings are in
    ``pipeline.timing``), or :class:`PublishFailed` names the task ids not
    known to be durable; an error before anything was published propagates
    unchanged.  The results of the tasks sent inside subscribe together
    (one SUBSCRIBE, :class:`tasks.wire.backend.ResilientRedisBackend`).
    AMQP only (:func:`on_amqp`).
    """
    together = getattr(app.backend, "subscribing_together", None)  # ours: one SUBSCRIBE for all
    with confirming_producer(app, window, confirm_timeout, ids) as (producer, pipeline):
        try:
            with together() if together is not None else contextlib.nullcontext():
                yield producer, pipeline
        except PublishFailed:
            raise
        except Exception as e:  # a router, connection or channel error part way through
            if pipeline.timing.messages == 0:
                raise
            raise pipeline.failed(f"publishing raised {type(e).__name__}: {e}") from e
        try:
            pipeline.finish()
        except PublishFailed:
            raise
        except Exception as e:  # the connection died while we waited for confirms
            raise pipeline.failed(f"connection lost: {type(e).__name__}: {e}") from e
