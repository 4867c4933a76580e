"""One batch of ``tasks.infer`` requests, run in the pool child as one pool job.

The worker's main process (:mod:`tasks.worker.strategy`) sends the child a
list of requests; :func:`run_batch` serves them all and returns one outcome
per request, in order, in the shape Celery's own trace returns for one task
(``(failed, retval, runtime)``), so the main process finishes each request
with Celery's ``Request.on_success``.

In the child, per batch:

1. **Deduplication, one MGET**: a request whose SUCCESS is stored is not run
   again; its outcome is Celery's ``Ignore``, so the main process acks it.
2. **Each request checked alone** (call shape, model, precision, inputs;
   claim-checked inputs fetched in one pipeline, checked for length and hash):
   a bad one fails with its typed error and the others go on.
3. **One forward pass per (model, precision, sample shape, dtype)**: the
   checked inputs are concatenated (a request may carry several samples).
   Just before each pass, a request past its deadline is dropped from it
   with :class:`~models.errors.DeadlineExceeded` (never computed).
   Past the device's free memory the pass is split.  If a pass raises, its
   requests run one by one, so only the culprit fails.
4. **Results in one pipeline** (:mod:`tasks.worker.result_pipeline`): the
   same keys, encoding and PUBLISH as Celery's Redis backend.  Then, per
   request that needs it, the backend's public chord, chain and errback
   handling (``on_chord_part_return``, ``mark_as_failure(store_result=False)``).
   If the results cannot be stored, every request of the batch is requeued
   (``Reject(requeue=True)``): nothing is acked without its result.
   Claim-checked input blobs are deleted once the outcomes are stored.
5. **Per-request signals**: ``task_prerun``, ``task_success`` or
   ``task_failure`` and ``task_postrun`` fire for each request with its own
   context pushed, so the metrics, the running-task count and any user's
   handler see every request as they would a plain task.

A request's timing: ``queue_wait_ms`` is publish to arrival at the worker,
``batch_wait_ms`` arrival to the start of its batch in the child (waiting for
the batch to fill and for the child), ``compute_ms`` its forward pass,
``service_ms`` the batch's start to its results, ``total_ms`` publish to
results.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from billiard.einfo import ExceptionInfo
from celery import signals, states
from celery.app.task import Context
from celery.exceptions import Ignore, Reject
from celery.utils.serialization import get_pickleable_exception

from models.errors import DeadlineExceeded, RequestError
from models.spec import ModelSpec
from models.validation import check_size
from tasks.app import SENT_AT_HEADER, app
from tasks.wire import blobs
from tasks.wire.codec import display, encode
from tasks.wire.deadline import check as check_deadline
from tasks.wire.deadline import of_request
from tasks.wire.request import check_dtype, infer_call
from tasks.worker import result_pipeline

__all__ = ["BatchItem", "Outcome", "Pass", "reply", "run_batch"]

log = logging.getLogger(__name__)

# (request dict with args and kwargs, the message's embed (chord, callbacks...), arrival time)
BatchItem = tuple[dict[str, Any], dict[str, Any], float]
# Celery's trace result for one task: (failed, retval or ExceptionInfo, runtime in seconds)
Outcome = tuple[int, Any, float]
# One forward pass the batch made, for the batch sizer: (model@version, samples, compute ms,
# the size of one sample: its elements, or a text batch's padded length in tokens)
Pass = tuple[str, int, float, int]


@dataclass(eq=False)  # compared by identity: its fields hold arrays
class _Request:
    index: int
    context: Context
    arrived: float
    spec: ModelSpec | None = None
    precision: str = ""
    inputs: Any = None  # the checked batch: an array, or a text model's token ids
    outputs: np.ndarray | None = None
    forward_batch: int = 0
    compute_ms: float = 0.0
    blob: dict[str, Any] | None = None  # its claim-checked input's reference (deleted once stored)
    error: BaseException | None = None
    traceback: str | None = None
    reply: dict[str, Any] | None = None

    @property
    def args(self) -> Any:
        return self.context.args

    @property
    def kwargs(self) -> Any:
        return self.context.kwargs


def reply(
    spec: ModelSpec,
    outputs: np.ndarray,
    *,
    batch_size: int,
    forward_batch: int,
    worker: str | None,
    device: str,
    precision: str,
    sent_at: Any,
    started: float,
    finished: float,
    batch_wait_ms: float,
    compute_ms: float,
) -> dict[str, Any]:
    """The reply of one ``infer`` request (the shape :mod:`tasks.inference` documents)."""
    check_size(outputs.nbytes, app.infer_settings.max_payload_bytes)
    # A producer that does not stamp the send time (any client but ours): the wait is unknown.
    sent = float(sent_at) if isinstance(sent_at, int | float) and sent_at > 0 else None
    arrived = started - batch_wait_ms / 1000.0
    return {
        "model": spec.name,
        "version": spec.version,  # which version served it (name@version pins one)
        "outputs": encode(outputs, binary=app.infer_settings.binary_tensors),
        "batch_size": batch_size,
        "forward_batch": forward_batch,  # samples in the forward pass that served this request
        "worker": worker,
        "device": device,
        "dtype": precision,
        "timing": {
            "queue_wait_ms": None if sent is None else max(0.0, (arrived - sent) * 1000.0),
            "batch_wait_ms": batch_wait_ms,
            "compute_ms": compute_ms,
            "service_ms": (finished - started) * 1000.0,
            "total_ms": None if sent is None else max(0.0, (finished - sent) * 1000.0),
        },
    }


def run_batch(
    task_name: str, items: list[BatchItem], events: bool = True
) -> tuple[list[Outcome], list[Pass]]:
    """Serve ``items`` (one pool job); one outcome per item, in order, and the forward passes made.

    The passes tell the main process's batch sizer (:mod:`tasks.worker.sizing`)
    what each batch size costs per sample.

    ``events``: whether the main process sends task events now; without them
    no one reads a success's result text, so it is not made.
    """
    from tasks.worker.runtime import get_runtime

    started = time.time()
    task = app.tasks[task_name]
    backend = task.backend
    requests = [
        _Request(i, Context({**request, **(embed or {}), "is_eager": False}), arrived)
        for i, (request, embed, arrived) in enumerate(items)
    ]
    outcomes: list[Outcome | None] = [None] * len(requests)
    pipelined = result_pipeline.supports_pipeline(backend)

    duplicates = _duplicates(task, backend, [r.context.id for r in requests], pipelined)
    live: list[_Request] = []
    for r in requests:
        if r.context.id in duplicates:
            log.warning(
                "task %s[%s] already succeeded: duplicate delivery acked, not run again",
                task_name,
                r.context.id,
            )
            outcomes[r.index] = (1, _einfo(Ignore()), 0.0)
        else:
            live.append(r)
    for r in live:
        _signal(task, r, signals.task_prerun, task_id=r.context.id, task=task)

    runtime = get_runtime()
    _check_each(live, runtime)
    passes: list[Pass] = []
    _forward_groups([r for r in live if r.error is None], runtime, passes)
    finished = time.time()
    for r in live:
        if r.error is None:
            assert r.spec is not None and r.outputs is not None and r.inputs is not None
            try:
                r.reply = reply(
                    r.spec,
                    r.outputs,
                    batch_size=len(r.inputs),
                    forward_batch=r.forward_batch,
                    worker=r.context.hostname,
                    device=str(runtime.device),
                    precision=r.precision,
                    sent_at=r.context.get(SENT_AT_HEADER),
                    started=started,
                    finished=finished,
                    batch_wait_ms=max(0.0, (started - r.arrived) * 1000.0),
                    compute_ms=r.compute_ms,
                )
            except Exception as e:
                _fail(r, e)

    try:
        _store(task, backend, live, pipelined)
    except Exception as e:  # nothing is acked without its result: all go back to the queue
        log.error(
            "could not store the results of a batch of %d (%s: %s): requeued",
            len(live),
            type(e).__name__,
            e,
        )
        for r in live:
            outcomes[r.index] = (1, _einfo(Reject(str(e), requeue=True)), 0.0)
            _signal(task, r, signals.task_postrun, task_id=r.context.id, task=task, state=None)
        return [o for o in outcomes if o is not None], passes

    _release_blobs(live)
    runtime_s = time.time() - started
    for r in live:
        outcomes[r.index] = _finish(task, r, runtime_s, events)
    return [o for o in outcomes if o is not None], passes


def _duplicates(task: Any, backend: Any, ids: list[str], pipelined: bool) -> set[str]:
    if not app.infer_settings.deduplicate:
        return set()
    if pipelined:
        return result_pipeline.succeeded_ids(backend, ids)
    return {i for i in ids if task.already_succeeded(i)}


def _check_each(requests: list[_Request], runtime: Any) -> None:
    """Decode and check each request alone; a bad one gets its error, the rest go on.

    Claim-checked inputs are fetched first, all in one pipeline
    (:func:`tasks.wire.blobs.fetch_many`); a missing or tampered blob fails
    only its own request.
    """
    from models.runner import resolve_dtype

    max_bytes = app.infer_settings.max_payload_bytes
    calls: dict[int, Any] = {}
    for r in requests:
        try:
            calls[r.index] = infer_call(r.args, r.kwargs)
        except Exception as e:
            _fail(r, e)
    inputs = {i: call.inputs for i, call in calls.items()}
    referenced = [r for r in requests if r.index in calls and blobs.is_reference(inputs[r.index])]
    if referenced:
        try:
            fetched: list[Any] = blobs.fetch_many(
                blobs.blob_client(app), [inputs[r.index] for r in referenced], max_bytes=max_bytes
            )
        except Exception as e:  # Redis unreachable, or no Redis for blobs
            fetched = [e] * len(referenced)
        for r, value in zip(referenced, fetched, strict=True):
            r.blob = inputs[r.index]
            if isinstance(value, BaseException):
                _fail(r, value)
            else:
                inputs[r.index] = value
    for r in requests:
        if r.error is not None:
            continue
        try:
            model, _, dtype = calls[r.index]
            spec = runtime.catalog.resolve(model)
            check_dtype(dtype)
            r.precision = resolve_dtype(dtype, spec, runtime.device)
            r.inputs = runtime.checked_batch(spec, r.precision, inputs[r.index])
            r.spec = spec
        except Exception as e:
            _fail(r, e)


def _release_blobs(requests: list[_Request]) -> None:
    """Delete the claim-checked inputs of requests whose outcome is stored (one UNLINK)."""
    refs = [r.blob for r in requests if r.blob is not None]
    if not refs:
        return
    try:
        blobs.delete_many(blobs.blob_client(app), refs)
    except Exception as e:  # they expire with their TTL
        log.warning("%d input blobs not deleted (%s): they expire with their TTL", len(refs), e)


def _forward_groups(requests: list[_Request], runtime: Any, passes: list[Pass]) -> None:
    """One forward pass per key, split at the memory cap; a failing pass reruns one by one."""
    groups: dict[Hashable, list[_Request]] = {}
    for r in requests:
        assert r.spec is not None and r.inputs is not None
        key = runtime.group_key(r.spec, r.precision, r.inputs)
        groups.setdefault(key, []).append(r)
    for group_key, group in groups.items():
        cap = runtime.memory_cap(group_key)
        for part in _split(group, cap):
            part = _in_time(part)
            if part:
                _forward(group_key, part, runtime.forward_batch, passes)


def _in_time(part: list[_Request]) -> list[_Request]:
    """The requests of ``part`` whose deadline has not passed; the others fail DeadlineExceeded."""
    now = time.time()
    kept: list[_Request] = []
    for r in part:
        try:
            check_deadline(of_request(r.context, r.arrived), now, "its forward pass")
        except DeadlineExceeded as e:
            _fail(r, e)
        else:
            kept.append(r)
    return kept


def _split(group: list[_Request], cap: int | None) -> list[list[_Request]]:
    if not cap:
        return [group]
    parts: list[list[_Request]] = [[]]
    samples = 0
    for r in group:
        n = len(r.inputs) if r.inputs is not None else 1
        if parts[-1] and samples + n > cap:
            parts.append([])
            samples = 0
        parts[-1].append(r)
        samples += n
    return parts


def _forward(
    key: Hashable,
    part: list[_Request],
    forward_batch: Callable[[Hashable, Any], tuple[np.ndarray, float]],
    passes: list[Pass],
) -> None:
    sizes = [len(r.inputs) for r in part if r.inputs is not None]
    batches = [r.inputs for r in part if r.inputs is not None]
    stacked: Any = (
        np.concatenate(batches)
        if isinstance(batches[0], np.ndarray)
        else [row for batch in batches for row in batch]  # a text model's token ids
    )
    try:
        outputs, compute_ms = forward_batch(key, stacked)
    except Exception as batch_error:
        if len(part) == 1:
            _fail(part[0], batch_error)
            return
        log.warning(
            "a batch of %d for %s failed (%s); running them one by one", len(part), key, batch_error
        )
        for r in part:
            _forward(key, [r], forward_batch, passes)
        return
    size = (
        int(np.prod(stacked.shape[1:]))
        if isinstance(stacked, np.ndarray)
        else max(len(row) for row in stacked)
    )
    passes.append((str(key[0]), len(stacked), compute_ms, max(1, size)))  # type: ignore[index]
    offset = 0
    for r, n in zip(part, sizes, strict=True):
        r.outputs = outputs[offset : offset + n]
        r.forward_batch = len(stacked)
        r.compute_ms = compute_ms
        offset += n


def _fail(r: _Request, exc: BaseException) -> None:
    r.error = exc
    r.traceback = None if isinstance(exc, RequestError) else _format_traceback(exc)


def _format_traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _store(task: Any, backend: Any, requests: list[_Request], pipelined: bool) -> None:
    """Every result of the batch, then the chord parts, chains and errbacks that need them."""
    stored = [r for r in requests if _stores(task, r)]
    by_backend = set() if pipelined else {r.index for r in stored}  # stored one by one below
    if pipelined:
        result_pipeline.store_all(
            backend,
            [
                result_pipeline.result_entry(
                    backend,
                    r.context.id,
                    r.reply if r.error is None else r.error,
                    states.SUCCESS if r.error is None else states.FAILURE,
                    r.traceback,
                    r.context,
                )
                for r in stored
            ],
        )
    for r in requests:
        try:
            if r.error is None:
                if r.index in by_backend:
                    backend.store_result(r.context.id, r.reply, states.SUCCESS, request=r.context)
                if r.context.chord:
                    backend.on_chord_part_return(r.context, states.SUCCESS, r.reply)
            else:
                backend.mark_as_failure(
                    r.context.id,
                    r.error,
                    r.traceback,
                    request=r.context,
                    store_result=r.index in by_backend,
                )
        except Exception as e:  # one chord's trouble must not fail the batch's other requests
            log.error("chord or errback of %s failed: %s", r.context.id, e, exc_info=True)


def _stores(task: Any, r: _Request) -> bool:
    """Whether Celery would store this request's result (``ignore_result``; errors stored unless told)."""
    ignore = r.context.get("ignore_result")
    if ignore is None:
        ignore = task.ignore_result
    return not ignore or (r.error is not None and task.store_errors_even_if_ignored)


