"""``python -m tasks.ops.flower``: never without a real password; Flower's task API answers typed."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models import errors
from models.errors import ConfigurationError
from tasks.ops import flower_api
from tasks.ops.flower import check_basic_auth, flower_argv
from tasks.ops.flower_api import error_body, install, jsonable, status_for
from tasks.wire.codec import encode


@pytest.mark.parametrize(
    "value",
    ["", "admin", "admin:", ":s3cret-enough", "admin:change-me", "admin:short", "a:b3cure-pw,x"],
)
def test_missing_malformed_or_placeholder_credentials_are_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="FLOWER_BASIC_AUTH"):
        check_basic_auth({"FLOWER_BASIC_AUTH": value})


def test_unset_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="Set FLOWER_BASIC_AUTH=user:password"):
        check_basic_auth({})


def test_several_users() -> None:
    assert check_basic_auth({"FLOWER_BASIC_AUTH": "ops:s3cret-pass,ro:an0ther-pass"}) == [
        "ops",
        "ro",
    ]


def test_binds_to_loopback_by_default() -> None:
    assert "--address=127.0.0.1" in flower_argv()


# --- tasks.ops.flower_api: typed answers from Flower's task API, and the Flower internals it uses.


def test_refusals_are_400_no_capable_worker_503_other_project_errors_500() -> None:
    assert status_for(errors.ShapeMismatch("s")) == 400
    assert status_for(errors.BadArguments("a")) == 400
    assert status_for(errors.BadRequirements("r")) == 400
    assert status_for(errors.RequestError("r")) == 400
    assert status_for(errors.NoCapableWorker("n")) == 503
    assert status_for(errors.ConfigurationError("c")) == 500
    assert status_for(errors.ModelLoadError("m")) == 500
    assert error_body(errors.UnknownModel("unknown model 'x'")) == {
        "error": "UnknownModel",
        "message": "unknown model 'x'",
    }


def test_results_show_tensor_summaries_never_bytes() -> None:
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    reply = {
        "model": "mlp",
        "outputs": encode(x, binary=True),
        "timing": {"total_ms": None, "compute_ms": 1.5},
        "extra": [b"\x00\x01", (1, "a")],
        7: True,
    }
    shown = jsonable(reply)
    summary = {"dtype": "float32", "shape": [2, 10], "nbytes": 80}
    assert shown == {
        "model": "mlp",
        "outputs": summary,
        "timing": {"total_ms": None, "compute_ms": 1.5},
        "extra": ["<2 bytes>", [1, "a"]],
        "7": True,
    }
    assert jsonable(encode(x, binary=False)) == summary  # base64 under json: the same summary
    text = json.dumps(shown)
    assert "\\x" not in text and "b'" not in text
    assert jsonable(errors.ShapeMismatch("got [63]")) == {
        "error": "ShapeMismatch",
        "message": "got [63]",
    }
    odd = jsonable({"dtype": "complex64", "shape": "?", "data": b"\xff" * 3})
    assert odd == {"dtype": "complex64", "shape": "'?'", "nbytes": 3}
    assert "b'" not in jsonable(Holder(b"\xde\xad"))


class Holder:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Holder({self.data!r})"


def test_install_swaps_the_four_task_handlers_and_refuses_a_table_without_them() -> None:
    import flower.urls
    from flower.api import tasks as stock

    table = list(flower.urls.handlers)
    install(table)
    install(table)  # idempotent
    classes = {entry[0]: entry[1] for entry in table if isinstance(entry, tuple)}
    assert classes[r"/api/task/apply/(.+)"] is flower_api.TaskApply
    assert classes[r"/api/task/async-apply/(.+)"] is flower_api.TaskAsyncApply
    assert classes[r"/api/task/send-task/(.+)"] is flower_api.TaskSend
    assert classes[r"/api/task/result/(.+)"] is flower_api.TaskResult
    assert classes[r"/api/task/info/(.*)"] is stock.TaskInfo  # the rest untouched
    assert len(table) == len(flower.urls.handlers)
    without = [
        e for e in flower.urls.handlers if not (isinstance(e, tuple) and e[1] is stock.TaskSend)
    ]
    with pytest.raises(ConfigurationError, match=r"no \(pattern, class\) entry for TaskSend"):
        install(without)


def test_flower_builds_its_routes_from_the_table_install_changes() -> None:
    # Pins Flower internal 1 (tasks/ops/flower_api.py): an upgrade that copies the table fails here.
    import flower.app
    import flower.urls

    assert flower.app.default_handlers is flower.urls.handlers
    assert flower_api.TaskApply.__mro__[1:3] == (
        flower_api.TypedAnswers,
        flower.api.tasks.TaskApply,
    )


class FakeResult:
    """What Flower's result handlers read of a Celery ``AsyncResult``."""

    def __init__(self, state: str, result: Any) -> None:
        self.id, self.task_id, self.backend = "t-1", "t-1", object()
        self.states = iter(["PENDING", state])  # first read before the wait, then after
        self.result, self.traceback = result, "Traceback ..." if state == "FAILURE" else None

    @property
    def state(self) -> str:
        return next(self.states, "SUCCESS" if self.traceback is None else "FAILURE")

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        return self.result

    def ready(self) -> bool:
        return True


