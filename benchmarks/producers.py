"""``python -m benchmarks.producers``: one load-generating client of the saturation phase.

One Python client spends about 1 to 1.6 ms in each ``apply_async`` (it waits for
the publisher confirm), so a single client tops out below what a batching
worker can serve, and the window phase then measures the client.  The
saturation phase (``--producers N``) runs N of these processes at once against
one worker.  Each one warms up, prints ``READY``, waits for ``GO`` on stdin,
sends ``--requests`` tasks with ``--window`` in flight, and prints one JSON
line: ``{"sent", "errors", "started", "ended"}`` (``time.time()``, so the parent
can take the span over all producers on this host).

Written here rather than with a load tool (locust and the like) because the
load must be real ``apply_async`` calls through the deployment's own app.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

__all__ = ["main", "request_input"]


def request_input(model: str) -> Any:
    """The one seeded sample every inference lane sends (the model's own sample shape)."""
    import numpy as np

    from models.registry import get_spec

    shape = get_spec(model).sample_shape
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _submit_fn(task: str, model: str, queue: str) -> Any:
    from tasks import infer
    from tasks.diagnostics import noop

    if task == "noop":
        return lambda: noop.apply_async(queue=queue)
    x = request_input(model)
    return lambda: infer.apply_async((model, x), queue=queue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.producers", description=__doc__)
    parser.add_argument("--task", choices=("infer", "noop"), default="infer")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--queue", required=True, help="the worker's own queue")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--window", type=int, required=True)
    args = parser.parse_args(argv)

    submit = _submit_fn(args.task, args.model, args.queue)
    for _ in range(3):  # connections, result consumer, the worker's first requests
        submit().get(timeout=60)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 1
    errors = 0
    in_flight: deque[Any] = deque()

    def settle() -> None:
        nonlocal errors
        try:
            in_flight.popleft().get(timeout=60)
        except Exception:  # counted and reported: the parent fails the round on any error
            errors += 1

    started = time.time()
    for _ in range(args.requests):
        if len(in_flight) >= args.window:
            settle()
        in_flight.append(submit())
    while in_flight:
        settle()
    ended = time.time()
    print(
        json.dumps({"sent": args.requests, "errors": errors, "started": started, "ended": ended}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
