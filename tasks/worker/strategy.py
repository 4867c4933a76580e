"""The batching consumer strategy of ``tasks.infer``: requests become batches in the main process.

Celery lets a task choose how the worker's consumer handles its messages
(``Task.Strategy``; celery-batches uses the same hook).  With
``INFER_BATCHING`` on a prefork worker, :func:`batching` runs Celery's own
default strategy for each message (protocol conversion, ``revoke``/``expires``
check, ``task_received`` signal, ``task-received`` event, ETA and rate
limits, ``task_reserved``), except for its last step: instead of sending the
request to the pool as one pool job, :class:`BatchingStrategy` collects it
under its batch key (model, precision, sample shape, input dtype) in a
:class:`~tasks.worker.assembly.BatchAssembler`, and sends each batch to the
pool as **one** pool job (:func:`tasks.worker.batch_job.run_batch`).  The
prefork child that owns the device stays the only process that touches it.

Each request stays a Celery ``Request``: when the pool accepts the batch,
each gets Celery's ``on_accepted`` (``task-started`` event, active requests);
when the batch returns, each gets ``on_success`` with its own outcome, which
acks its message (late ack, after the child stored its result) and sends
``task-succeeded`` or ``task-failed``; a hard time limit gives each
``on_timeout``; a lost child gives each ``on_failure`` (the message is
requeued, ``task_reject_on_worker_lost``).

What goes to Celery's usual one-request path instead (``on_task_request``):
a request with an ETA, its own time limits, link callbacks, errbacks or a
chain, a body that is not protocol 2, or arguments that cannot be read as an
``infer`` call (the task body then raises the typed error).  Chord header
parts and group members are batched.

**Revoked and expired requests are never computed**: Celery's strategy drops
them on arrival, :meth:`BatchingStrategy.collect` checks a ``deadline``
header too, and :meth:`BatchingStrategy.flush` checks each request again
(``Request.revoked()``) when its batch leaves for the pool.  A revoked
request is stored REVOKED; one past its deadline ``DeadlineExceeded``
(:mod:`tasks.worker.expired`); the pool child checks the deadline once more
just before the forward pass.

**Load**: the strategy feeds this worker's :class:`~tasks.worker.load.ServiceMeter`
(arrivals, completions, drops) and each queue's head wait, which the
heartbeat advertises for admission control and the queue exporter.

**Batches fit their requests' deadlines**: a full batch of a slow model
(``minilm`` on one CPU core: 64 sentences, about 300 ms) can take most of a
500 ms deadline by itself, and a request arriving while one runs waits for it
and then for its own.  So each request with a deadline joins only a batch
whose expected service time (the key's measured pool-job time per sample,
:meth:`BatchingStrategy.served_per_sample`) stays within
``INFER_BATCH_DEADLINE_SHARE`` (a quarter) of its deadline budget, from its
send to its deadline: the rest is for the broker queue, the batch ahead of it,
and admission control's margin.  Requests without a deadline batch up to the
model's ``max_batch_size`` as before.

**A redelivered request runs alone** (``redelivered`` or an
``x-delivery-count``): if it is the one that killed the child, it cannot take
good batch-mates to the dead-letter queue with it.

**When the connection drops**, the broker requeues every unacked message:
the waiting requests are dropped here (:func:`discard_waiting`, from the
consumer's ``on_close``), as Celery drops its reserved requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from celery.worker import state as worker_state
from celery.worker.strategy import default

from models.catalog import ModelCatalog
from models.errors import RequestError
from models.text import estimated_bucket
from tasks.app import SENT_AT_HEADER
from tasks.wire.catalog import local_catalog
from tasks.wire.codec import is_envelope
from tasks.wire.deadline import DEADLINE_HEADER
from tasks.wire.request import infer_call
from tasks.worker import load
from tasks.worker.assembly import ALONE, BatchAssembler, BatchPolicy
from tasks.worker.batch_job import run_batch
from tasks.worker.poison import deliveries
from tasks.worker.sizing import BatchSizer

__all__ = ["BatchingStrategy", "batch_key", "batching", "discard_waiting"]

log = logging.getLogger(__name__)

_MAX_KEYS_MEASURED = 1024  # batch keys whose time per sample is kept (shapes can be many)


def batching(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``Task.Strategy`` of ``tasks.infer``: batching on a prefork worker, else Celery's default."""
    settings = getattr(app, "infer_settings", None)  # another app's worker: Celery's own
    if settings is None or not settings.batching:
        return default(task, app, consumer, **kwargs)
    if "prefork" not in type(consumer.pool).__module__:
        log.warning(
            "INFER_BATCHING needs the prefork pool (-P prefork -c 1), not %s: not batching",
            type(consumer.pool).__module__,
        )
        return default(task, app, consumer, **kwargs)
    strategy = BatchingStrategy(task, app, consumer)
    log.info(
        "%s: batching requests per (model, precision, shape, dtype), %d pool process(es), "
        "prefetch %s",
        task.name,
        consumer.pool.num_processes,
        consumer.initial_prefetch_count,
    )
    registry = getattr(consumer, "batching_strategies", None)
    if registry is not None:
        registry[task.name] = strategy
    # Celery logs each received task at INFO; at hundreds of requests a second that line
    # was 10% of a batching worker's main process (py-spy): here it is DEBUG.
    kwargs.setdefault("info", log.debug)
    return default(task, app, _Collecting(consumer, strategy.collect), **kwargs)


