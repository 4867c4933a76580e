"""Client-side checks in ``infer.apply_async``: bad requests never reach the publisher."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from celery import Task

from models.errors import (
    DtypeMismatch,
    MalformedPayload,
    NonFiniteInput,
    NonNumericInput,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownModel,
    UnsupportedDtype,
)
from tasks import infer
from tasks.inference import prepare_request


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any, dict[str, Any]]]:
    """Record what would be published instead of touching a broker (pure-logic unit test)."""
    calls: list[tuple[Any, Any, dict[str, Any]]] = []

    def fake_publish(self: Task, args: Any = None, kwargs: Any = None, **options: Any) -> str:
        calls.append((args, kwargs, options))
        return "published"

    monkeypatch.setattr(Task, "apply_async", fake_publish)
    return calls


def test_numpy_and_torch_inputs_are_encoded(published: list[Any]) -> None:
    infer.apply_async(("mlp", np.zeros((2, 64), np.float32)), queue="cpu")
    infer.apply_async(kwargs={"model": "cnn", "inputs": torch.zeros(3, 32, 32)})
    (args, _, options), (_, kwargs, _) = published
    assert args[1]["shape"] == [2, 64] and isinstance(args[1]["data"], bytes)
    # The display Flower and logs show goes with it, so Celery skips its saferepr of the bytes.
    assert options == {
        "queue": "cpu",
        "argsrepr": "('mlp', <tensor float32[2, 64] 512 B>)",
        "kwargsrepr": "{}",
    }
    assert kwargs["inputs"]["shape"] == [3, 32, 32]


def test_json_serializer_gets_base64(published: list[Any]) -> None:
    infer.apply_async(("mlp", np.zeros(64, np.float32)), serializer="json")
    assert isinstance(published[0][0][1]["data"], str)


BIG = np.zeros((9 * 1024 * 1024 // 256, 64), np.float32)  # > 8 MiB default limit


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("resnet", np.zeros(64, np.float32)), UnknownModel),
        (("mlp", np.zeros(63, np.float32)), ShapeMismatch),
        (("mlp", np.zeros(64, np.int64)), DtypeMismatch),
        (("transformer", np.zeros(16, np.float32)), DtypeMismatch),
        (("mlp", ["x"] * 64), NonNumericInput),
        (("mlp", [float("nan")] * 64), NonFiniteInput),
        (("mlp", np.full(64, np.inf, np.float32)), NonFiniteInput),
        (("mlp", BIG), PayloadTooLarge),
        (("mlp", {"dtype": "float32"}), MalformedPayload),
        (("mlp", np.zeros(64, np.float32), "fp8"), UnsupportedDtype),
    ],
)
def test_bad_requests_raise_before_publishing(
    published: list[Any], args: tuple[Any, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        infer.apply_async(args)
    with pytest.raises(error):
        infer.delay(*args)
    assert published == []


def test_prepare_request_keeps_lists_as_they_are() -> None:
    args, kwargs = prepare_request(["mlp", [0.5] * 64], {})
    assert args == ["mlp", [0.5] * 64] and kwargs == {}
