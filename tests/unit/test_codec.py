from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from models.errors import MalformedPayload, NonNumericInput, PayloadTooLarge
from tasks.wire.codec import decode, display, encode, redact_bytes, to_array

LIMIT = 1 << 20


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "uint8"])
@pytest.mark.parametrize("binary", [True, False])
def test_round_trip(dtype: str, binary: bool) -> None:
    x = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    env = encode(x, binary=binary)
    assert env["dtype"] == dtype and env["shape"] == [2, 3, 4]
    assert isinstance(env["data"], bytes if binary else str)
    y = decode(env, LIMIT)
    assert y.dtype == x.dtype and np.array_equal(x, y)


def test_big_endian_input_is_sent_little_endian() -> None:
    x = np.arange(4, dtype=">f4")
    assert np.array_equal(decode(encode(x, binary=True), LIMIT), x)


def test_lists_and_torch_tensors() -> None:
    assert decode([[1.5, 2.0]], LIMIT).shape == (1, 2)
    assert decode({"dtype": "int64", "shape": [2], "data": [3, 4]}, LIMIT).tolist() == [3, 4]
    t = torch.ones(2, 3)
    arr = to_array(t)
    assert arr is not None and arr.shape == (2, 3)
    assert to_array([1, 2]) is None


@pytest.mark.parametrize(
    ("payload", "error", "fragment"),
    [
        ({"dtype": "float32", "shape": [2]}, MalformedPayload, "exactly the keys"),
        ({"dtype": "float32", "shape": [2], "data": "@@not base64@@"}, MalformedPayload, "base64"),
        ({"dtype": "float32", "shape": [3], "data": b"\x00" * 8}, MalformedPayload, "needs 12"),
        ({"dtype": "complex64", "shape": [1], "data": b""}, MalformedPayload, "not one of"),
        ({"dtype": "str", "shape": [1], "data": b"a"}, NonNumericInput, "not numeric"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, MalformedPayload, "non-negative"),
        ({"dtype": "float32", "shape": [2], "data": 7}, MalformedPayload, "not bytes"),
        ({"dtype": "float32", "shape": [2], "data": [1.0]}, MalformedPayload, "does not fit"),
        ([[1.0, 2.0], [3.0]], MalformedPayload, "ragged"),
        (["a", "b"], NonNumericInput, "not numbers"),
        ([True, False], NonNumericInput, "not numbers"),
        ("hello", MalformedPayload, "not a tensor"),
        (None, MalformedPayload, "not a tensor"),
    ],
)
def test_malformed(payload: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        decode(payload, LIMIT)


def test_declared_size_checked_before_decoding() -> None:
    # 10^12 floats declared with a tiny body: refused on the declared size, nothing allocated.
    env = {"dtype": "float32", "shape": [10**6, 10**6], "data": base64.b64encode(b"x").decode()}
    with pytest.raises(PayloadTooLarge, match="INFER_MAX_PAYLOAD_BYTES"):
        decode(env, LIMIT)


def test_display_summarises_tensors_and_never_dumps_bytes() -> None:
    envelope = encode(np.zeros((4, 3, 32, 32), np.float32), binary=True)
    assert display(envelope) == "<tensor float32[4, 3, 32, 32] 48.0 KiB>"
    assert display(encode(np.zeros((2, 3), np.float32), binary=False)) == (
        "<tensor float32[2, 3] 32 B>"  # base64 text of 24 bytes
    )
    assert display(b"\x00" * 10) == "<10 bytes>"
    assert display(list(range(100))) == "<list of 100>"
    assert display("x" * 100).endswith("...'") and len(display("x" * 100)) < 80
    nested = display([{"model": "cnn", "outputs": envelope}])
    assert nested == "[{'model': 'cnn', 'outputs': <tensor float32[4, 3, 32, 32] 48.0 KiB>}]"


def test_redact_bytes_replaces_bytes_literals_only() -> None:
    text = repr({"data": b"\x00\x01'q", "name": "b", "tab": "ab'c"})
    assert redact_bytes(text) == "{'data': <bytes>, 'name': 'b', 'tab': \"ab'c\"}"
    assert redact_bytes("{'data': b'\\x00\\x01 cut short") == "{'data': <bytes>"