def _model_key(key: Hashable) -> bool:
    """Whether ``key`` is a model's batch key, not that of a request queued alone."""
    return isinstance(key, tuple) and key[0] != ALONE


def discard_waiting(consumer: Any) -> int:
    """Drop every request waiting in a batch (the channel is gone); how many were dropped."""
    registry = getattr(consumer, "batching_strategies", None) or {}
    return sum(strategy.discard() for strategy in registry.values())


def _limits(reqs: list[Any]) -> tuple[float | None, float | None]:
    """The batch's (hard, soft) time limits: the strictest its requests ask for (None: the pool's)."""

    def strictest(values: list[Any]) -> float | None:
        given = [float(v) for v in values if isinstance(v, int | float) and v > 0]
        return min(given) if given else None

    limits = [(*(req.time_limits or ()), None, None) for req in reqs]
    return strictest([lim[0] for lim in limits]), strictest([lim[1] for lim in limits])


class _Collecting:
    """The consumer as Celery's strategy sees it, whose ``on_task_request`` collects."""

    def __init__(self, consumer: Any, collect: Any) -> None:
        self._consumer = consumer
        self.on_task_request = collect

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def batch_key(catalog: ModelCatalog, model: Any, inputs: Any, dtype: Any) -> tuple[Hashable, int]:
    """(batch key, samples) of an ``infer`` call, read without decoding any tensor.

    Raises :class:`~models.errors.UnknownModel` for a model no source of
    ``catalog`` knows.  The key is a hint for grouping: the child regroups by
    the decoded shape (a text model: by the real token-length bucket), so a
    list input (its shape unknown here) is still served right.  Text requests
    are keyed by an estimated padded-length bucket, so a long text does not
    wait with, and pad, a batch of short ones.
    """
    spec = catalog.resolve(model)
    if spec.text is not None:
        samples = len(inputs) if isinstance(inputs, list | tuple) else 1
        return (spec.ref, dtype, "text", estimated_bucket(inputs, spec.text.max_tokens)), max(
            1, samples
        )
    if is_envelope(inputs):
        shape = inputs.get("shape")
        if isinstance(shape, list | tuple) and all(isinstance(d, int) for d in shape):
            if len(shape) == len(spec.sample_shape) + 1:
                return (spec.ref, dtype, tuple(shape[1:]), str(inputs.get("dtype"))), max(
                    1, shape[0]
                )
            return (spec.ref, dtype, tuple(shape), str(inputs.get("dtype"))), 1
    return (spec.ref, dtype, type(inputs).__name__, None), 1


