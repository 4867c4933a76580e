"""Flower's task API answers typed: a real ``python -m tasks.ops.flower``, a real worker, HTTP calls.

A call our client refuses answers 4xx with ``{"error", "message"}`` (the class
and message ``infer.apply_async`` raises in this process) and publishes
nothing; a result shows tensors summarised and a failure's class
(``tasks/ops/flower_api.py``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.errors import InferenceError
from tasks import app, infer
from tasks.ops.launcher import WorkerProcess
from tests.integration.conftest import WorkerFactory
from tests.integration.flower_server import (
    HTTP_WAIT,
    RESULT_WAIT,
    Flower,
    running_flower,
)

SAMPLE = [0.5] * 64  # one mlp sample, as any JSON producer writes it
HUGE_MB = 1099511627775  # the largest min_free_memory_mb: no worker has it


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    with running_flower(tmp_path) as f:
        yield f


@pytest.fixture
def worker(worker_factory: WorkerFactory, run_id: str) -> WorkerProcess:
    name = f"fa-{run_id}"
    return worker_factory(name, [f"cpu.direct.{name}", f"fa-shared-{run_id}"]).wait_ready()


@pytest.fixture
def unused_queue(run_id: str) -> Iterator[str]:
    """A queue name no one declares: if a refused call published anything, it would exist."""
    name = f"fa-never-{run_id}-{secrets.token_hex(3)}"
    yield name
    with app.connection_for_write() as conn:
        try:
            depth = conn.default_channel.queue_declare(queue=name, passive=True).message_count
        except conn.channel_errors:
            return  # not found: nothing was published there
        conn.default_channel.queue_delete(name)
    pytest.fail(f"queue {name} was declared by a refused call ({depth} messages)")


def refusal(args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]) -> InferenceError:
    """What ``infer.apply_async`` raises in this process for the same call."""
    with pytest.raises(InferenceError) as raised:
        infer.apply_async(args, kwargs, **options)
    return raised.value


# (name, request body, expected class): refused by the client checks or the router, as the client is.
BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("string inputs", {"args": ["mlp", "not a tensor"]}, "MalformedPayload"),
    ("unknown model", {"args": ["no-such-model", SAMPLE]}, "UnknownModel"),
    ("missing inputs", {"args": ["mlp"]}, "BadArguments"),
    ("too many args", {"args": ["mlp", SAMPLE, None, 4]}, "BadArguments"),
    ("unknown keyword", {"args": ["mlp", SAMPLE], "kwargs": {"batch": 2}}, "BadArguments"),
    ("kwargs not a mapping", {"args": ["mlp", SAMPLE], "kwargs": "x"}, "BadArguments"),
    ("wrong shape", {"args": ["mlp", [0.5] * 63]}, "ShapeMismatch"),
    ("ints for a float model", {"args": ["mlp", [1] * 64]}, "DtypeMismatch"),
    ("a string among numbers", {"args": ["mlp", [*SAMPLE[:-1], "0.5"]]}, "NonNumericInput"),
    ("NaN", {"args": ["mlp", [*SAMPLE[:-1], float("nan")]]}, "NonFiniteInput"),  # JSON's NaN
    ("unknown dtype", {"args": ["mlp", SAMPLE, "fp8"]}, "UnsupportedDtype"),
    (
        "unknown requirement",
        {"args": ["mlp", SAMPLE], "headers": {"requires": {"gpu": 1}}},
        "BadRequirements",
    ),
    (
        "requires not a mapping",
        {"args": ["mlp", SAMPLE], "headers": {"requires": "gpu"}},
        "BadRequirements",
    ),
    (
        "bad device",
        {"args": ["mlp", SAMPLE], "headers": {"requires": {"device": "tpu"}}},
        "BadRequirements",
    ),
]
ROUTER_CALLS = {"unknown requirement", "requires not a mapping", "bad device"}


def options_of(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("args", "kwargs")}


def test_refused_calls_answer_400_with_the_typed_error_and_publish_nothing(
    flower: Flower, unused_queue: str
) -> None:
    for name, body, expected in BAD_CALLS:
        if name not in ROUTER_CALLS:
            # An explicit queue skips the router but not the client checks; nothing may land there.
            body = {**body, "queue": unused_queue}
        error = refusal(body["args"], body.get("kwargs", {}), options_of(body))
        assert type(error).__name__ == expected, (name, error)
        for endpoint in ("async-apply", "apply"):
            status, content_type, text = flower.post(endpoint, body)
            assert (status, content_type) == (400, "application/json; charset=UTF-8"), (name, text)
            assert json.loads(text) == {"error": expected, "message": str(error)}, (name, endpoint)
    # Each refusal is one warning line in Flower's log (status, request, class, message).
    log = flower.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "400 POST /api/task/async-apply/tasks.infer (127.0.0.1): UnknownModel: " in log


def test_no_capable_worker_answers_503_and_send_task_is_routed_too(flower: Flower) -> None:
    impossible = {"args": ["mlp", SAMPLE], "headers": {"requires": {"min_free_memory_mb": HUGE_MB}}}
    for endpoint in ("async-apply", "apply", "send-task"):
        status, _, text = flower.post(endpoint, impossible)
        assert status == 503, (endpoint, text)
        body = json.loads(text)
        assert body["error"] == "NoCapableWorker" and body["message"], body
    # send-task skips the client's input checks but not the router's (arguments, model, requires).
    for body, expected in (
        ({"args": ["no-such-model", SAMPLE]}, "UnknownModel"),
        ({"args": ["mlp"]}, "BadArguments"),
        ({"args": ["mlp", SAMPLE], "headers": {"requires": {"gpu": 1}}}, "BadRequirements"),
    ):
        status, _, text = flower.post("send-task", body)
        assert (status, json.loads(text)["error"]) == (400, expected), (body, text)


def test_other_errors_keep_flowers_answers(flower: Flower, unused_queue: str) -> None:
    assert (
        flower.call("POST", "/api/task/async-apply/tasks.infer", {"args": []}, auth=False)[0] == 401
    )
    status, _, text = flower.post("async-apply", {"args": ["mlp", SAMPLE], "expires": "soon"})
    assert (status, text) == (400, "Invalid option")  # Flower's own check, before publishing
    # Not a project error (kombu: no such serializer): Flower's empty 500, as before.
    probe = {"args": ["mlp", SAMPLE], "queue": unused_queue, "serializer": "no-such-serializer"}
    status, _, text = flower.post("async-apply", probe)
    assert (status, text) == (500, "")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_no_raw_bytes(shown: Any) -> None:
    """No string in Flower's answer is (or holds) a Python bytes repr: stock Flower's was."""
    for text in _strings(shown):
        assert "b'" not in text and 'b"' not in text and "\\x" not in text, text


def test_results_show_tensor_summaries_and_typed_failures(
    flower: Flower, worker: WorkerProcess
) -> None:
    with pytest.raises(AssertionError):  # what stock Flower showed is caught
        assert_no_raw_bytes({"task-id": "5b", "result": "{'outputs': {'data': b'\\xce'}}"})
    body = {"args": ["mlp", [SAMPLE, SAMPLE]], "queue": worker.own_queue}
    status, _, text = flower.post("async-apply", body)
    assert status == 200, text
    task_id = json.loads(text)["task-id"]
    _, shown = flower.result(task_id)
    assert shown["state"] == "SUCCESS", shown
    reply = shown["result"]
    assert reply["worker"] == worker.hostname and reply["model"] == "mlp"
    assert reply["outputs"] == {"dtype": "float32", "shape": [2, 10], "nbytes": 80}
    assert_no_raw_bytes(shown)
    # What the backend holds is raw bytes; Flower showed their summary.
    assert isinstance(app.AsyncResult(task_id).get(timeout=RESULT_WAIT)["outputs"]["data"], bytes)

    # The synchronous apply waits and shows the same summary.
    status, _, text = flower.post("apply", {**body, "timeout": RESULT_WAIT}, timeout=HTTP_WAIT)
    assert status == 200, text
    applied = json.loads(text)
    assert applied["state"] == "SUCCESS"
    assert applied["result"]["outputs"] == {"dtype": "float32", "shape": [2, 10], "nbytes": 80}

    # send-task skips the client's input checks: the worker refuses the shape, the result says so.
    bad = {"args": ["mlp", [0.5] * 63], "queue": worker.own_queue}
    status, _, text = flower.post("send-task", bad)
    assert status == 200, text
    failed_id = json.loads(text)["task-id"]
    _, shown = flower.result(failed_id)
    assert shown["state"] == "FAILURE", shown
    assert shown["result"]["error"] == "ShapeMismatch"
    assert "shape [63]" in shown["result"]["message"], shown["result"]
    assert_no_raw_bytes(shown)
