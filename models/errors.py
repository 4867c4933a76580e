"""The project's one error hierarchy.

Pure Python (no torch, no celery), so every package can raise and catch these:
``models`` (input checks, loading), ``routing`` (no capable worker) and
``tasks`` (settings, payload limits).  Celery stores a failed task's exception
as (module, class name, args) in the result backend, and ``AsyncResult.get()``
re-raises the same class on the client, so each class takes one argument: the
message, which always says what to do next.

    InferenceError                 base of everything below
    ├── ConfigurationError         a setting is missing or inconsistent
    ├── RequestError               the caller sent something we refuse (never retried)
    │   ├── UnknownModel
    │   ├── MalformedPayload       not a tensor envelope / cannot be decoded
    │   ├── PayloadTooLarge        over the configured byte limit
    │   ├── UnsupportedDtype       the worker's device cannot run that precision
    │   └── InvalidInput           decoded, but wrong for this model
    │       ├── ShapeMismatch
    │       ├── DtypeMismatch
    │       ├── NonNumericInput
    │       ├── NonFiniteInput     NaN or +/-inf
    │       └── ValueOutOfRange    e.g. a token id >= vocabulary size
    ├── ModelLoadError             weights missing, unreadable or not safetensors
    │   └── UnsafeWeightsFile      a pickle-based file (.pt/.pth/.bin/.pkl) was offered
    ├── ModelTooLarge              a model does not fit the cache budget at all
    ├── NoCapableWorker            no live worker can serve the request (routing)
    ├── ChunkFailed                one chunk of an infer_many job failed (names its range)
    └── TaskCrashed                the task killed its worker on every delivery: dead-lettered
"""

from __future__ import annotations

__all__ = [
    "ChunkFailed",
    "ConfigurationError",
    "DtypeMismatch",
    "InferenceError",
    "InvalidInput",
    "MalformedPayload",
    "ModelLoadError",
    "ModelTooLarge",
    "NoCapableWorker",
    "NonFiniteInput",
    "NonNumericInput",
    "PayloadTooLarge",
    "RequestError",
    "ShapeMismatch",
    "TaskCrashed",
    "UnknownModel",
    "UnsafeWeightsFile",
    "UnsupportedDtype",
    "ValueOutOfRange",
]


class InferenceError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigurationError(InferenceError):
    """A setting is missing, malformed or inconsistent with another one."""


class RequestError(InferenceError):
    """The request itself is wrong; retrying it unchanged can never succeed."""


class UnknownModel(RequestError):
    """The model name is not in the registry."""


class MalformedPayload(RequestError):
    """The input is not a tensor envelope ``{dtype, shape, data}`` or a numeric list."""


class PayloadTooLarge(RequestError):
    """The input is larger than ``INFER_MAX_PAYLOAD_BYTES``."""


class UnsupportedDtype(RequestError):
    """The requested compute precision cannot run on this worker's device."""


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


class ModelLoadError(InferenceError):
    """The model's weights could not be loaded."""


class UnsafeWeightsFile(ModelLoadError):
    """A weights file in a pickle-based format was offered; only safetensors load."""


class ModelTooLarge(InferenceError):
    """A single model needs more memory than the whole cache budget."""


class NoCapableWorker(InferenceError):
    """No live worker satisfies the request's requirements."""


class ChunkFailed(InferenceError):
    """One chunk of an ``infer_many`` job failed; the message names its input range."""


class TaskCrashed(InferenceError):
    """The task killed its worker process on every delivery and was dead-lettered."""