class BatchingStrategy:
    """Collects ``infer`` requests into batches and runs each batch as one pool job."""

    def __init__(
        self, task: Any, app: Any, consumer: Any, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.task = task
        self.clock = clock
        self.settings = app.infer_settings
        self.consumer = consumer
        self.pool = consumer.pool
        self.assembler: BatchAssembler[tuple[Any, float, int]] = BatchAssembler(self.policy)
        self.in_flight = 0  # batch jobs sent to the pool and not finished
        self.in_flight_requests = 0  # the requests in them
        # Reserved requests of this worker (Celery's worker state): ours and everyone else's.
        self.reserved: Any = worker_state.reserved_requests
        self._timer: Any = None
        # Each model's most efficient batch size, learned from the child's forward passes.
        self.sizer = BatchSizer(clock=clock) if self.settings.batch_sizing else None
        self._limits: dict[str, tuple[int, float]] = {}  # name@version -> (max batch, max wait ms)
        # What the heartbeat advertises: service rate, requests outstanding here.
        self.meter = load.ServiceMeter(self.settings.service_rate_window_s, clock=clock)
        self._published = 0.0
        self._last_job_end = 0.0  # when the pool last returned a batch (its service time's start)
        # Per batch key: a pool job's service time per sample, ms (a moving average).
        self._ms_per_sample: dict[Hashable, float] = {}

    def policy(self, key: Hashable) -> BatchPolicy:
        """The key's limits, asked on every arrival (the batch sizer's cap may have moved)."""
        ref: str = key[0]  # type: ignore[index]
        limits = self._limits.get(ref)
        if limits is None:  # a name@version's spec never changes: read it once
            spec = local_catalog(self.settings).resolve(ref)
            limits = self._limits[ref] = (
                spec.max_batch_size or self.settings.max_batch_size,
                self.settings.max_wait_ms if spec.max_wait_ms is None else spec.max_wait_ms,
            )
        largest, wait_ms = limits
        return BatchPolicy(
            max_batch_size=largest if self.sizer is None else self.sizer.cap(ref, largest),
            max_wait_ms=wait_ms,
        )

    # -- arrival ---------------------------------------------------------------------------------
    def collect(self, req: Any) -> None:
        """Celery's strategy hands over a reserved request: batch it, or run it the usual way."""
        now = time.time()
        load.observe_head(
            req.delivery_info.get("routing_key"), req.request_dict.get(SENT_AT_HEADER), now
        )
        # Celery's strategy has just checked a request with expires= (ours always carry it with
        # a deadline); a deadline header alone, from a producer that is not ours, is checked here.
        if req.expires is None and DEADLINE_HEADER in req.request_dict and req.revoked():
            return
        plan = self.plan(req)
        if plan is None:
            self.consumer.on_task_request(req)
            return
        key, samples, alone = plan
        self.meter.arrived()
        limit = None if alone else self.deadline_limit(key, req, now)
        self.assembler.add(key, (req, now, samples), self.clock(), samples, alone, limit)
        self.flush()

    def deadline_limit(self, key: Hashable, req: Any, now: float) -> int | None:
        """The most samples ``req``'s batch may hold to fit its deadline (None: no limit).

        Its batch's expected service time (samples x the key's measured time
        per sample) stays within ``INFER_BATCH_DEADLINE_SHARE`` of the
        request's budget: from its send (``infer_sent_at``; else its arrival)
        to its deadline.  No limit before the key's first batch is measured.
        """
        per_sample_ms = self._ms_per_sample.get(key)
        deadline = req.deadline
        if per_sample_ms is None or deadline is None:
            return None
        sent = req.request_dict.get(SENT_AT_HEADER)
        start = sent if isinstance(sent, int | float) and sent <= now else now
        budget_ms = (deadline - start) * 1000.0
        return max(1, int(self.settings.batch_deadline_share * budget_ms / per_sample_ms))

    def served_per_sample(self, key: Hashable) -> float | None:
        """The key's measured pool-job service time per sample, ms; None before its first batch."""
        return self._ms_per_sample.get(key)

    def plan(self, req: Any) -> tuple[Hashable, int, bool] | None:
        """(key, samples, alone) for a batchable request; None for Celery's one-request path."""
        if req.eta:
            return None
        payload = req.message.payload  # decoded once by kombu, cached on the message
        if not (isinstance(payload, list | tuple) and len(payload) == 3):
            return None
        embed = payload[2] or {}
        if not isinstance(embed, dict) or any(
            embed.get(k) for k in ("callbacks", "errbacks", "chain")
        ):
            return None
        try:
            model, inputs, dtype = infer_call(req.args, req.kwargs)
            if not isinstance(dtype, str | None):
                return None  # the task body refuses it with its typed error
            key, samples = batch_key(local_catalog(self.settings), model, inputs, dtype)
        except RequestError:
            return None
        alone = bool(req.delivery_info.get("redelivered")) or deliveries(req.request_dict) > 0
        return key, samples, alone

    # -- dispatch --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send every due batch the pool has room for; arm a timer for the next one.

        Not while the worker shuts down: what still waits here stays unacked and
        goes back to the queue with the connection, for another worker.
        """
        if worker_state.should_stop or worker_state.should_terminate:
            return
        now = self.clock()
        processes = self.pool.num_processes
        while len(self.assembler):
            busy = self.busy()
            free = processes - busy
            # Full batches may wait in the pool's queue, one per process: no idle gap between them.
            queue = max(0, min(processes, 2 * processes - busy))
            if free <= 0 and queue <= 0:
                break
            batches = self.assembler.take(now, max(0, free), busy, queue_slots=queue)
            if not batches:
                break
            # More requests waiting behind these batches: they show what the worker does saturated.
            backlogged = len(self.assembler) > 0
            for key, items in batches:
                live = [item for item in items if not item[0].revoked()]
                if len(live) < len(items):  # revoked or past the deadline: never computed
                    self.meter.left(len(items) - len(live), completed=0)
                if live:
                    self.dispatch(live, key, saturated=backlogged or self._full(key, items))
        self._arm_timer(now)
        self._publish_load(now)

    def _publish_load(self, now: float) -> None:
        """Hand the meter's figures to the heartbeat's process, at most every 0.2 s."""
        shared = load.shared()
        if shared is not None and (now - self._published >= 0.2 or not self.meter.outstanding):
            self._published = now
            shared.publish(self.meter, from_consumer=True)

    def _full(self, key: Hashable, items: list[tuple[Any, float, int]]) -> bool:
        """Whether a batch of ``key`` left at its model's cap."""
        if not _model_key(key):
            return False
        return sum(n for _, _, n in items) >= self.policy(key).max_batch_size

    def dispatch(
        self, items: list[tuple[Any, float, int]], key: Hashable, saturated: bool = False
    ) -> None:
        """One pool job for ``items`` (request, arrival, samples) of ``key``; Celery's request
        handlers for each when it is done.  ``saturated``: it left full, or others wait behind it
        (its rate is what the worker does under load)."""
        reqs = [req for req, _, _ in items]
        batch_samples = sum(n for _, _, n in items)
        payload = [(req.request_dict, req.message.payload[2] or {}, at) for req, at, _ in items]
        finished = False

        def release() -> bool:
            nonlocal finished
            if finished:
                return False
            finished = True
            self.in_flight -= 1
            self.in_flight_requests -= len(reqs)
            return True

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in reqs:
                req.on_accepted(pid, time_accepted)

        def on_timeout(soft: bool, timeout: float) -> None:
            for req in reqs:
                req.on_timeout(soft, timeout)

        def on_result(result: tuple[list[Any], list[Any]]) -> None:
            if not release():
                return
            outcomes, passes = result
            served = sum(1 for o in outcomes if not o[0])
            self.meter.left(len(reqs), completed=served)
            # Its service time: from the later of its dispatch and the pool's previous result.
            now = self.clock()
            service_s = now - max(dispatched, self._last_job_end)
            # Every request it finished left the queue (one dropped past its deadline just
            # before the forward pass too): the rate a backlog drains at.
            self.meter.served(len(reqs), service_s, saturated)
            self._last_job_end = now
            if served and _model_key(key):
                self._observe(key, service_s * 1000.0 / batch_samples)
            for req, outcome in zip(reqs, outcomes, strict=True):
                self._safely(req.on_success, req, outcome)
            if self.sizer is not None:
                for model, samples, compute_ms, size in passes:
                    self.sizer.observe(model, samples, compute_ms, size)
            self.flush()

        def on_error(einfo: Any) -> None:
            if not release():
                return
            self.meter.left(len(reqs), completed=0)
            for req in reqs:
                self._safely(req.on_failure, req, einfo)
            self.flush()

        hard, soft = _limits(reqs)
        dispatched = self.clock()
        self.in_flight += 1
        self.in_flight_requests += len(reqs)
        self.pool.apply_async(
            run_batch,
            args=(self.task.name, payload, self._events_on()),
            accept_callback=on_accepted,
            timeout_callback=on_timeout,
            callback=on_result,
            error_callback=on_error,
            timeout=hard,
            soft_timeout=soft,
            correlation_id=reqs[0].id,
        )

    def _observe(self, key: Hashable, ms_per_sample: float) -> None:
        old = self._ms_per_sample.get(key)
        if old is None and len(self._ms_per_sample) >= _MAX_KEYS_MEASURED:
            del self._ms_per_sample[next(iter(self._ms_per_sample))]  # the longest known
        self._ms_per_sample[key] = (
            ms_per_sample if old is None else old + 0.3 * (ms_per_sample - old)
        )

    def _events_on(self) -> bool:
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        return bool(dispatcher is not None and dispatcher.enabled)

    def busy(self) -> int:
        """Pool processes taken: our batch jobs, and any other task's request sent to the pool.

        Another task's request (a chord body, a diagnostic task) is in Celery's
        reserved requests from arrival until it finishes; ours are there too,
        waiting here or in flight, and are not counted twice.
        """
        ours = len(self.assembler) + self.in_flight_requests
        others = max(0, len(self.reserved) - ours)
        return self.in_flight + others

    @staticmethod
    def _safely(handler: Any, req: Any, arg: Any) -> None:
        try:
            handler(arg)
        except Exception as e:  # one request's trouble must not strand its batch-mates
            log.error("finishing %s failed: %s", req.id, e, exc_info=True)

    def _arm_timer(self, now: float) -> None:
        """Wake up when the oldest waiting batch is due, or poll while another task holds the pool.

        The end of one of our batch jobs calls :meth:`flush` itself; the end of
        another task's request (a chord body, a diagnostic task) tells us
        nothing, so while one holds a pool process we look again every
        ``max_wait_ms`` (at least 1 ms).
        """
        if self._timer is not None or not len(self.assembler):
            return
        busy = self.busy()
        if busy < self.pool.num_processes:
            due = self.assembler.next_due(now)
        elif busy > self.in_flight:
            due = max(0.001, self.settings.max_wait_ms / 1000.0)
        else:
            return
        if due is not None:
            self._timer = self.consumer.timer.call_after(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def discard(self) -> int:
        """Forget the waiting requests (their messages go back to the queue with the channel)."""
        self._timer = None  # the consumer clears its timer on close
        dropped = len(self.assembler.drain())
        self.meter.left(dropped, completed=0)
        return dropped
