"""Every bad call gets its typed error, on every path that can carry it, and no worker dies.

Each case is one mistake a caller can make.  It is sent through each path:

- ``bare``: a plain ``celery.Celery`` client that imports nothing of ours, with
  the workers' serializer, straight to a worker's queue (no router, no checks);
- ``send_task``: the project's ``app.send_task``, routed (the router reads the call);
- ``apply_async``: ``infer.apply_async``, routed, with the client-side checks;
- ``flower``: Flower's ``POST /api/task/async-apply/tasks.infer`` (JSON only).

A call ends in the case's class from :mod:`models.errors`: raised at submit
(nothing published), as a 4xx JSON answer from Flower, or from
``AsyncResult.get()`` within a bound.  At the end both workers, parent and pool
child, are the same processes, and each still serves a good request.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from celery import Celery

from models import errors
from tasks import app, infer
from tasks.ops.launcher import WorkerProcess
from tests.integration.flower_server import Flower, running_flower
from tests.integration.plain_client import plain_client

pytestmark = pytest.mark.integration
Pair = tuple[WorkerProcess, WorkerProcess, str]
GET_TIMEOUT = 30.0
LIMIT = int(os.environ["INFER_MAX_PAYLOAD_BYTES"])

GOOD = np.linspace(-1, 1, 64, dtype=np.float32)
TOKENS = list(range(16))


def env(x: np.ndarray, binary: bool = True) -> dict[str, Any]:
    raw = x.tobytes()
    return {
        "dtype": x.dtype.name,
        "shape": list(x.shape),
        "data": raw if binary else base64.b64encode(raw).decode(),
    }


def b64(dtype: str, shape: list[int], nbytes: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(b"\0" * nbytes).decode()}


@dataclass(frozen=True)
class Case:
    label: str
    args: Any
    error: type[errors.InferenceError]
    kwargs: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    json_ok: bool = True  # can Flower's JSON API carry it?
    not_bare: str = ""  # why a plain Celery client cannot make this mistake, if it cannot
    task: str = "tasks.infer"
    options: dict[str, Any] = field(default_factory=dict)  # publish options (serializer, expires)


CASES: list[Case] = [
    # 1. The call's shape.
    Case("unknown keyword", ("mlp", GOOD.tolist()), errors.BadArguments, {"batch": 4}),
    Case("missing inputs", ("mlp",), errors.BadArguments),
    Case("no arguments", (), errors.BadArguments),
    Case("five positional", ("mlp", GOOD.tolist(), None, 1, 2), errors.BadArguments),
    Case("duplicate keyword", ("mlp", GOOD.tolist()), errors.BadArguments, {"inputs": [0.0]}),
    Case(
        "args not a list",
        "mlp",
        errors.BadArguments,
        json_ok=False,
        not_bare="stock Celery refuses it in the caller (TypeError: task args must be a list)",
    ),
    # 2. The requires header.
    *(
        Case(
            f"requires {label}",
            ("mlp", GOOD.tolist()),
            errors.BadRequirements,
            headers={"requires": value},
            not_bare="a plain client has no router, and a worker does not route",
        )
        for label, value in (
            ("memory 'lots'", {"min_free_memory_mb": "lots"}),
            ("a string", "cuda please"),
            ("capability 'eight'", {"min_compute_capability": "eight"}),
            ("negative memory", {"min_free_memory_mb": -1}),
            ("device tpu", {"device": "tpu"}),
            ("unknown key", {"gpus": 2}),
        )
    ),
    # 3. Precision names and precisions the fleet cannot run.
    Case("dtype int8", ("mlp", GOOD.tolist(), "int8"), errors.UnsupportedDtype),
    Case("dtype 16", ("mlp", GOOD.tolist(), 16), errors.UnsupportedDtype),
    Case("fp16 on CPU workers", ("mlp", GOOD.tolist(), "fp16"), errors.UnsupportedDtype),
    # 4. Size, refused by an estimate, in bytes.
    Case("list over the limit", ("mlp", [0.5] * (LIMIT // 8 + 64)), errors.PayloadTooLarge),
    Case("envelope over the limit", ("mlp", b64("float32", [LIMIT], 4)), errors.PayloadTooLarge),
    # 5. Model names.
    Case("10k-character model", ("m" * 10_000, GOOD.tolist()), errors.UnknownModel),
    Case("empty model name", ("", GOOD.tolist()), errors.UnknownModel),
    Case("non-ASCII model name", ("модель", GOOD.tolist()), errors.UnknownModel),
    Case("model name an int", (5, GOOD.tolist()), errors.UnknownModel),
    Case("model name a path", ("../../etc/passwd", GOOD.tolist()), errors.UnknownModel),
    Case("model name None", (None, GOOD.tolist()), errors.UnknownModel),
    # Inputs.
    Case("inputs a string", ("mlp", "zeros please"), errors.MalformedPayload),
    Case("inputs None", ("mlp", None), errors.MalformedPayload),
    Case("empty list", ("mlp", []), errors.ShapeMismatch),
    Case("ragged list", ("mlp", [[0.0] * 64, [0.0] * 63]), errors.MalformedPayload),
    Case("6-D input", ("mlp", np.zeros((1, 1, 1, 1, 1, 64)).tolist()), errors.ShapeMismatch),
    Case("batch of 0", ("mlp", b64("float32", [0, 64], 0)), errors.ShapeMismatch),
    Case("wrong sample shape", ("cnn", GOOD.tolist()), errors.ShapeMismatch),
    Case("NaN", ("mlp", [float("nan"), *GOOD.tolist()[1:]]), errors.NonFiniteInput, json_ok=False),
    Case("infinity", ("mlp", [float("inf")] * 64), errors.NonFiniteInput, json_ok=False),
    Case(
        "NaN in an envelope",
        ("mlp", env(np.full(64, np.nan, np.float32), False)),
        errors.NonFiniteInput,
    ),
    Case("token id -1", ("transformer", [-1, *TOKENS[1:]]), errors.ValueOutOfRange),
    Case("token id 1000", ("transformer", [1000, *TOKENS[1:]]), errors.ValueOutOfRange),
    Case("token id 2**40", ("transformer", [2**40, *TOKENS[1:]]), errors.ValueOutOfRange),
    Case("floats for tokens", ("transformer", [0.5] * 16), errors.DtypeMismatch),
    Case("ints for a float model", ("mlp", list(range(64))), errors.DtypeMismatch),
    Case("strings", ("mlp", ["a"] * 64), errors.NonNumericInput),
    Case("booleans", ("mlp", [True] * 64), errors.NonNumericInput),
    Case("envelope wrong byte count", ("mlp", b64("float32", [64], 100)), errors.MalformedPayload),
    Case("envelope complex dtype", ("mlp", b64("complex64", [64], 512)), errors.MalformedPayload),
    Case("envelope object dtype", ("mlp", b64("object", [64], 512)), errors.NonNumericInput),
    Case("envelope negative shape", ("mlp", b64("float32", [-64], 0)), errors.MalformedPayload),
    Case("envelope missing keys", ("mlp", {"dtype": "float32"}), errors.MalformedPayload),
    Case(
        "envelope bad base64",
        ("mlp", {"dtype": "float32", "shape": [64], "data": "%%%"}),
        errors.MalformedPayload,
    ),
    # Model versions.
    Case("a version that does not exist", ("mlp@9", GOOD.tolist()), errors.UnknownVersion),
    Case("version 0", ("mlp@0", GOOD.tolist()), errors.UnknownModel),
    # Text (minilm: all-MiniLM-L6-v2, at most 256 tokens and 64 strings a request).
    Case("text: empty string", ("minilm", ""), errors.EmptyText),
    Case("text: a blank string in a list", ("minilm", ["fine", "   "]), errors.EmptyText),
    Case("text: a number", ("minilm", 42), errors.NonTextInput),
    Case("text: a number in a list", ("minilm", ["fine", 3]), errors.NonTextInput),
    Case("text: an array for a text model", ("minilm", GOOD.tolist()), errors.NonTextInput),
    Case("text: too many strings", ("minilm", ["fine"] * 65), errors.TooManyTexts),
    Case("text: over 256 tokens", ("minilm", "word " * 400), errors.TextTooLong),
    Case(
        "text: bytes that are not UTF-8",
        ("minilm", [b"\xff\xfe not text"]),
        errors.InvalidUtf8,
        json_ok=False,
    ),
    Case(
        "text: a lone surrogate",
        ("minilm", "half a pair \udc80"),
        errors.InvalidUtf8,
        json_ok=False,
        not_bare="msgpack cannot encode a lone surrogate: stock Celery fails in the caller (EncodeError)",
    ),
    # 6. Messages no worker can run: the worker stores MalformedMessage for their id.
    Case(
        "pickle serializer",
        ("mlp", GOOD.tolist()),
        errors.MalformedMessage,
        options={"serializer": "pickle"},
    ),
    Case("unknown task name", ("mlp", GOOD.tolist()), errors.MalformedMessage, task="tasks.nope"),
    # 7. Deadlines already past: our client (and Flower, through it) refuses the call at submit;
    # a stock client publishes it, and the worker drops it unrun (tests/integration/test_deadlines.py).
    Case(
        "expires already past",
        ("mlp", GOOD.tolist()),
        errors.DeadlineExceeded,
        options={"expires": -1},
    ),
    Case(
        "deadline header already past",
        ("mlp", GOOD.tolist()),
        errors.DeadlineExceeded,
        headers={"deadline": "2020-01-01T00:00:00+00:00"},
    ),
]
PATHS = ("bare", "send_task", "apply_async", "flower")


@pytest.fixture(scope="module")
def bare() -> Iterator[Celery]:
    """A client that imports nothing of this project: stock Celery, the workers' serializer."""
    with plain_client() as client:
        yield client


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    with running_flower(tmp_path_factory.mktemp("flower")) as f:
        yield f


