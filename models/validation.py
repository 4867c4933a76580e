"""Check a decoded input array against a model's spec (numpy only, no torch).

Runs twice on purpose: in the client before publishing (so a bad request is
refused before it costs a broker round trip) and in the worker (so a message
sent with ``send_task`` or by a foreign producer gets the same typed error).
"""

from __future__ import annotations

import numpy as np

from models.errors import (
    DtypeMismatch,
    NonFiniteInput,
    NonNumericInput,
    NonTextInput,
    PayloadTooLarge,
    ShapeMismatch,
    ValueOutOfRange,
)
from models.spec import FLOAT_DTYPES, ModelSpec

__all__ = ["check_input", "check_size"]


def check_size(nbytes: int, limit: int, estimated: bool = False) -> None:
    """Refuse payloads over ``limit`` bytes with advice on what to do instead.

    ``estimated``: ``nbytes`` is a size estimate (read from lengths, nothing converted).
    """
    if nbytes > limit:
        about = "about " if estimated else ""
        raise PayloadTooLarge(
            f"input is {about}{nbytes} bytes, over the {limit}-byte limit (INFER_MAX_PAYLOAD_BYTES): "
            "split it into smaller batches, or put it in shared storage and pass a reference"
        )


def check_input(spec: ModelSpec, array: np.ndarray, max_bytes: int) -> np.ndarray:
    """Validate ``array`` for ``spec`` and return it as a batch ``(N, *sample_shape)``.

    The returned array has the model's input dtype.  Raises a subclass of
    :class:`~models.errors.InvalidInput` or :class:`PayloadTooLarge`.
    """
    check_size(int(array.nbytes), max_bytes)
    if spec.text is not None:
        raise NonTextInput(
            f"model {spec.name!r} takes text: send a string or a list of strings, not an array"
        )
    kind = array.dtype.kind
    if kind not in "iuf":
        raise NonNumericInput(
            f"model {spec.name!r} needs numbers, got dtype {array.dtype.name!r}: "
            "send a numeric array or a list of numbers"
        )
    dtype_name = array.dtype.name
    if dtype_name not in spec.accepted_dtypes:
        raise DtypeMismatch(
            f"model {spec.name!r} takes {spec.input_dtype} input "
            f"(accepted: {', '.join(spec.accepted_dtypes)}), got {dtype_name}: "
            f"convert it, e.g. array.astype('{spec.input_dtype}')"
        )
    sample = spec.sample_shape
    if _fits(array.shape, sample):
        batch = array.reshape((1, *array.shape))
    elif array.ndim == len(sample) + 1 and _fits(array.shape[1:], sample) and array.shape[0] > 0:
        batch = array
    else:
        shown = ", ".join("any" if d == -1 else str(d) for d in sample)
        raise ShapeMismatch(
            f"model {spec.name!r} takes one sample of shape [{shown}] or a batch "
            f"[N, {shown}], got shape {list(array.shape)}"
        )
    if kind == "f" and not bool(np.isfinite(batch).all()):
        raise NonFiniteInput(
            f"model {spec.name!r} refuses NaN and infinity; "
            f"{int((~np.isfinite(batch)).sum())} value(s) are not finite: clean or impute them first"
        )
    if spec.value_range is not None:
        low, high = spec.value_range
        if batch.size and (int(batch.min()) < low or int(batch.max()) >= high):
            raise ValueOutOfRange(
                f"model {spec.name!r} takes integers in [{low}, {high}), "
                f"got values in [{int(batch.min())}, {int(batch.max())}]"
            )
    return batch.astype(_served_dtype(spec, dtype_name), copy=False)


def _fits(shape: tuple[int, ...], sample: tuple[int, ...]) -> bool:
    """Whether ``shape`` is one sample of ``sample`` (-1: any positive size on that axis)."""
    return len(shape) == len(sample) and all(
        want == got or (want == -1 and got > 0) for got, want in zip(shape, sample, strict=True)
    )


def _served_dtype(spec: ModelSpec, dtype: str) -> str:
    """The dtype the model gets: a native one as it is, else the native dtype of its kind."""
    served = spec.served_dtypes
    if dtype in served:
        return dtype
    same_kind = [d for d in served if (d in FLOAT_DTYPES) == (dtype in FLOAT_DTYPES)]
    return same_kind[0] if same_kind else spec.input_dtype
