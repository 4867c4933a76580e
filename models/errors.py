"""The project's one error hierarchy.

Pure Python (no torch, no celery), so every package can raise and catch these:
``models`` (input checks, loading), ``routing`` (no capable worker) and
``tasks`` (settings, payload limits).  Celery stores a failed task's exception
as (module, class name, args) in the result backend, and ``AsyncResult.get()``
re-raises the same class on the client, so each class takes one argument: the
message, which always says what to do next.  A value the caller sent is
echoed through :func:`echo`, which cuts it short.

    InferenceError                 base of everything below
    ├── ConfigurationError         a setting is missing or inconsistent
    ├── RequestError               the caller sent something we refuse (never retried)
    │   ├── BadArguments           tasks.infer called with the wrong arguments
    │   ├── BadRequirements        a ``requires`` header that is not a valid requirement
    │   ├── MalformedMessage       a message no worker can run (undecodable, refused type, unknown task)
    │   ├── UnknownModel           no source (local or advertised) knows the model
    │   │   └── UnknownVersion     the model exists, that version does not
    │   ├── MalformedPayload       not a tensor envelope / cannot be decoded (a blob's bad length or hash too)
    │   ├── InputExpired           a claim-checked input's blob is gone from Redis (expired or already used)
    │   ├── PayloadTooLarge        over the configured byte limit
    │   ├── UnsupportedDtype       the worker's device cannot run that precision
    │   ├── DeadlineExceeded       its deadline (``expires=`` or a ``deadline`` header) passed: never computed
    │   └── InvalidInput           decoded, but wrong for this model
    │       ├── ShapeMismatch
    │       ├── DtypeMismatch
    │       ├── NonNumericInput
    │       ├── NonFiniteInput     NaN or +/-inf
    │       ├── ValueOutOfRange    e.g. a token id >= vocabulary size
    │       └── InvalidText        a text model's input that is not usable text
    │           ├── NonTextInput   not a string or a list of strings
    │           ├── EmptyText      an empty (or whitespace-only) string
    │           ├── InvalidUtf8    bytes that are not UTF-8, or a lone surrogate
    │           ├── TooManyTexts   more strings than the model's max_strings
    │           └── TextTooLong    more tokens than the model's max_tokens (no truncation)
    ├── ModelLoadError             weights missing, unreadable or not safetensors
    │   └── UnsafeWeightsFile      a pickle-based file (.pt/.pth/.bin/.pkl) was offered
    ├── ModelTooLarge              a model does not fit the cache budget at all
    ├── NoCapableWorker            no live worker can serve the request (routing)
    ├── Overloaded                 refused at submit: the expected wait exceeds its deadline, or the queue is full
    ├── ChunkFailed                one chunk of an infer_many job failed (names its range)
    ├── PublishFailed              pipelined publishes not confirmed by the broker (names their task ids)
    └── TaskCrashed                the task killed its worker on every delivery: dead-lettered
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DTYPE_NAMES",
    "ECHO_CHARS",
    "BadArguments",
    "BadRequirements",
    "ChunkFailed",
    "ConfigurationError",
    "DeadlineExceeded",
    "DtypeMismatch",
    "EmptyText",
    "InferenceError",
    "InputExpired",
    "InvalidInput",
    "InvalidText",
    "InvalidUtf8",
    "MalformedMessage",
    "MalformedPayload",
    "ModelLoadError",
    "ModelTooLarge",
    "NoCapableWorker",
    "NonFiniteInput",
    "NonNumericInput",
    "NonTextInput",
    "Overloaded",
    "PayloadTooLarge",
    "PublishFailed",
    "RequestError",
    "ShapeMismatch",
    "TaskCrashed",
    "TextTooLong",
    "TooManyTexts",
    "UnknownModel",
    "UnknownVersion",
    "UnsafeWeightsFile",
    "UnsupportedDtype",
    "ValueOutOfRange",
    "echo",
    "unknown_dtype",
    "unsupported_dtype",
]

ECHO_CHARS = 80  # the most of a caller's value that a message repeats
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # compute precisions; ``auto`` and None pick one


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters and marked when cut."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters, cut)"


def unknown_dtype(dtype: object) -> UnsupportedDtype:
    """The error for a precision name that is not fp32, fp16, bf16 or auto (the same on every path)."""
    return UnsupportedDtype(
        f"dtype {echo(dtype)} is not a precision: use fp32, fp16, bf16 or auto "
        "(auto: half precision on a GPU where the model allows it, else fp32)"
    )


def unsupported_dtype(dtype: str, where: str, supported: Iterable[str]) -> UnsupportedDtype:
    """The error for a precision ``where`` cannot run (a worker's device, or the live fleet)."""
    return UnsupportedDtype(
        f"dtype {dtype!r} is not supported on {where} (supported: {', '.join(supported) or 'none'}): "
        "ask for fp32 or auto, or send it where it runs (a GPU worker for fp16)"
    )


class InferenceError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigurationError(InferenceError):
    """A setting is missing, malformed or inconsistent with another one."""


class RequestError(InferenceError):
    """The request itself is wrong; retrying it unchanged can never succeed."""


class BadArguments(RequestError):
    """``tasks.infer`` was called with arguments it does not take: ``(model, inputs, dtype=None)``."""


class BadRequirements(RequestError):
    """A ``requires`` header that is not a mapping of known requirements with valid values."""


class MalformedMessage(RequestError):
    """A message no worker can run: undecodable body, refused content type or unknown task.

    The worker dead-letters it and stores this failure for its task id (read
    from the headers, never from the body), so the caller's ``get()`` raises.
    """


class UnknownModel(RequestError):
    """No model source knows the name: not the worker's nor client's repository, nor an advertisement."""


class UnknownVersion(UnknownModel):
    """The model is known, but not the requested version (``name@version``)."""


class MalformedPayload(RequestError):
    """The input is not a tensor envelope ``{dtype, shape, data}`` or a numeric list."""


class InputExpired(RequestError):
    """A claim-checked input's blob is no longer in Redis (its TTL ran out, or it was used).

    Resubmit the request; raise ``INFER_CLAIM_CHECK_TTL_S`` on the client if
    requests wait in the queue longer than it.
    """


class PayloadTooLarge(RequestError):
    """The input is larger than ``INFER_MAX_PAYLOAD_BYTES``."""


class UnsupportedDtype(RequestError):
    """The requested compute precision cannot run on this worker's device."""


class DeadlineExceeded(RequestError):
    """The request's deadline passed before it could be computed; it never was.

    Raised at submit (the deadline is already past), or stored as the
    request's result by the worker that dropped it: in its consumer, or just
    before its batch's forward pass.  Send it again with a later deadline.
    """


class InvalidInput(RequestError):
    """The input decoded fine but does not fit the model's input spec."""


class ShapeMismatch(InvalidInput):
    """The input's shape is neither the model's sample shape nor a batch of it."""


class DtypeMismatch(InvalidInput):
    """The input's dtype is not one the model accepts."""


class NonNumericInput(InvalidInput):
    """The input holds strings, objects or booleans instead of numbers."""


class NonFiniteInput(InvalidInput):
    """The input holds NaN or infinity, which the model refuses."""


class ValueOutOfRange(InvalidInput):
    """An integer input lies outside the model's accepted range."""


class InvalidText(InvalidInput):
    """A text model's input is not usable text."""


class NonTextInput(InvalidText):
    """A text model got something other than a string or a list of strings."""


class EmptyText(InvalidText):
    """An empty or whitespace-only string (it has no tokens to embed)."""


class InvalidUtf8(InvalidText):
    """Bytes that do not decode as UTF-8, or a string holding a lone surrogate."""


class TooManyTexts(InvalidText):
    """More strings in one request than the model's ``max_strings``."""


class TextTooLong(InvalidText):
    """A string longer than the model's ``max_tokens`` (and its ``model.toml`` does not truncate)."""


class ModelLoadError(InferenceError):
    """The model's weights could not be loaded."""


class UnsafeWeightsFile(ModelLoadError):
    """A weights file in a pickle-based format was offered; only safetensors load."""


class ModelTooLarge(InferenceError):
    """A single model needs more memory than the whole cache budget."""


class NoCapableWorker(InferenceError):
    """No live worker satisfies the request's requirements."""


class Overloaded(InferenceError):
    """Refused at submit, nothing published: the fleet cannot serve the request in time.

    Either the expected wait (advertised backlog over measured service rate)
    exceeds the request's deadline, or the broker refused the publish because
    the class queue is at ``INFER_MAX_QUEUE_LENGTH``.  Retry later, with a
    longer deadline, or add workers.
    """


class ChunkFailed(InferenceError):
    """One chunk of an ``infer_many`` job failed; the message names its input range."""


class PublishFailed(InferenceError):
    """Messages of one pipelined publish were nacked, unconfirmed in time, or never sent.

    ``task_ids`` holds every such id (the message names the first few); the
    other messages of the call are confirmed and will run.
    """

    task_ids: tuple[str, ...] = ()


class TaskCrashed(InferenceError):
    """The task killed its worker process on every delivery and was dead-lettered."""
