"""The inference task: decode -> check -> models -> encode.  Thin on purpose.

``infer(model, inputs, dtype=None)`` takes one sample or a batch (a string or
a list of strings for a text model); ``model`` is a name (its default version)
or ``name@version``.  It returns::

    {"model": "cnn", "version": 1, "outputs": {dtype, shape, data}, "batch_size": 4,
     "forward_batch": 4,
     "worker": "cpu0@host", "device": "cpu", "dtype": "fp32",
     "timing": {"queue_wait_ms": .., "batch_wait_ms": .., "compute_ms": .., "service_ms": ..,
                "total_ms": ..}}

``queue_wait_ms`` and ``total_ms`` are None (unknown) when the producer did not
stamp its send time (``infer_sent_at``: every client of this project's app
does; a plain Celery client does not).

With dynamic batching on (``INFER_BATCHING``), a request may share its
forward pass with others (:mod:`tasks.worker.strategy`): ``forward_batch``
says how many samples that pass had, and ``compute_ms`` is that whole pass.

``infer.map(model, samples, dtype=None, **options)`` sends one request per
sample with pipelined publisher confirms (:mod:`tasks.client.publish`) and
returns a :class:`~tasks.client.publish.MapResult` whose ``get()`` is the
replies in input order.

Bad requests raise a :class:`models.errors.RequestError` subclass; Celery
records it as the task's failure (no retry: retrying cannot help) and the
worker carries on with the next message.
"""

from __future__ import annotations

import time
from typing import Any

from celery.utils import uuid

from models.errors import BadArguments, RequestError
from models.text import check_text
from models.validation import check_input
from tasks.app import SENT_AT_HEADER, app, display_call
from tasks.client.publish import DEFAULT_WINDOW, MapResult, publish_many
from tasks.wire import blobs
from tasks.wire.codec import encode, to_array
from tasks.wire.deadline import check as check_deadline
from tasks.wire.deadline import of_request
from tasks.wire.request import as_array, check_dtype, infer_call
from tasks.worker.dedup import IdempotentTask

__all__ = ["InferenceTask", "infer"]


