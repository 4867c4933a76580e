"""What an ``infer`` request is on the wire: its arguments, and its inputs decoded and checked.

``tasks.infer(model, inputs, dtype=None)`` may be called positionally or by
keyword from any producer; :func:`infer_call` reads the three arguments the
one way every reader (the task, the router, the metrics) needs them.
:func:`checked_inputs` turns inputs (an array, a tensor, an envelope or a
nested list) into a batch checked against the model's spec, the same way in
the caller and in the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from models.registry import ModelSpec
from models.validation import check_input
from tasks.wire.codec import decode, to_array

__all__ = ["InferCall", "as_array", "checked_inputs", "infer_call"]


class InferCall(NamedTuple):
    """The arguments of one ``tasks.infer`` call."""

    model: Any
    inputs: Any
    dtype: Any


def infer_call(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> InferCall:
    """``(model, inputs, dtype)`` of an ``infer`` call, each None where not given."""
    args, kwargs = args or (), kwargs or {}

    def arg(index: int, name: str) -> Any:
        return args[index] if len(args) > index else kwargs.get(name)

    return InferCall(arg(0, "model"), arg(1, "inputs"), arg(2, "dtype"))


def as_array(inputs: Any, max_bytes: int) -> np.ndarray:
    """``inputs`` (an array, a torch tensor, an envelope or a nested list) as a numpy array."""
    array = to_array(inputs)
    return decode(inputs, max_bytes) if array is None else array


def checked_inputs(spec: ModelSpec, inputs: Any, max_bytes: int) -> np.ndarray:
    """``inputs`` as a batch for ``spec``, refused with a typed error if it does not fit."""
    return check_input(spec, as_array(inputs, max_bytes), max_bytes)
