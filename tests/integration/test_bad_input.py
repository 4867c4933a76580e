"""Every bad input gets its typed error from the worker, which keeps serving.

These go through ``send_task`` on purpose: it skips the client-side checks
of ``infer.apply_async`` (tested in tests/unit/test_submit_checks.py), so the
worker itself must refuse each one.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from models import errors
from tasks import app, infer
from tasks.ops.launcher import WorkerProcess

pytestmark = pytest.mark.integration
Pair = tuple[WorkerProcess, WorkerProcess, str]


def env(x: np.ndarray) -> dict[str, Any]:
    return {"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tobytes()}


GOOD = np.linspace(-1, 1, 64, dtype=np.float32)
NAN = GOOD.copy()
NAN[3] = np.nan
OVERSIZED = np.zeros((1024 * 1024 // 256 + 1, 64), np.float32)  # just over the 1 MiB test limit

CASES: list[tuple[str, tuple[Any, ...], type[errors.InferenceError]]] = [
    ("unknown model", ("resnet", env(GOOD)), errors.UnknownModel),
    ("wrong shape", ("mlp", env(GOOD[:60])), errors.ShapeMismatch),
    ("wrong dtype: ints into a float model", ("mlp", env(np.arange(64))), errors.DtypeMismatch),
    (
        "wrong dtype: floats into a token model",
        ("transformer", env(np.zeros(16, np.float32))),
        errors.DtypeMismatch,
    ),
    ("non-numeric list", ("mlp", ["a"] * 64), errors.NonNumericInput),
    (
        "non-numeric envelope",
        ("mlp", {"dtype": "str", "shape": [1], "data": b"a"}),
        errors.NonNumericInput,
    ),
    ("NaN", ("mlp", env(NAN)), errors.NonFiniteInput),
    ("infinity", ("mlp", [float("inf")] * 64), errors.NonFiniteInput),
    ("token id out of range", ("transformer", list(range(990, 1006))), errors.ValueOutOfRange),
    ("oversized payload", ("mlp", env(OVERSIZED)), errors.PayloadTooLarge),
    (
        "malformed envelope",
        ("mlp", {"dtype": "float32", "shape": [64], "data": "%%%"}),
        errors.MalformedPayload,
    ),
    ("fp16 on a CPU worker", ("mlp", env(GOOD), "fp16"), errors.UnsupportedDtype),
]


@pytest.mark.parametrize(("label", "args", "error"), CASES, ids=[c[0] for c in CASES])
def test_worker_raises_typed_error_and_keeps_serving(
    pair: Pair, label: str, args: tuple[Any, ...], error: type[errors.InferenceError]
) -> None:
    worker, _, _ = pair
    res = app.send_task("tasks.infer", args=args, queue=worker.own_queue)
    with pytest.raises(error) as caught:
        res.get(timeout=30)
    assert type(caught.value) is error, label  # the exact class, rebuilt on the client
    assert isinstance(caught.value, errors.RequestError)
    assert str(caught.value)  # a message that says what to do
    assert res.state == "FAILURE" and not res.retries  # failed once, never retried
    # The same worker process answers the next request correctly.
    ok = infer.apply_async(("mlp", GOOD), queue=worker.own_queue).get(timeout=30)
    assert ok["worker"] == worker.hostname and ok["batch_size"] == 1
    assert worker.alive()


def test_bad_requests_leave_no_traceback_noise(pair: Pair) -> None:
    worker, _, _ = pair
    res = app.send_task("tasks.infer", args=("nope", [1.0]), queue=worker.own_queue)
    with pytest.raises(errors.UnknownModel):
        res.get(timeout=30)
    log = worker.logfile.read_text()
    assert "raised expected: UnknownModel" in log
    assert "Traceback" not in log


def test_json_producer_with_base64_envelope(pair: Pair) -> None:
    worker, _, _ = pair
    data = base64.b64encode(GOOD.tobytes()).decode()
    res = app.send_task(
        "tasks.infer",
        args=("mlp", {"dtype": "float32", "shape": [64], "data": data}),
        queue=worker.own_queue,
        serializer="json",
    )
    assert res.get(timeout=30)["batch_size"] == 1