class InferenceTask(IdempotentTask):
    """Base for inference tasks: checks and encodes inputs in the caller before publishing.

    ``infer.apply_async(("cnn", array))`` accepts a numpy array or a torch
    tensor and sends it as an envelope; an unknown model, a wrong shape or
    dtype, NaN/inf or an oversized payload raises here, before anything
    reaches the broker.  ``app.send_task("tasks.infer", ...)`` skips these
    client checks; the worker then raises the same errors.
    """

    # With INFER_BATCHING on a prefork worker, the consumer batches requests (tasks.worker.strategy).
    Strategy = "tasks.worker.strategy:batching"
    # Wrong arguments raise BadArguments (tasks.wire.request.infer_call) on every
    # path, before Celery's own signature check could raise a bare TypeError.
    typing = False
    # Expected, caller-caused failures: stored as the task failure, logged
    # without a traceback, never retried.
    throws = (RequestError,)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        serializer = options.get("serializer") or app.infer_settings.serializer
        writer = blobs.writer_for(app)  # None: claim checks off
        args, kwargs = prepare_request(args, kwargs, serializer, writer)
        if writer is not None:
            writer.write()  # the blob is in Redis before its reference is published
        return super().apply_async(args, kwargs, **_shown(args, kwargs, options))

    def map(  # replaces Celery's Task.map (an xmap signature of celery.map)
        self,
        model: str,
        samples: Any,
        dtype: str | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        confirm_timeout: float = 30.0,
        **options: Any,
    ) -> MapResult:
        """One ``infer`` request per sample, published pipelined; returns once all are confirmed.

        ``samples`` is a sequence of samples, or an array or tensor whose first
        axis indexes them.  Each message is the one ``apply_async((model,
        sample), **options)`` (``(model, sample, dtype)`` with a dtype) would
        publish.  Every sample is checked first: a bad one raises its typed
        error naming its index, with nothing published.  Nacked or
        unconfirmed messages raise :class:`~models.errors.PublishFailed`
        naming their task ids.  ``window`` bounds the unconfirmed messages,
        ``confirm_timeout`` each wait for confirms (seconds).
        """
        if isinstance(samples, str | bytes | dict) or not hasattr(samples, "__len__"):
            raise BadArguments(
                f"infer.map takes a sequence of samples (or an array whose first axis indexes them), "
                f"got {type(samples).__name__}: use infer.apply_async for one sample or one batch"
            )
        if len(samples) == 0:
            raise RequestError("infer.map needs at least one sample")
        serializer = options.get("serializer") or app.infer_settings.serializer
        writer = blobs.writer_for(app)  # None: claim checks off
        calls = []
        for index in range(len(samples)):  # check every sample before publishing any
            try:
                call = (model, samples[index]) if dtype is None else (model, samples[index], dtype)
                calls.append(prepare_request(call, None, serializer, writer))
            except RequestError as e:
                raise type(e)(f"samples[{index}]: {e}") from e
        if "task_id" in options:
            raise BadArguments("infer.map gives each request its own task id: do not pass task_id")
        if writer is not None:
            writer.write()  # every blob in one pipeline, before any reference is published
        ids = [uuid() for _ in calls]
        apply_async = super().apply_async  # Celery's own: routing, message, signals

        def send_all(producer: Any) -> list[Any]:
            return [
                apply_async(
                    args,
                    kwargs,
                    task_id=i,
                    producer=producer,
                    retry=False,
                    **_shown(args, kwargs, options),
                )
                for i, (args, kwargs) in zip(ids, calls, strict=True)
            ]

        results, timing = publish_many(
            app, send_all, ids, window=window, confirm_timeout=confirm_timeout
        )
        return MapResult(results, timing, app=app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # In the worker (and a direct call): a send_task of any shape reaches here, never a
        # TypeError from Python's own argument binding.  The message's own args, not the
        # splatted ones: Celery unpacks a string sent as args into its characters.
        request = self.request
        sent = request.args if not request.called_directly else args
        infer_call(sent if sent is not None else args, kwargs)
        return super().__call__(*args, **kwargs)

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # A claim-checked input's blob goes once the outcome is stored: Celery's tracer
        # (celery/app/trace.py) calls after_return after mark_as_done or mark_as_failure, and
        # not for RETRY, IGNORED (a duplicate) or REJECTED, nor when the worker died mid-task
        # (then the redelivery still needs the blob).
        blobs.release(self.app, infer_call(args, kwargs, strict=False).inputs)
        super().after_return(status, retval, task_id, args, kwargs, einfo)


def _shown(args: Any, kwargs: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the call's display (Celery then skips its ``saferepr`` of the tensors)."""
    if "argsrepr" in options and "kwargsrepr" in options:
        return options
    argsrepr, kwargsrepr = display_call(args, kwargs)
    return {"argsrepr": argsrepr, "kwargsrepr": kwargsrepr, **options}


def prepare_request(
    args: Any, kwargs: Any, serializer: str = "msgpack", writer: blobs.BlobWriter | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Validate an ``infer`` call and encode array inputs; return the (args, kwargs) to publish.

    Arrays travel as raw bytes under msgpack and as base64 under json.  With a
    ``writer``, an input over its threshold (``INFER_CLAIM_CHECK_BYTES``, raw
    bytes) is added to it and travels as its reference: the caller writes the
    blobs before publishing.  A reference given as input passes unchecked (the
    worker checks what it points to).
    """
    model, inputs, dtype = infer_call(args, kwargs)
    args, kwargs = list(args or ()), dict(kwargs or {})
    spec = app.route.spec(model)  # local sources, else what live workers advertise
    check_dtype(dtype)
    if blobs.is_reference(inputs):
        return args, kwargs
    limit = app.infer_settings.max_payload_bytes
    if spec.text is not None:  # strings travel as they are; the worker tokenizes
        check_text(spec, inputs, limit)
        return args, kwargs
    native = to_array(inputs)  # a numpy array or a torch tensor, else None
    array = as_array(inputs if native is None else native, limit)
    check_input(spec, array, limit)
    if writer is not None and writer.wants(array.nbytes):
        inputs = writer.add(array)
    elif native is not None:
        inputs = encode(native, binary=serializer == "msgpack")
    if len(args) > 1:
        args[1] = inputs
    else:
        kwargs["inputs"] = inputs
    return args, kwargs


@app.task(bind=True, base=InferenceTask, name="tasks.infer")
def infer(self: InferenceTask, model: str, inputs: Any, dtype: str | None = None) -> dict[str, Any]:
    """Run ``model`` on ``inputs`` (one sample or a batch) on this worker's device.

    This body serves a request alone; a batching worker serves most requests
    through :func:`tasks.worker.batch_job.run_batch` instead, with the same
    checks and the same reply.
    """
    from models.runner import resolve_dtype
    from tasks.worker.batch_job import reply
    from tasks.worker.runtime import get_runtime

    started = time.time()
    settings = app.infer_settings
    runtime = get_runtime()
    spec = runtime.catalog.resolve(model)  # this worker's own sources
    check_dtype(dtype)
    inputs = blobs.resolve(app, inputs, settings.max_payload_bytes)  # a reference: its blob's array
    precision = resolve_dtype(dtype, spec, runtime.device)
    batch = runtime.checked_batch(spec, precision, inputs)
    # Just before the forward pass: past its deadline, it is never computed (DeadlineExceeded).
    check_deadline(of_request(self.request, started), time.time(), "its forward pass")
    outputs, compute_ms = runtime.forward_batch(runtime.group_key(spec, precision, batch), batch)
    return reply(
        spec,
        outputs,
        batch_size=len(batch),
        forward_batch=len(batch),
        worker=self.request.hostname,
        device=str(runtime.device),
        precision=precision,
        sent_at=getattr(self.request, SENT_AT_HEADER, None),
        started=started,
        finished=time.time(),
        batch_wait_ms=0.0,
        compute_ms=compute_ms,
    )
