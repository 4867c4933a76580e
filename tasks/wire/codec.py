"""Tensors on the wire: ``{"dtype": str, "shape": [int, ...], "data": ...}``.

``data`` is raw bytes under msgpack and base64 text under json (kombu's json
has no bytes type).  Plain nested lists of numbers are accepted on input too,
so a producer in any language can call the task.  Decoding checks sizes
before allocating, and every failure is a typed :mod:`models.errors` error.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import numpy as np

from models.errors import MalformedPayload, NonNumericInput, echo
from models.validation import check_size

__all__ = [
    "NO_LIMIT",
    "WIRE_DTYPES",
    "decode",
    "display",
    "encode",
    "estimated_nbytes",
    "is_envelope",
    "redact_bytes",
    "refuse_oversized",
    "refuse_text_content",
    "to_array",
]

WIRE_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8"}
)
# The size limit for decoding what our own workers return: the input limit does not apply.
NO_LIMIT = 1 << 62
MAX_NESTING = 32  # list nesting probed for a size estimate (numpy 1.x allowed 32 dimensions)
_KEYS = {"dtype", "shape", "data"}
# A bytes literal in a repr, possibly cut short by a length limit.
_BYTES_REPR = re.compile(r"""(?<![\w'"])(?:b'(?:[^'\\]|\\.)*(?:'|$)|b"(?:[^"\\]|\\.)*(?:"|$))""")


def is_envelope(value: Any) -> bool:
    """Whether ``value`` has the shape of a tensor envelope: exactly ``{dtype, shape, data}``."""
    return isinstance(value, dict) and set(value) == _KEYS


def to_array(value: Any) -> np.ndarray | None:
    """Return ``value`` as a numpy array if it is one already or a torch tensor, else None."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__ == "torch" and hasattr(value, "numpy"):
        return np.asarray(value.detach().cpu().numpy())
    return None


def encode(array: np.ndarray, binary: bool) -> dict[str, Any]:
    """Envelope for ``array``: raw bytes when ``binary`` (msgpack), else base64 (json)."""
    array = np.ascontiguousarray(array)
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": raw if binary else base64.b64encode(raw).decode("ascii"),
    }


def decode(payload: Any, max_bytes: int) -> np.ndarray:
    """Turn an envelope or a numeric (nested) list into an array, refusing bad input early."""
    if isinstance(payload, dict):
        return _decode_envelope(payload, max_bytes)
    if isinstance(payload, list | tuple | int | float):
        refuse_oversized(payload, max_bytes)
        try:
            array = np.asarray(payload)
        except (ValueError, TypeError) as e:
            raise MalformedPayload(
                f"input list is ragged or mixed ({e}): every sample must have the same shape"
            ) from e
        if array.dtype.kind not in "iuf":
            raise NonNumericInput(
                f"input list holds {array.dtype.name!r} values, not numbers: send ints or floats only"
            )
        return array
    raise MalformedPayload(
        f"input of type {type(payload).__name__} is not a tensor: send a numpy array or torch "
        "tensor through infer.apply_async, an envelope {dtype, shape, data}, or a list of numbers"
    )


def estimated_nbytes(payload: Any) -> int | None:
    """About how many bytes ``payload`` decodes to, read from its lengths alone; None if unknown.

    An envelope: its shape times its dtype's size.  A nested list: the lengths
    along its first elements, 8 bytes a number (numpy makes Python numbers
    float64 or int64).  Nothing is converted, so a 9-million-entry list is
    refused in microseconds, not seconds.
    """
    if isinstance(payload, dict):
        shape, dtype = payload.get("shape"), payload.get("dtype")
        if (
            isinstance(shape, list | tuple)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(dtype, str)
            and dtype in WIRE_DTYPES
        ):
            return math.prod(shape) * np.dtype(dtype).itemsize
        return None
    count, level = 1, payload
    for _ in range(MAX_NESTING):
        if not isinstance(level, list | tuple):
            return count * 8
        count *= len(level)
        if not level:
            return 0
        level = level[0]
    return None


def refuse_oversized(payload: Any, max_bytes: int) -> None:
    """Raise :class:`PayloadTooLarge` if ``payload`` is estimated over ``max_bytes`` (in bytes)."""
    nbytes = estimated_nbytes(payload)
    if nbytes is not None:
        check_size(nbytes, max_bytes, estimated=True)


def _decode_envelope(payload: dict[str, Any], max_bytes: int) -> np.ndarray:
    if set(payload) != _KEYS:
        raise MalformedPayload(
            "tensor envelope must have exactly the keys dtype, shape, data; "
            f"got {echo(sorted(map(str, payload)))}"
        )
    dtype_name, shape, data = payload["dtype"], payload["shape"], payload["data"]
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        if isinstance(dtype_name, str) and dtype_name in ("str", "object", "bool", "bytes"):
            raise NonNumericInput(f"envelope dtype {dtype_name!r} is not numeric: send numbers")
        raise MalformedPayload(
            f"envelope dtype {echo(dtype_name)} is not one of {', '.join(sorted(WIRE_DTYPES))}"
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise MalformedPayload(
            f"envelope shape {echo(shape)} must be a list of non-negative integers"
        )
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    check_size(expected, max_bytes)
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MalformedPayload(f"envelope data is not valid base64: {e}") from e
    elif isinstance(data, list):
        try:
            return np.asarray(data, dtype=dtype).reshape(shape)
        except (ValueError, TypeError) as e:
            raise MalformedPayload(
                f"envelope data list does not fit shape {list(shape)}: {e}"
            ) from e
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPayload(
            f"envelope data of type {type(data).__name__} is not bytes, base64 or a list"
        )
    if len(data) != expected:
        raise MalformedPayload(
            f"envelope data has {len(data)} bytes but shape {list(shape)} of {dtype_name} needs {expected}"
        )
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape).astype(dtype_name, copy=False)


def display(value: Any, depth: int = 0) -> str:
    """A short, safe text for ``value`` where Flower, events and logs show task arguments.

    An envelope becomes ``<tensor float32[4, 3, 32, 32] 48.0 KiB>`` instead of
    a dump of its bytes, long lists become their length, bytes and long
    strings are cut; lists and dicts are shown two levels deep.
    """
    if is_envelope(value):
        shape = value.get("shape")
        dims = ", ".join(str(d) for d in shape) if isinstance(shape, list | tuple) else "?"
        data = value.get("data")
        size = len(data) if isinstance(data, bytes | bytearray | str) else 0
        amount = f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB"
        return f"<tensor {value.get('dtype')}[{dims}] {amount}>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return repr(value if len(value) <= 64 else value[:64] + "...")
    if isinstance(value, list | tuple):
        if len(value) > 8 or depth >= 2:
            return f"<list of {len(value)}>"
        return "[" + ", ".join(display(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        if len(value) > 16 or depth >= 2:
            return f"<dict of {len(value)}>"
        return "{" + ", ".join(f"{k!r}: {display(v, depth + 1)}" for k, v in value.items()) + "}"
    return repr(value)[:64]


def redact_bytes(text: str) -> str:
    """``text`` (a repr) with every bytes literal replaced by ``<bytes>``: no tensor dumps."""
    return _BYTES_REPR.sub("<bytes>", text)


TEXT_CONTENT = "application/text"


def refuse_text_content() -> None:
    """Make kombu refuse ``application/text`` message bodies in this process.

    kombu accepts that content type whatever ``accept_content`` says and hands
    the body on as a plain string; a task message sent that way stops a Celery
    worker (``ValueError`` unpacking the body, an unrecoverable error).  Celery
    itself never sends it.  Refused, it becomes a decode error, which the
    worker's consumer dead-letters.
    """
    from kombu.serialization import registry

    registry.register("refused-text", None, _refuse_text, content_type=TEXT_CONTENT)


def _refuse_text(body: Any) -> Any:
    raise MalformedPayload(
        f"{TEXT_CONTENT} messages are refused: publish tasks as msgpack or json "
        "with Celery's message protocol"
    )
