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
from models.validation import check_input
from tests.specs import spec_of, zoo_names

LIMIT = 1 << 20


def test_zoo_has_four_input_kinds() -> None:
    assert zoo_names() == ["cnn", "mlp", "resnet50", "transformer"]
    kinds = {spec_of(n).sample_shape: spec_of(n).served_dtypes for n in zoo_names()}
    assert kinds == {
        (64,): ("float32",),
        (3, 32, 32): ("float32",),
        (16,): ("int64",),
        (3, 224, 224): ("uint8", "float32"),
    }
    assert all(str(spec_of(n).weights).endswith("/1/model.safetensors") for n in zoo_names())


@pytest.mark.parametrize("name", [None, 3, "", "MLP", "resnet", "mlp@0", "mlp@x"])
def test_unknown_model(name: object) -> None:
    with pytest.raises(UnknownModel, match=r"python -m models list"):
        spec_of(name)  # type: ignore[arg-type]


def test_uint8_images_stay_uint8_and_float64_becomes_float32() -> None:
    spec = spec_of("resnet50")
    img = np.zeros((3, 224, 224), np.uint8)
    assert check_input(spec, img, 1 << 24).dtype == np.uint8
    assert check_input(spec, img.astype(np.float64), 1 << 24).dtype == np.float32
    with pytest.raises(DtypeMismatch, match="uint8, float32"):
        check_input(spec, img.astype(np.int64), 1 << 24)


def test_single_sample_becomes_batch_of_one_and_batch_stays() -> None:
    spec = spec_of("cnn")
    assert check_input(spec, np.zeros((3, 32, 32), np.float32), LIMIT).shape == (1, 3, 32, 32)
    assert check_input(spec, np.zeros((5, 3, 32, 32), np.float64), LIMIT).dtype == np.float32


@pytest.mark.parametrize("shape", [(63,), (2, 65), (1, 1, 64), (0, 64), ()])
def test_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeMismatch, match=r"\[64\]"):
        check_input(spec_of("mlp"), np.zeros(shape, np.float32), LIMIT)


def test_int_into_float_model_and_float_into_token_model() -> None:
    with pytest.raises(DtypeMismatch, match="float32"):
        check_input(spec_of("mlp"), np.zeros(64, np.int64), LIMIT)
    with pytest.raises(DtypeMismatch, match="int64"):
        check_input(spec_of("transformer"), np.zeros(16, np.float32), LIMIT)


@pytest.mark.parametrize("array", [np.array(["a"] * 64), np.zeros(64, bool), np.zeros(64, complex)])
def test_non_numeric(array: np.ndarray) -> None:
    with pytest.raises(NonNumericInput):
        check_input(spec_of("mlp"), array, LIMIT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    x = np.zeros((2, 64), np.float32)
    x[1, 7] = bad
    with pytest.raises(NonFiniteInput, match="1 value"):
        check_input(spec_of("mlp"), x, LIMIT)


@pytest.mark.parametrize("bad", [-1, 1000])
def test_token_out_of_range(bad: int) -> None:
    x = np.zeros(16, np.int64)
    x[3] = bad
    with pytest.raises(ValueOutOfRange, match=r"\[0, 1000\)"):
        check_input(spec_of("transformer"), x, LIMIT)


def test_payload_over_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="INFER_MAX_PAYLOAD_BYTES"):
        check_input(spec_of("mlp"), np.zeros((100, 64), np.float32), 100 * 64 * 4 - 1)
