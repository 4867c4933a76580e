"""Client-side batching with Celery's canvas: ``infer_many`` = chunks -> group -> chord.

``infer_many("cnn", images, batch_size=64)`` splits the inputs into chunks of
``batch_size`` samples, sends one ``tasks.infer`` per chunk (a ``group``, each
routed by the capability router), and joins them with a ``chord`` whose body,
``tasks.gather``, concatenates the outputs in the original order on a worker.
The chunks are published with pipelined confirms (:mod:`tasks.client.publish`):
all are sent, then their confirms collected together, and ``infer_many``
returns once every chunk is confirmed (else :class:`PublishFailed` names them).
Every chunk is checked before anything is published, so a bad input raises
its typed error (naming the index range) with nothing sent.  A chunk over
``INFER_CLAIM_CHECK_BYTES`` goes by reference (:mod:`tasks.wire.blobs`): its
blob is written to Redis, every chunk's in one pipeline, before publishing.

If a chunk fails on a worker, the chord body does not run (Celery's chord
semantics) and :meth:`ManyResult.get` raises :class:`ChunkFailed` naming the
chunk's index range and the cause.  The other chunks still ran:
:meth:`ManyResult.partial` returns their outputs by index range, so a caller
can retry just the failed range.

Stock Celery does the same without this helper (see docs/batching.md)::

    from celery import chord
    sigs = [infer.s("cnn", images[i:i + 64]) for i in range(0, len(images), 64)]
    result = chord(sigs)(gather.s())
"""

from __future__ import annotations

from typing import Any

import numpy as np
from celery import Signature, group
from celery.result import AsyncResult, GroupResult
from celery.utils import uuid

from models.errors import ChunkFailed, RequestError
from models.text import check_text
from models.validation import check_input
from tasks.app import app
from tasks.client.publish import publish_many
from tasks.client.results import outputs
from tasks.inference import infer
from tasks.wire import blobs
from tasks.wire.codec import NO_LIMIT, decode, encode
from tasks.wire.request import as_array

__all__ = ["ManyResult", "gather", "infer_many", "publish_chord"]


@app.task(name="tasks.gather")
def gather(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Chord body: concatenate chunk results (already in header order) into one result."""
    arrays = [outputs(r) for r in results]
    binary = app.infer_settings.binary_tensors
    return {
        "model": results[0]["model"] if results else None,
        "outputs": encode(
            np.concatenate(arrays) if arrays else np.zeros((0,), np.float32), binary=binary
        ),
        "batch_size": int(sum(len(a) for a in arrays)),
        "chunks": len(results),
        "workers": sorted({r["worker"] for r in results}),
        "compute_ms": sum(r["timing"]["compute_ms"] for r in results),
    }


class ManyResult:
    """The pending result of :func:`infer_many`."""

    def __init__(
        self, body: AsyncResult, header: GroupResult, ranges: list[tuple[int, int]]
    ) -> None:
        self.body = body
        self.header = header
        self.ranges = ranges

    @property
    def id(self) -> str:
        return str(self.body.id)

    def get(self, timeout: float | None = 300.0) -> np.ndarray:
        """All outputs, in input order; :class:`ChunkFailed` if a chunk failed."""
        try:
            reply = self.body.get(timeout=timeout, interval=0.01)
        except Exception as e:
            for (lo, hi), child in zip(self.ranges, self.header.results, strict=True):
                if child.failed():
                    cause = child.result
                    raise ChunkFailed(
                        f"inputs [{lo}:{hi}] failed: {type(cause).__name__}: {cause}; the other chunks "
                        "succeeded (ManyResult.partial() has them): fix or drop that range and retry it"
                    ) from e
            raise
        return decode(reply["outputs"], NO_LIMIT)

    def partial(self, timeout: float | None = 300.0) -> dict[tuple[int, int], np.ndarray]:
        """Outputs of the chunks that succeeded, by input index range (waits for all to finish)."""
        self.header.join(timeout=timeout, propagate=False, interval=0.01)
        return {
            span: outputs(child.result)
            for span, child in zip(self.ranges, self.header.results, strict=True)
            if child.successful()
        }


def infer_many(
    model: str, inputs: Any, batch_size: int = 64, dtype: str | None = None, **options: Any
) -> ManyResult:
    """Run ``model`` over many inputs in chunks of ``batch_size``; see the module docstring."""
    if batch_size < 1:
        raise RequestError(f"batch_size must be >= 1, got {batch_size}")
    spec = app.route.spec(model)  # local sources, else what live workers advertise
    limit = app.infer_settings.max_payload_bytes
    if spec.text is not None:  # a list of strings, chunked: each chunk is checked like a request
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        text_ranges = [
            (lo, min(lo + batch_size, len(texts))) for lo in range(0, len(texts), batch_size)
        ]
        if not text_ranges:
            raise RequestError("infer_many needs at least one input")
        for lo, hi in text_ranges:
            try:
                check_text(spec, texts[lo:hi], limit)
            except RequestError as e:
                raise type(e)(f"inputs [{lo}:{hi}]: {e}") from e
        header = [infer.s(model, texts[lo:hi], dtype).set(**options) for lo, hi in text_ranges]
        return publish_chord(header, text_ranges)
    array = as_array(inputs, NO_LIMIT)
    if array.ndim == len(spec.sample_shape):
        array = array[None]
    ranges = [(lo, min(lo + batch_size, len(array))) for lo in range(0, len(array), batch_size)]
    if not ranges:
        raise RequestError("infer_many needs at least one input")
    for lo, hi in ranges:  # check everything before publishing anything
        try:
            check_input(spec, array[lo:hi], limit)
        except RequestError as e:
            raise type(e)(f"inputs [{lo}:{hi}]: {e}") from e
    writer = blobs.writer_for(app)  # None: claim checks off
    chunks: list[Any] = [array[lo:hi] for lo, hi in ranges]
    if writer is not None:
        # A chunk over INFER_CLAIM_CHECK_BYTES travels as a reference: all blobs in one pipeline.
        chunks = [writer.add(c) if writer.wants(c.nbytes) else c for c in chunks]
        writer.write()
    return publish_chord([infer.s(model, c, dtype).set(**options) for c in chunks], ranges)


def publish_chord(header: list[Signature], ranges: list[tuple[int, int]]) -> ManyResult:
    """``chord(header)(gather.s())``, its header published with pipelined confirms.

    The steps of Celery's ``chord.run`` for a flat header: freeze the body and
    the header (each header task carries the body), ``backend.apply_chord``,
    then ``group.apply_async`` given the pipelined producer
    (``chord.apply_async`` takes no producer to pass on).
    """
    group_id = uuid()
    body = gather.s()
    body_result = body.freeze(uuid(), group_id=group_id)
    tasks = group(header, app=app, task_id=group_id)
    frozen = tasks.freeze(group_id=group_id, chord=body)
    app.backend.apply_chord((frozen.id, frozen.results), body)

    def send_all(producer: Any) -> GroupResult:
        return tasks.apply_async(producer=producer, task_id=group_id, retry=False)

    header_result, _ = publish_many(app, send_all, [str(r.id) for r in frozen.results])
    body_result.parent = header_result
    return ManyResult(body_result, header_result, ranges)
