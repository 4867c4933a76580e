"""A thin helper API over stock Celery calls, for application code.

Everything here is a convenience: ``infer.apply_async(...)`` and
``AsyncResult.get()`` work the same without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.inference import infer
from tasks.wire.codec import NO_LIMIT, decode

__all__ = ["outputs", "predict"]


def outputs(result: dict[str, Any]) -> np.ndarray:
    """The output array of an ``infer`` result dict."""
    return decode(result["outputs"], NO_LIMIT)


def predict(
    model: str, inputs: Any, dtype: str | None = None, timeout: float = 60.0, **options: Any
) -> np.ndarray:
    """Submit one request with ``infer.apply_async`` and wait for its outputs.

    ``options`` go to ``apply_async`` unchanged (``queue=``, ``priority=``, ...).
    Typed errors from :mod:`models.errors` propagate as raised by the worker.
    """
    result = infer.apply_async((model, inputs, dtype), **options)
    return outputs(result.get(timeout=timeout, interval=0.005))
