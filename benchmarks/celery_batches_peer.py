"""The celery-batches peer: ``celery -A benchmarks.celery_batches_peer worker`` (optional).

celery-batches pins celery < 5.7, so it cannot live in the project's
environment (Celery 5.7); ``make celery-batches-venv`` builds
``.venv-celery-batches`` with Celery 5.6 for it, and the benchmark's
``celery_batches`` lane runs when that environment exists.  It serves the same
CNN on the same broker and backend, one sample per request, batched by
celery-batches (``flush_every`` 64, ``flush_interval`` 5 ms, the same limits as
our batcher), so the two batchers are compared side by side in one run.
Configuration is read lazily from CELERY_BROKER_URL / CELERY_RESULT_BACKEND.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery_batches import Batches

__all__ = ["app", "infer"]

app = Celery("celery_batches_peer")
app.add_defaults(
    lambda: {
        "broker_url": os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
        "result_backend": os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        # celery-batches needs many messages reserved to form batches.
        "worker_prefetch_multiplier": 0,
    }
)

_model: Any = None


def _forward(batch: Any) -> Any:
    global _model
    import torch

    from models.loader import load_model
    from models.runner import forward
    from models.zoo import source

    if _model is None:
        torch.set_num_threads(1)
        weights = os.environ.get("INFER_WEIGHTS_DIR", "var/weights")
        from pathlib import Path

        cnn = next(e for e in source(Path(weights)) if e.name == "cnn").default
        _model = load_model(cnn, torch.device("cpu"), torch.float32)
    return forward(_model, batch, torch.device("cpu"), "fp32")[0]


@app.task(base=Batches, flush_every=64, flush_interval=0.005, name="celery_batches_peer.infer")
def infer(requests: list[Any]) -> None:
    """One forward pass over every buffered request; each gets its own result."""
    import numpy as np

    samples = [
        np.frombuffer(r.args[0]["data"], dtype=r.args[0]["dtype"]).reshape(r.args[0]["shape"])
        for r in requests
    ]
    outputs = _forward(np.stack(samples))
    for request, row in zip(requests, outputs, strict=True):
        app.backend.mark_as_done(
            request.id,
            {
                "dtype": "float32",
                "shape": [len(row)],
                "data": row.tobytes(),
                "batch": len(requests),
            },
            request=request,
        )
