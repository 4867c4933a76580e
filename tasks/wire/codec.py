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

from models.errors import MalformedPayload, NonNumericInput, PayloadTooLarge

__all__ = [
    "NO_LIMIT",
    "WIRE_DTYPES",
    "decode",
    "display",
    "encode",
    "redact_bytes",
    "refuse_text_content",
    "to_array",
]

WIRE_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8"}
)
# The size limit for decoding what our own workers return: the input limit does not apply.
NO_LIMIT = 1 << 62
_KEYS = {"dtype", "shape", "data"}
# A bytes literal in a repr, possibly cut short by a length limit.
_BYTES_REPR = re.compile(r"""(?<![\w'"])(?:b'(?:[^'\\]|\\.)*(?:'|$)|b"(?:[^"\\]|\\.)*(?:"|$))""")


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
        if isinstance(payload, list | tuple) and len(payload) > max_bytes:
            raise PayloadTooLarge(
                f"input list has {len(payload)} entries, more than the {max_bytes}-byte limit allows: "
                "send smaller batches or a reference to shared storage"
            )
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


def _decode_envelope(payload: dict[str, Any], max_bytes: int) -> np.ndarray:
    if set(payload) != _KEYS:
        raise MalformedPayload(
            f"tensor envelope must have exactly the keys dtype, shape, data; got {sorted(payload)}"
        )
    dtype_name, shape, data = payload["dtype"], payload["shape"], payload["data"]
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        if isinstance(dtype_name, str) and dtype_name in ("str", "object", "bool", "bytes"):
            raise NonNumericInput(f"envelope dtype {dtype_name!r} is not numeric: send numbers")
        raise MalformedPayload(
            f"envelope dtype {dtype_name!r} is not one of {', '.join(sorted(WIRE_DTYPES))}"
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise MalformedPayload(f"envelope shape {shape!r} must be a list of non-negative integers")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise PayloadTooLarge(
            f"input is {expected} bytes, over the {max_bytes}-byte limit (INFER_MAX_PAYLOAD_BYTES): "
            "split it into smaller batches, or put it in shared storage and pass a reference"
        )
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
    if isinstance(value, dict) and set(value) == _KEYS:
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
