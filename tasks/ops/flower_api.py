"""Typed answers from Flower's task API: a refused call is a 4xx with its error, a result is JSON.

Stock Flower runs ``task.apply_async`` and ``capp.send_task`` through its
``BlockingOperationRunner``, which turns *any* exception into ``HTTPError(500)``
with an empty body: a call our client refuses (``BadArguments``,
``ShapeMismatch``, ``NoCapableWorker``, ...) shows only as a traceback in
Flower's log.  And ``/api/task/result/<id>`` returns a result that ``json``
cannot encode as its Python ``repr``, raw tensor bytes included.  Here:

- a call refused with a :class:`~models.errors.InferenceError` answers
  ``{"error": "<class name>", "message": "<its message>"}`` with
  :func:`status_for`'s code (400 for the caller's mistake, 503 when no live
  worker can serve it), and nothing is published; any other exception keeps
  Flower's answer;
- a result is JSON: each tensor envelope ``{dtype, shape, data}`` becomes
  ``{"dtype", "shape", "nbytes"}`` (never its data), other bytes
  ``"<N bytes>"``, and a failed task's exception
  ``{"error": "<class name>", "message": "<its message>"}`` (:func:`jsonable`);
  and ``result/<id>?timeout=`` gives the state the result was read in, not
  the one before it waited.

Why a subclass and not a patch of site-packages: the fix must survive a
reinstall, and Flower has no hook for either.  :func:`install` puts subclasses
of four handlers in Flower's URL table before the launcher builds the app; each
subclass fills in a few narrow methods (:class:`TypedAnswers`).  The Flower
internals this relies on (flower 2.2.0), checked by :func:`install` where it
can (it refuses to start Flower without them) and pinned by
``tests/unit/test_flower_launcher.py`` (a real Flower app over HTTP), so an
upgrade that moves one fails loudly instead of losing the behaviour:

1. ``flower.urls.handlers`` is the very list ``flower.app.Flower`` builds its
   routes from (``flower.app`` imports it as ``default_handlers``), and holds
   ``(pattern, class)`` entries for ``TaskApply``, ``TaskAsyncApply``,
   ``TaskSend`` and ``TaskResult`` of ``flower.api.tasks``;
2. those handlers publish (and wait, and read results) through
   ``self.run_blocking(operation, target, func, *args, connection_errors=..., **kwargs)``
   of ``flower.api.BaseApiHandler``;
3. they make a result JSON-safe with ``self.safe_result(value)`` inside
   ``self.update_response_result(response, result)``, called once the result is
   ready, both of ``flower.api.tasks.BaseTaskHandler``;
4. errors are written by ``write_error`` and logged by ``log_exception``
   (tornado's ``RequestHandler`` API; ``BaseApiHandler`` overrides the first).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, MutableSequence
from typing import Any, NamedTuple

import flower.app
import flower.urls
from flower.api import BaseApiHandler
from flower.api import tasks as flower_tasks
from tornado.web import HTTPError

from models.errors import (
    ConfigurationError,
    InferenceError,
    NoCapableWorker,
    Overloaded,
    RequestError,
)
from tasks.wire.codec import display, estimated_nbytes, is_envelope, redact_bytes

__all__ = [
    "Refused",
    "TaskApply",
    "TaskAsyncApply",
    "TaskResult",
    "TaskSend",
    "TypedAnswers",
    "error_body",
    "install",
    "jsonable",
    "status_for",
    "tensor_summary",
]

logger = logging.getLogger(__name__)


def status_for(error: InferenceError) -> int:
    """The HTTP status Flower answers for a call refused with ``error``.

    400 Bad Request: a :class:`RequestError` (``BadArguments``,
    ``BadRequirements``, ``UnknownModel``, ``ShapeMismatch``, ...): the call is
    wrong and can never succeed unchanged.  503 Service Unavailable:
    :class:`NoCapableWorker`, no live worker can serve it now (start one, or
    relax the ``requires`` header), or :class:`Overloaded`, not before its
    deadline (retry later).  500 for any other project error (a
    ``ConfigurationError``, say): the deployment's fault, not the caller's.
    """
    if isinstance(error, NoCapableWorker | Overloaded):
        return 503
    if isinstance(error, RequestError):
        return 400
    return 500


def error_body(error: BaseException) -> dict[str, str]:
    """``{"error": class name, "message": its message}``: how an error shows in JSON."""
    return {"error": type(error).__name__, "message": str(error)}


def tensor_summary(envelope: dict[str, Any]) -> dict[str, Any]:
    """``{"dtype", "shape", "nbytes"}`` of a tensor envelope; its data is never shown."""
    dtype, shape, data = envelope["dtype"], envelope["shape"], envelope["data"]
    dims_ok = isinstance(shape, list | tuple) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    )
    nbytes = estimated_nbytes(envelope)  # from dtype and shape: the same under msgpack and json
    if nbytes is None and isinstance(data, bytes | bytearray | memoryview):
        nbytes = len(data)
    return {
        "dtype": dtype if isinstance(dtype, str) else display(dtype),
        "shape": list(shape) if dims_ok else display(shape),
        "nbytes": nbytes,
    }


def jsonable(value: Any) -> Any:
    """A task result (or a failed task's exception) as JSON, safe to show.

    Tensor envelopes are summarised (:func:`tensor_summary`), other bytes
    become ``"<N bytes>"``, an exception :func:`error_body`; anything else
    that JSON cannot hold becomes a short text with no bytes in it.
    """
    if isinstance(value, BaseException):
        return error_body(value)
    if is_envelope(value):
        return tensor_summary(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else display(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return redact_bytes(display(value))  # bytes -> "<N bytes>"; other objects: a cut repr


class Caught(NamedTuple):
    """A project error a blocking call raised, handed back across Flower's runner."""

    error: InferenceError


def catching(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, returning :class:`Caught` instead of raising a project error."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InferenceError as e:
            return Caught(e)

    return call


class Refused(HTTPError):
    """A call the project refused: answered with :func:`status_for` and :func:`error_body`."""

    def __init__(self, error: InferenceError) -> None:
        # Logged by tornado as one warning line (no traceback): "400 POST /api/...: Class: message".
        super().__init__(status_for(error), "%s: %s", type(error).__name__, error)
        self.error = error


def refused_error(exc_info: Any) -> InferenceError | None:
    """The project error behind a failed request, if any: ours, raised directly, or wrapped.

    Besides :class:`Refused`, this finds an :class:`InferenceError` that
    reached tornado unwrapped or as the cause of Flower's ``HTTPError(500)``,
    so the answer stays typed if Flower ever publishes outside ``run_blocking``.
    """
    exc = exc_info[1] if exc_info else None
    while exc is not None:
        if isinstance(exc, Refused):
            return exc.error
        if isinstance(exc, InferenceError):
            return exc
        exc = exc.__cause__
    return None


class TypedAnswers(BaseApiHandler):
    """Mixin for Flower's task API handlers: typed refusals, JSON results (module docstring)."""

    async def run_blocking(
        self,
        operation: str,
        target: str,
        func: Callable[..., Any],
        *args: Any,
        connection_errors: tuple[type[BaseException], ...] = (),
        **kwargs: Any,
    ) -> Any:
        # Caught inside the executor, so Flower's runner neither logs a traceback for a
        # caller's mistake nor turns it into an empty 500.
        outcome = await super().run_blocking(
            operation, target, catching(func), *args, connection_errors=connection_errors, **kwargs
        )
        if isinstance(outcome, Caught):
            raise Refused(outcome.error)
        return outcome

    def safe_result(self, result: Any) -> Any:
        return jsonable(result)

    def update_response_result(self, response: dict[str, Any], result: Any) -> None:
        super().update_response_result(response, result)
        # Stock ``result/<id>?timeout=`` reads the state before it waits: a result beside
        # "PENDING".  Called once the result is there, so the state is read again.
        response["state"] = result.state

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = refused_error(kwargs.get("exc_info"))
        if error is None:
            super().write_error(status_code, **kwargs)
            return
        self.set_status(status_for(error))
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(error_body(error)))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        error = None if isinstance(value, HTTPError) else refused_error((typ, value, tb))
        if error is None:
            super().log_exception(typ, value, tb)
        else:  # a project error that reached tornado unwrapped: one line, as for Refused
            logger.warning(
                "%d %s: %s: %s", status_for(error), self.request.method, type(error).__name__, error
            )


class TaskApply(TypedAnswers, flower_tasks.TaskApply):
    """``POST /api/task/apply/<name>``: publish and wait."""


class TaskAsyncApply(TypedAnswers, flower_tasks.TaskAsyncApply):
    """``POST /api/task/async-apply/<name>``: publish."""


class TaskSend(TypedAnswers, flower_tasks.TaskSend):
    """``POST /api/task/send-task/<name>``: publish by name (the router still checks)."""


class TaskResult(TypedAnswers, flower_tasks.TaskResult):
    """``GET /api/task/result/<id>``."""


REPLACEMENTS: dict[Any, type] = {
    flower_tasks.TaskApply: TaskApply,
    flower_tasks.TaskAsyncApply: TaskAsyncApply,
    flower_tasks.TaskSend: TaskSend,
    flower_tasks.TaskResult: TaskResult,
}


def install(handlers: MutableSequence[Any] | None = None) -> None:
    """Put this module's handlers in Flower's URL table (``flower.urls.handlers``); idempotent.

    Call it before ``flower.app.Flower`` is built.  :class:`ConfigurationError`
    if this Flower does not have the internals the module docstring lists.
    """
    if handlers is None:
        if flower.app.default_handlers is not flower.urls.handlers:
            raise _incompatible(
                "flower.app.Flower no longer builds its routes from flower.urls.handlers"
            )
        handlers = flower.urls.handlers
    for stock in REPLACEMENTS:
        for method in ("run_blocking", "safe_result", "update_response_result", "write_error"):
            if not callable(getattr(stock, method, None)):
                raise _incompatible(f"{stock.__qualname__} has no {method}()")
    missing = set(REPLACEMENTS)
    for i, entry in enumerate(handlers):
        if not isinstance(entry, tuple) or len(entry) < 2:
            continue
        stock = next((s for s, ours in REPLACEMENTS.items() if entry[1] in (s, ours)), None)
        if stock is not None:
            handlers[i] = (entry[0], REPLACEMENTS[stock], *entry[2:])
            missing.discard(stock)
    if missing:
        names = ", ".join(sorted(s.__qualname__ for s in missing))
        raise _incompatible(f"its URL table has no (pattern, class) entry for {names}")


def _incompatible(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"this Flower ({getattr(flower, '__version__', '?')}) does not fit "
        f"tasks/ops/flower_api.py (written for flower 2.2.0): {what}. Install the flower "
        "version in constraints.txt, or update tasks/ops/flower_api.py and its tests"
    )
