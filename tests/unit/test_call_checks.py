"""The call contract of ``tasks.infer``: its shape, precision names, size estimates, echoes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from models.errors import (
    ECHO_CHARS,
    BadArguments,
    PayloadTooLarge,
    UnknownModel,
    UnsupportedDtype,
    echo,
)
from tasks.client.routes import call_requirements, requirements_for
from tasks.wire.codec import decode, encode, estimated_nbytes, refuse_oversized
from tasks.wire.request import check_dtype, infer_call
from tests.specs import spec_of

X = [0.0] * 64

BAD_SHAPES: list[tuple[Any, Any, str]] = [
    ((), {}, "missing model and inputs"),
    (("mlp",), {}, "missing inputs"),
    ((), {"model": "mlp"}, "missing inputs"),
    ((), {"inputs": X}, "missing model"),
    (("mlp", X, None, "extra", "more"), {}, "got 5 positional arguments, at most 3"),
    (("mlp", X), {"inputs": X}, "inputs given both positionally and by keyword"),
    (("mlp", X), {"model": "cnn"}, "model given both positionally and by keyword"),
    (("mlp", X), {"batch": 4}, "unknown keyword argument(s) ['batch']"),
    (("mlp", X), {"requires": {"device": "cuda"}}, "requirements go in headers"),
    ("mlp", {}, "args must be a list, got str"),
    (("mlp", X), ["dtype"], "kwargs must be a mapping, got list"),
]


@pytest.mark.parametrize(("args", "kwargs", "fragment"), BAD_SHAPES)
def test_wrong_call_shapes_raise_bad_arguments(args: Any, kwargs: Any, fragment: str) -> None:
    with pytest.raises(BadArguments) as e:
        infer_call(args, kwargs)
    assert fragment in str(e.value)
    assert "tasks.infer takes (model, inputs, dtype=None)" in str(e.value)


@pytest.mark.parametrize(("args", "kwargs", "fragment"), BAD_SHAPES)
def test_the_router_refuses_the_same_shapes_at_submit(
    args: Any, kwargs: Any, fragment: str
) -> None:
    """What ``send_task`` meets: the router reads the call before anything is published."""
    with pytest.raises(BadArguments, match=re.escape(fragment)):
        requirements_for("tasks.infer", args, kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "want"),
    [
        (("mlp", X), {}, ("mlp", X, None)),
        (("mlp", X, "fp32"), {}, ("mlp", X, "fp32")),
        (("mlp",), {"inputs": X, "dtype": "auto"}, ("mlp", X, "auto")),
        ((), {"model": "mlp", "inputs": X}, ("mlp", X, None)),
        (["mlp", X], None, ("mlp", X, None)),
    ],
)
def test_every_valid_shape_reads_the_same(args: Any, kwargs: Any, want: tuple[Any, ...]) -> None:
    assert tuple(infer_call(args, kwargs)) == want


def test_an_observer_reads_a_bad_call_without_raising() -> None:
    assert infer_call("junk", 5, strict=False).model is None
    assert infer_call(("mlp",), {"bogus": 1}, strict=False).model == "mlp"


@pytest.mark.parametrize("dtype", ["int8", "FP16", "", 16, ["fp16"], True])
def test_a_precision_that_is_no_name_is_unsupported_dtype_everywhere(dtype: object) -> None:
    with pytest.raises(UnsupportedDtype, match="is not a precision: use fp32, fp16, bf16 or auto"):
        check_dtype(dtype)
    with pytest.raises(UnsupportedDtype, match="is not a precision: use fp32, fp16, bf16 or auto"):
        requirements_for("tasks.infer", ("mlp", X, dtype), {})


def test_call_requirements_name_the_model_and_its_memory() -> None:
    req = call_requirements("cnn", "fp16")
    assert (req.model, req.dtype, req.model_memory_mb) == ("cnn", "fp16", spec_of("cnn").memory_mb)
    assert call_requirements("cnn", "auto").dtype is None


@pytest.mark.parametrize(
    ("payload", "nbytes"),
    [
        ([0.0] * 10, 80),
        ([[1, 2, 3]] * 4, 96),
        ([], 0),
        ([[[]]], 0),
        (3.0, 8),
        ({"dtype": "float32", "shape": [2, 64], "data": b""}, 512),
        ({"dtype": "float16", "shape": [10], "data": "..."}, 20),
        ({"dtype": "complex64", "shape": [10], "data": b""}, None),
        ({"dtype": "float32", "shape": [-1], "data": b""}, None),
        ("text", 8),
    ],
)
def test_size_estimates_read_lengths_only(payload: Any, nbytes: int | None) -> None:
    assert estimated_nbytes(payload) == nbytes


def test_a_nine_million_entry_list_is_refused_by_its_length_in_bytes() -> None:
    # Every entry after the first is no number: converting anything would raise
    # NonNumericInput, so PayloadTooLarge shows that the refusal read lengths only.
    big = [0.5, *[object()] * 8_999_999]
    with pytest.raises(PayloadTooLarge) as e:
        requirements_for("tasks.infer", ("mlp", big), {}, max_payload_bytes=8 * 1024 * 1024)
    assert "input is about 72000000 bytes, over the 8388608-byte limit" in str(e.value)
    assert "entries" not in str(e.value)
    with pytest.raises(PayloadTooLarge, match="about 72000000 bytes"):
        decode(big, 8 * 1024 * 1024)


def test_an_envelope_over_the_limit_is_refused_by_its_shape() -> None:
    envelope = encode(np.zeros((4, 64), np.float32), binary=True)
    refuse_oversized(envelope, 1024)  # exactly 1024 bytes: fine
    with pytest.raises(PayloadTooLarge, match="about 1024 bytes, over the 1023-byte limit"):
        refuse_oversized(envelope, 1023)


def test_echo_cuts_a_long_value_and_says_so() -> None:
    assert echo("mlp") == "'mlp'"
    cut = echo("x" * 10_000)
    assert cut.startswith("'xxx") and cut.endswith("(10002 characters, cut)")
    assert len(cut) < ECHO_CHARS + 40


def test_an_unknown_model_name_is_echoed_short() -> None:
    with pytest.raises(UnknownModel) as e:
        spec_of("m" * 10_000)
    assert len(str(e.value)) < 300
    assert "(10002 characters, cut)" in str(e.value)