def test_flower_reads_results_through_update_response_result_and_safe_result() -> None:
    # Pins Flower internal 3: read_result / wait_results -> update_response_result -> safe_result.
    reply = {"outputs": encode(np.zeros((1, 8), np.float32), binary=True)}
    summary = {"outputs": {"dtype": "float32", "shape": [1, 8], "nbytes": 32}}
    handler = object.__new__(flower_api.TaskResult)  # no request: only the result methods run
    shown = handler.read_result(FakeResult("SUCCESS", reply), timeout=5)
    assert shown == {"task-id": "t-1", "state": "SUCCESS", "result": summary}
    failed = handler.read_result(FakeResult("FAILURE", errors.ShapeMismatch("got [63]")), 5)
    assert failed["state"] == "FAILURE"
    assert failed["result"] == {"error": "ShapeMismatch", "message": "got [63]"}
    applied = object.__new__(flower_api.TaskApply).wait_results(
        FakeResult("SUCCESS", reply), {"task-id": "t-1"}, timeout=5
    )
    assert applied["result"] == summary and applied["state"] == "SUCCESS"


def test_a_real_flower_app_answers_a_refused_call_with_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Pins Flower internals 1, 2 and 4 end to end, in process: the app Flower builds after
    # install() publishes through run_blocking, and the refusal is typed JSON, logged in one line.
    import flower.options
    from flower.app import Flower
    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.ioloop import IOLoop
    from tornado.netutil import bind_sockets

    from tasks import app

    install()
    password = "unit-test-pass"
    options = SimpleNamespace(
        **{**flower.options.default_options.as_dict(), "basic_auth": [f"op:{password}"]}
    )

    async def calls() -> list[tuple[int, str, bytes]]:
        web = Flower(options=options, capp=app, events=SimpleNamespace(), io_loop=IOLoop.current())
        web.add_handlers(
            r".*", [(r"/test/direct", RaisesDirectly), (r"/test/wrapped", RaisesWrapped)]
        )
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(web)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        client = AsyncHTTPClient(force_instance=True)
        answers = []
        try:
            for endpoint, args in (
                ("async-apply", ["mlp", "not a tensor"]),
                ("apply", ["no-such-model", [0.5] * 64]),
                ("async-apply", ["mlp", [0.5] * 64, None, 4]),
            ):
                response = await client.fetch(
                    f"http://127.0.0.1:{port}/api/task/{endpoint}/tasks.infer",
                    method="POST",
                    body=json.dumps({"args": args}),
                    auth_username="op",
                    auth_password=password,
                    raise_error=False,
                    request_timeout=10,
                )
                answers.append(
                    (response.code, response.headers.get("Content-Type", ""), response.body)
                )
            for path in ("/test/direct", "/test/wrapped"):
                response = await client.fetch(
                    f"http://127.0.0.1:{port}{path}", raise_error=False, request_timeout=10
                )
                answers.append(
                    (response.code, response.headers.get("Content-Type", ""), response.body)
                )
        finally:
            client.close()
            server.stop()
            web.executor.shutdown(wait=True)
        return answers

    with caplog.at_level(logging.WARNING):
        answers = asyncio.run(calls())
    expected = [
        ("MalformedPayload", "input of type str is not a tensor"),
        ("UnknownModel", "unknown model 'no-such-model'"),
        ("BadArguments", "got 4 positional arguments"),
        ("ShapeMismatch", "raised in the handler"),  # if Flower ever publishes outside the runner
        ("ShapeMismatch", "wrapped by Flower's runner"),
    ]
    for (code, content_type, body), (name, message) in zip(answers, expected, strict=True):
        assert (code, content_type) == (400, "application/json; charset=UTF-8"), body
        answer = json.loads(body)
        assert answer["error"] == name and message in answer["message"], answer
    # Caught before Flower's runner: no "Blocking operation failed" traceback, one line each.
    assert not [r for r in caplog.records if r.name == "flower.utils.blocking"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.general"]
    assert len(lines) == 3 and lines[0].startswith("400 POST /api/task/async-apply/tasks.infer")
    ours = [r.getMessage() for r in caplog.records if r.name == "tasks.ops.flower_api"]
    assert ours == ["400 GET: ShapeMismatch: raised in the handler"]
    assert all(r.exc_info is None for r in caplog.records)


class RaisesDirectly(flower_api.TypedAnswers):
    def get(self) -> None:
        raise errors.ShapeMismatch("raised in the handler")


class RaisesWrapped(flower_api.TypedAnswers):
    def get(self) -> None:
        from tornado.web import HTTPError

        raise HTTPError(500) from errors.ShapeMismatch("wrapped by Flower's runner")
