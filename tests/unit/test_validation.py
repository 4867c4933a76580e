from __future__ import annotations

import numpy as np
import pytest

from models.errors import (
    DtypeMismatch,
    NonFiniteInput,
    NonNumericInput,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownModel,
    ValueOutOfRange,
)
from models.registry import get_spec, model_names
from models.validation import check_input

LIMIT = 1 << 20


def test_registry_has_three_input_kinds() -> None:
    assert model_names() == ["cnn", "mlp", "transformer"]
    kinds = {get_spec(n).sample_shape: get_spec(n).input_dtype for n in model_names()}
    assert kinds == {(64,): "float32", (3, 32, 32): "float32", (16,): "int64"}
    assert all(get_spec(n).weights_file.endswith(".safetensors") for n in model_names())


@pytest.mark.parametrize("name", [None, 3, "", "MLP", "resnet"])
def test_unknown_model(name: object) -> None:
    with pytest.raises(UnknownModel, match="choose one of cnn, mlp, transformer"):
        get_spec(name)


def test_single_sample_becomes_batch_of_one_and_batch_stays() -> None:
    spec = get_spec("cnn")
    assert check_input(spec, np.zeros((3, 32, 32), np.float32), LIMIT).shape == (1, 3, 32, 32)
    assert check_input(spec, np.zeros((5, 3, 32, 32), np.float64), LIMIT).dtype == np.float32


@pytest.mark.parametrize("shape", [(63,), (2, 65), (1, 1, 64), (0, 64), ()])
def test_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeMismatch, match=r"\[64\]"):
        check_input(get_spec("mlp"), np.zeros(shape, np.float32), LIMIT)


def test_int_into_float_model_and_float_into_token_model() -> None:
    with pytest.raises(DtypeMismatch, match="float32"):
        check_input(get_spec("mlp"), np.zeros(64, np.int64), LIMIT)
    with pytest.raises(DtypeMismatch, match="int64"):
        check_input(get_spec("transformer"), np.zeros(16, np.float32), LIMIT)


@pytest.mark.parametrize("array", [np.array(["a"] * 64), np.zeros(64, bool), np.zeros(64, complex)])
def test_non_numeric(array: np.ndarray) -> None:
    with pytest.raises(NonNumericInput):
        check_input(get_spec("mlp"), array, LIMIT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    x = np.zeros((2, 64), np.float32)
    x[1, 7] = bad
    with pytest.raises(NonFiniteInput, match="1 value"):
        check_input(get_spec("mlp"), x, LIMIT)


@pytest.mark.parametrize("bad", [-1, 1000])
def test_token_out_of_range(bad: int) -> None:
    x = np.zeros(16, np.int64)
    x[3] = bad
    with pytest.raises(ValueOutOfRange, match=r"\[0, 1000\)"):
        check_input(get_spec("transformer"), x, LIMIT)


def test_payload_over_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="INFER_MAX_PAYLOAD_BYTES"):
        check_input(get_spec("mlp"), np.zeros((100, 64), np.float32), 100 * 64 * 4 - 1)