class Refused(Exception):
    """What Flower answered instead of a task id: the typed error's class and message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


def _flower_apply(flower: Flower, case: Case) -> Any:
    body: dict[str, Any] = {"args": list(case.args), "kwargs": case.kwargs, **case.options}
    if case.headers:
        body["headers"] = case.headers
    status, _, text = flower.post("async-apply", body)
    if status != 200:
        answer = json.loads(text)  # never an empty body
        raise Refused(status, answer["error"], answer["message"])
    return app.AsyncResult(json.loads(text)["task-id"]).get(timeout=GET_TIMEOUT)


@pytest.fixture(scope="module")
def processes(pair: Pair) -> dict[str, set[int]]:
    """Each worker's parent and pool children, before the bad calls."""
    return {w.name: _tree(w) for w in pair[:2]}


def _tree(worker: WorkerProcess) -> set[int]:
    parent = psutil.Process(worker.pid)
    return {parent.pid, *(c.pid for c in parent.children(recursive=True))}


def _send(path: str, case: Case, pair: Pair, bare: Celery, flower: Flower) -> Callable[[], Any]:
    worker = pair[0] if case.args and case.args[:1] != ("transformer",) else pair[1]
    if path == "bare":
        return lambda: bare.send_task(
            case.task,
            args=case.args,
            kwargs=case.kwargs,
            headers=case.headers,
            queue=worker.own_queue,
            declare=[],  # the workers declare their queues; a plain producer only publishes
            **case.options,
        ).get(timeout=GET_TIMEOUT)
    if path == "flower":
        return lambda: _flower_apply(flower, case)
    if path == "send_task":
        # An unrouted task name needs a queue: the router routes only the project's tasks.
        queue = {"queue": worker.own_queue} if case.task != "tasks.infer" else {}
        return lambda: app.send_task(
            case.task,
            args=case.args,
            kwargs=case.kwargs,
            headers=case.headers,
            **queue,
            **case.options,
        ).get(timeout=GET_TIMEOUT)
    return lambda: infer.apply_async(
        case.args, case.kwargs, headers=case.headers, **case.options
    ).get(timeout=GET_TIMEOUT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_each_bad_call_gets_its_class(
    pair: Pair,
    bare: Celery,
    flower: Flower,
    processes: dict[str, set[int]],
    path: str,
    case: Case,
) -> None:
    if path == "bare" and case.not_bare:
        pytest.skip(case.not_bare)
    if path == "flower" and not case.json_ok:
        pytest.skip("Flower's API takes JSON, which cannot carry it")
    if path in ("apply_async", "flower") and case.task != "tasks.infer":
        pytest.skip("infer.apply_async is tasks.infer; Flower answers 404 for a task it lacks")
    call = _send(path, case, pair, bare, flower)
    with pytest.raises((errors.InferenceError, Refused)) as caught:
        call()
    if isinstance(caught.value, Refused):  # Flower refused it at submit
        assert 400 <= caught.value.status < 600, caught.value
        name, message = caught.value.error, caught.value.message
    else:
        assert type(caught.value) is case.error, (path, case.label, caught.value)
        name, message = type(caught.value).__name__, str(caught.value)
    assert name == case.error.__name__, (path, case.label, message)
    assert message and len(message) < 600, message  # says what to do; echoes are cut short


def test_the_workers_survived_and_still_serve(pair: Pair, processes: dict[str, set[int]]) -> None:
    for worker, model, x in ((pair[0], "mlp", GOOD), (pair[1], "transformer", TOKENS)):
        assert _tree(worker) == processes[worker.name], f"{worker.name} lost a process"
        reply = infer.apply_async((model, x), queue=worker.own_queue).get(timeout=GET_TIMEOUT)
        assert reply["worker"] == worker.hostname


PLAIN_PRODUCER = """
import json, os, sys
from celery import Celery  # and nothing of this project
client = Celery("plain", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
client.conf.update(task_serializer="msgpack", result_serializer="msgpack",
                   accept_content=["msgpack", "json"], result_accept_content=["msgpack", "json"])
reply = client.send_task("tasks.infer", args=["mlp", [0.0] * 64], queue=sys.argv[1], declare=[])
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "models", "routing")),
                  "timing": reply.get(timeout=30)["timing"]}))
"""


def test_a_plain_producer_gets_an_unknown_wait_not_zero(pair: Pair, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_PRODUCER, pair[0].own_queue],
        cwd=tmp_path,  # not the repository: nothing of ours on the path but the installed package
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["modules"] == []  # the client imported nothing of this project
    timing = result["timing"]
    assert timing["queue_wait_ms"] is None and timing["total_ms"] is None
    assert timing["service_ms"] > 0
    ours = infer.apply_async(("mlp", GOOD), queue=pair[0].own_queue).get(timeout=GET_TIMEOUT)
    assert ours["timing"]["queue_wait_ms"] >= 0 and ours["timing"]["total_ms"] > 0
