"""What an ``infer`` request is on the wire: its arguments, and its inputs decoded and checked.

``tasks.infer(model, inputs, dtype=None)`` may be called positionally or by
keyword from any producer; :func:`infer_call` reads the three arguments the
one way every reader (the task, the router, the metrics) needs them, and
refuses any other call shape with :class:`~models.errors.BadArguments`, the
same in the caller (``apply_async``, the router under ``send_task``) and in
the worker.  :func:`check_dtype` does the same for the precision name.
:func:`checked_inputs` turns inputs (an array, a tensor, an envelope or a
nested list) into a batch checked against the model's spec, the same way in
the caller and in the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from models.errors import BadArguments, echo, unknown_dtype
from models.spec import ModelSpec
from models.validation import check_input
from tasks.wire.codec import decode, to_array

__all__ = [
    "COMPUTE_DTYPES",
    "PARAMETERS",
    "InferCall",
    "as_array",
    "check_dtype",
    "checked_inputs",
    "infer_call",
]

PARAMETERS = ("model", "inputs", "dtype")
SIGNATURE = "tasks.infer takes (model, inputs, dtype=None)"
COMPUTE_DTYPES = (None, "auto", "fp32", "fp16", "bf16")


class InferCall(NamedTuple):
    """The arguments of one ``tasks.infer`` call."""

    model: Any
    inputs: Any
    dtype: Any


def infer_call(args: Any, kwargs: Any, *, strict: bool = True) -> InferCall:
    """``(model, inputs, dtype)`` of an ``infer`` call.

    ``strict`` (the default) raises :class:`BadArguments` for any call Python
    would refuse with a ``TypeError``: args that are not a list, kwargs that
    are not a mapping, more than three positional arguments, an unknown or
    duplicated keyword, a missing ``model`` or ``inputs``.  ``strict=False``
    reads what is there, None where not given (for observers such as metrics).
    """
    if not strict:
        args = args if isinstance(args, Sequence) and not isinstance(args, str | bytes) else ()
        kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    else:
        args, kwargs = _checked_shape(args, kwargs)

    def arg(index: int, name: str) -> Any:
        return args[index] if len(args) > index else kwargs.get(name)

    return InferCall(arg(0, "model"), arg(1, "inputs"), arg(2, "dtype"))


def _checked_shape(args: Any, kwargs: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, list | tuple):
        raise BadArguments(
            f"{SIGNATURE}: args must be a list, got {type(args).__name__} {echo(args)}: "
            'send args=["cnn", inputs]'
        )
    if not isinstance(kwargs, Mapping):
        raise BadArguments(
            f"{SIGNATURE}: kwargs must be a mapping, got {type(kwargs).__name__} {echo(kwargs)}"
        )
    if len(args) > len(PARAMETERS):
        raise BadArguments(
            f"{SIGNATURE}: got {len(args)} positional arguments, at most {len(PARAMETERS)}: "
            "send one model, one inputs (a sample or a batch) and optionally a dtype"
        )
    unknown = [k for k in kwargs if k not in PARAMETERS]
    if unknown:
        raise BadArguments(
            f"{SIGNATURE}: unknown keyword argument(s) {echo(sorted(map(str, unknown)))}; "
            f"the keywords are {', '.join(PARAMETERS)} (requirements go in headers={{'requires': ...}})"
        )
    twice = [name for name in PARAMETERS[: len(args)] if name in kwargs]
    if twice:
        raise BadArguments(
            f"{SIGNATURE}: {', '.join(twice)} given both positionally and by keyword: give each once"
        )
    missing = [n for i, n in enumerate(PARAMETERS[:2]) if i >= len(args) and n not in kwargs]
    if missing:
        raise BadArguments(
            f"{SIGNATURE}: missing {' and '.join(missing)}: e.g. args=['cnn', inputs], "
            "inputs one sample or a batch (python -m models list shows the shapes)"
        )
    return args, kwargs


def check_dtype(dtype: object) -> None:
    """Refuse a compute precision that is not fp32, fp16, bf16, auto or None."""
    if not isinstance(dtype, str | None) or dtype not in COMPUTE_DTYPES:
        raise unknown_dtype(dtype)


def as_array(inputs: Any, max_bytes: int) -> np.ndarray:
    """``inputs`` (an array, a torch tensor, an envelope or a nested list) as a numpy array."""
    array = to_array(inputs)
    return decode(inputs, max_bytes) if array is None else array


def checked_inputs(spec: ModelSpec, inputs: Any, max_bytes: int) -> np.ndarray:
    """``inputs`` as a batch for ``spec``, refused with a typed error if it does not fit."""
    return check_input(spec, as_array(inputs, max_bytes), max_bytes)