def _finish(task: Any, r: _Request, runtime_s: float, events: bool) -> Outcome:
    """Fire the request's signals and log its failure; its outcome for the main process."""
    outcome: Outcome
    retval: Any
    if r.error is None:
        _signal(task, r, signals.task_success, result=r.reply)
        retval, state = r.reply, states.SUCCESS
        # What Flower shows as the result: shapes and sizes, never tensor bytes.
        outcome = (0, display(r.reply) if events else None, runtime_s)
    else:
        exc = r.error
        if isinstance(exc, RequestError):
            log.info(
                "Task %s[%s] raised expected: %s: %s",
                task.name,
                r.context.id,
                type(exc).__name__,
                exc,
            )
        else:
            log.error("Task %s[%s] raised unexpected: %s", task.name, r.context.id, r.traceback)
        einfo = _einfo(exc)
        _signal(
            task,
            r,
            signals.task_failure,
            task_id=r.context.id,
            exception=exc,
            traceback=exc.__traceback__,
            einfo=einfo,
        )
        retval, state = exc, states.FAILURE
        outcome = (1, einfo, runtime_s)
    _signal(
        task, r, signals.task_postrun, task_id=r.context.id, task=task, retval=retval, state=state
    )
    return outcome


def _signal(sender: Any, r: _Request, signal: Any, /, **fields: Any) -> None:
    """Send ``signal`` for one request with its context pushed (``sender.request`` is that request)."""
    if not signal.receivers:
        return
    sender.request_stack.push(r.context)  # as Celery's trace does for one task
    try:
        signal.send(sender=sender, args=r.args, kwargs=r.kwargs, **fields)
    except Exception as e:
        log.error("a %s handler failed for %s: %s", signal.name, r.context.id, e)
    finally:
        sender.request_stack.pop()


def _einfo(exc: BaseException) -> ExceptionInfo:
    """``exc`` as the ExceptionInfo Celery's trace returns (pickleable, for the pool's pipe)."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo(sys.exc_info())
    einfo.exception = get_pickleable_exception(einfo.exception)
    return einfo
