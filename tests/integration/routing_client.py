"""A client application that routes requests and exports its router's metrics.

``python -m tests.integration.routing_client --port P --worker NODE --model M ...``

What an application does to put its router on the dashboard: it calls
``tasks.worker.metrics.serve(port, app=app)``.  This one waits until the
workers advertise, serves ``/metrics``, prints ``ready``, then sends one
routed request per model every ``--period`` seconds and waits for each
result, until SIGTERM or ``--seconds`` have passed (bounded either way).
tests/integration/test_prometheus.py runs it beside real workers, so that the
router's decisions and sticky hit ratio reach Prometheus.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.routing_client")
    parser.add_argument("--port", type=int, required=True, help="its /metrics port")
    parser.add_argument("--worker", action="append", required=True, help="a worker's node name")
    parser.add_argument("--model", action="append", required=True, help="a model to request")
    parser.add_argument("--period", type=float, default=0.25, help="seconds between rounds")
    parser.add_argument("--seconds", type=float, default=180.0, help="stop after this long")
    args = parser.parse_args(argv)

    from tasks import app, infer
    from tasks.client.routes import wait_for_workers
    from tasks.ops.demo import sample_inputs
    from tasks.worker import metrics
    from tests.specs import spec_of

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    wait_for_workers(app.router, set(args.worker))
    if not metrics.serve(args.port, app=app):
        print(f"routing client: cannot serve metrics on port {args.port}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds
    seed = 0
    while not stop.is_set() and time.monotonic() < deadline:
        for model in args.model:
            seed += 1
            try:
                infer.apply_async((model, sample_inputs(spec_of(model), 1, seed))).get(timeout=30)
            except Exception as e:  # reported, and the next round goes on
                print(f"routing client: {model}: {type(e).__name__}: {e}", file=sys.stderr)
        stop.wait(args.period)
    return 0


if __name__ == "__main__":
    sys.exit(main())
