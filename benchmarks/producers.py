"""``python -m benchmarks.producers``: one load-generating client of the saturation phase.

One Python client spends about 1 to 1.6 ms in each ``apply_async`` (it waits for
the publisher confirm), so a single client tops out below what a batching
worker can serve, and the window phase then measures the client.  The
saturation phase (``--producers N``) runs N of these processes at once against
one worker.  Each one warms up, prints ``READY``, waits for ``GO`` on stdin,
sends ``--requests`` tasks with ``--window`` in flight, and prints one JSON
line: ``{"sent", "errors", "started", "ended", "cpu_s", "warm_up"}`` (``time.time()``,
so the parent can take the span over all producers on this host; ``cpu_s``: this
process's CPU seconds from GO to the end, for the lanes' CPU accounting;
``warm_up``: the requests it sent before READY).

Pipelined confirms (issue 14): for ``tasks.infer`` (``--task infer``) a
producer publishes with ``infer.map`` (:mod:`tasks.client.publish`), not one
``apply_async`` per request: it keeps two chunks of half its window in
flight, and whenever the older chunk's results are all in, it publishes the
next half window as one ``infer.map``, whose confirms it waits for together.
So at least half the window and at most all of it is in flight, as before,
and a publish costs a fraction of a confirm round trip instead of a whole
one (the ``publish`` lane measures how much), so that one client process
can load a batching worker.  On 2 cores the worker's own CPU stays the
limit: there the change showed no gain beyond the spread between rounds.
A chunk's requests settle one by one, as before: each failed one counts as
an error, and a chunk whose publish fails counts all its requests.  Other
tasks (``--task noop``) still send one ``apply_async`` at a time with a
sliding window.  The report and the lanes' results keys
(``saturated_req_s``, ...) are unchanged; the rates are not comparable with
results files from before the change.

Written here rather than with a load tool (locust and the like) because the
load must be real ``apply_async`` / ``infer.map`` calls through the
deployment's own app.

The parent side is :class:`Saturation`: a lane that has one runs it after each
round's window phase when the plan asks for producers (``saturated_req_s``);
:meth:`Saturation.run` returns a :class:`SaturationResult`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SATURATION_IN_FLIGHT",
    "WARM_UP",
    "Saturation",
    "SaturationResult",
    "main",
    "request_input",
]

SATURATION_IN_FLIGHT = 64  # requests in flight in all, over every producer (a full batch)
WARM_UP = 3  # requests each producer sends before READY


def request_input(model: str) -> Any:
    """The one seeded sample every inference lane sends (the model's own sample shape)."""
    import numpy as np

    from tasks.app import app
    from tasks.wire.catalog import local_catalog

    shape = local_catalog(app.infer_settings).resolve(model).sample_shape
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _submit_fn(task: str, model: str, queue: str) -> Any:
    from tasks import infer
    from tasks.diagnostics import noop

    if task == "noop":
        return lambda: noop.apply_async(queue=queue)
    x = request_input(model)
    return lambda: infer.apply_async((model, x), queue=queue)


@dataclass(frozen=True)
class SaturationResult:
    """One saturation phase: its rate, the requests the worker served, the producers' CPU."""

    req_s: float  # measured requests/s over every producer
    served: int  # every request sent, the producers' warm-up included
    client_cpu_s: float  # the producers' CPU seconds over the measured sends


@dataclass(frozen=True)
class Saturation:
    """The saturation phase of one lane: ``task`` on ``model`` sent to one worker's own ``queue``."""

    task: str  # "infer" or "noop"
    model: str
    queue: str
    window: int = SATURATION_IN_FLIGHT

    def run(self, producers: int, requests: int) -> SaturationResult:
        """``producers`` processes sending ``requests`` in all, ``window`` in flight."""
        each_window = max(1, self.window // producers)
        each = max(each_window, requests // producers)
        argv = [sys.executable, "-m", "benchmarks.producers", "--task", self.task]
        argv += ["--model", self.model, "--queue", self.queue]
        argv += ["--requests", str(each), "--window", str(each_window)]
        procs = [
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(producers)
        ]
        try:
            for p in procs:
                _expect(p, "READY")
            for p in procs:  # all warm: start them together
                assert p.stdin is not None
                p.stdin.write("GO\n")
                p.stdin.flush()
            reports = [json.loads(_expect(p, "{")) for p in procs]
            for p in procs:
                p.wait(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        errors = sum(r["errors"] for r in reports)
        if errors:
            raise RuntimeError(f"saturation phase: {errors} of {each * producers} requests failed")
        span = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
        sent = sum(r["sent"] for r in reports)
        return SaturationResult(
            req_s=float(sent / span),
            served=sent + sum(r["warm_up"] for r in reports),
            client_cpu_s=float(sum(r["cpu_s"] for r in reports)),
        )


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"producer said {line!r}, expected {prefix!r}: {err[-2000:]}")
    return line


def _settle(results: list[Any]) -> int:
    """Wait for each of ``results``; the number that failed."""
    errors = 0
    for result in results:
        try:
            result.get(timeout=60)
        except Exception:  # counted and reported: the parent fails the round on any error
            errors += 1
    return errors


def _send_per_request(submit: Any, requests: int, window: int) -> int:
    """``requests`` calls of ``submit()``, ``window`` in flight (sliding); the errors."""
    errors = 0
    in_flight: deque[Any] = deque()
    for _ in range(requests):
        if len(in_flight) >= window:
            errors += _settle([in_flight.popleft()])
        in_flight.append(submit())
    return errors + _settle(list(in_flight))


def _send_mapped(model: str, queue: str, requests: int, window: int) -> int:
    """``requests`` infer requests as ``infer.map`` chunks of half ``window``; the errors."""
    from tasks import infer

    x = request_input(model)
    chunk = max(1, window // 2)
    errors = 0
    in_flight: deque[Any] = deque()  # MapResults, oldest first
    left = requests
    while left:
        n = min(chunk, left)
        if sum(len(m.results) for m in in_flight) + n > window:
            errors += _settle_map(in_flight.popleft())
        try:
            in_flight.append(infer.map(model, [x] * n, queue=queue))
        except Exception:  # PublishFailed or a connection error: the whole chunk fails
            errors += n
        left -= n
    while in_flight:
        errors += _settle_map(in_flight.popleft())
    return errors


def _settle_map(mapped: Any) -> int:
    """Wait for a whole ``infer.map`` chunk (one MGET, then its results as they come); the errors.

    ``MapResult.get`` is Celery's ``GroupResult`` native join: one read of
    every result at the start, not one GET per request as ``AsyncResult.get``
    does (measured: 13% of a producer's CPU).
    """
    try:
        replies = mapped.get(timeout=60, propagate=False)
    except Exception:  # a timeout: none of the chunk counts as served
        return len(mapped.results)
    return sum(1 for r in replies if isinstance(r, BaseException))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.producers", description=__doc__)
    parser.add_argument("--task", choices=("infer", "noop"), default="infer")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--queue", required=True, help="the worker's own queue")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--window", type=int, required=True)
    args = parser.parse_args(argv)

    if args.task == "infer":  # connections, the confirm channel path, the worker's first requests
        from tasks import infer

        warm = infer.map(args.model, [request_input(args.model)] * WARM_UP, queue=args.queue)
        warm.get(timeout=60)
    else:
        submit = _submit_fn(args.task, args.model, args.queue)
        for _ in range(WARM_UP):  # connections, result consumer, the worker's first requests
            submit().get(timeout=60)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 1
    started, cpu_started = time.time(), time.process_time()
    if args.task == "infer":
        errors = _send_mapped(args.model, args.queue, args.requests, args.window)
    else:
        errors = _send_per_request(submit, args.requests, args.window)
    ended, cpu_s = time.time(), time.process_time() - cpu_started
    report = {"sent": args.requests, "errors": errors, "started": started, "ended": ended}
    print(json.dumps({**report, "cpu_s": cpu_s, "warm_up": WARM_UP}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
