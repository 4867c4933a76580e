"""The worker's command line: ``celery -A tasks worker ...`` for one device, and ``python -m tasks.worker``.

compose.yaml, the Dockerfile's default command, the launcher (demo, tests,
benchmarks) and ``make worker`` all start workers with exactly this argv.
"""

from __future__ import annotations

import os
import sys

from routing.queues import direct_queue

__all__ = ["worker_argv", "worker_main"]


def worker_argv(
    name: str,
    device: str,
    queues: list[str] | None = None,
    loglevel: str = "INFO",
) -> list[str]:
    """The ``celery worker`` command line for a worker bound to ``device``.

    ``name`` is the node name prefix (``gpu0@host``).  The worker consumes its
    own direct queue (``gpu.direct.gpu0``) and the shared queue of its device
    class (``gpu`` or ``cpu``), where its direct queue's expired messages fall
    back, unless ``queues`` says otherwise.  compose.yaml uses exactly this.
    """
    device_class = "gpu" if device.startswith("cuda") else "cpu"
    queues = queues or [direct_queue(device_class, name), device_class]
    return [
        "celery",
        "-A",
        "tasks",
        "worker",
        "-n",
        f"{name}@%h",
        "-Q",
        ",".join(queues),
        "-P",
        "prefork",
        "-c",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-l",
        loglevel,
    ]


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m tasks.worker --name cpu0 --device cpu``: exec the celery worker."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.worker", description=worker_main.__doc__)
    parser.add_argument("--name", default="cpu0", help="node name and own queue, e.g. gpu0 or cpu1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument(
        "--batching", action="store_true", help="dynamic batching (one pool job per batch)"
    )
    parser.add_argument(
        "--print", action="store_true", help="print the command instead of running it"
    )
    args = parser.parse_args(argv)
    cmd = worker_argv(args.name, args.device)
    print(" ".join(cmd), flush=True)
    if args.print:
        return 0
    os.environ["INFER_DEVICE"] = args.device
    if args.batching:
        os.environ["INFER_BATCHING"] = "true"
    # Run celery with this interpreter, so a virtualenv need not be on PATH.
    os.execv(sys.executable, [sys.executable, "-m", "celery", *cmd[1:]])  # noqa: S606
    return 1  # pragma: no cover - exec does not return
