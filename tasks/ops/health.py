"""``python -m tasks.ops.health ready --node NODE``: is this worker one the router can use?

A Kubernetes readiness probe (``deploy/kubernetes/``) runs it inside a worker's
pod.  Ready means what a client's router needs of the worker, read where the
router reads it, the capability registry (:func:`tasks.wire.backend.registry_store`):

1. the worker's record is there (it has started, preloaded and beaten once);
2. its heartbeat is younger than two heartbeat intervals (``2 x
   INFER_HEARTBEAT_S``, the record's own expiry), so the process that owns
   the device is alive and beating;
3. its ``accepting`` field is true: it can consume (a broker answers and its
   consumer is not reconnecting).

Exit 0 and one line saying so when ready; otherwise exit 1 and one line saying
why not (a probe's output shows in the pod's events).  ``--node`` takes the
worker's ``-n`` value as ``celery worker`` does, ``%h`` and all
(``$POD_NAME@%h``), expanded by Celery's own rule.  Nothing connects at import.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from routing.capabilities import WorkerCapabilities
from routing.registry import RedisStore, RegistryStore

__all__ = ["find_record", "main", "node_name", "not_ready", "ready"]


def node_name(pattern: str) -> str:
    """The node name ``celery worker -n PATTERN`` takes on this host (``%h``, ``%n``, ``%d``)."""
    from celery.utils.nodenames import default_nodename, host_format

    return str(host_format(default_nodename(pattern)))


def not_ready(
    record: WorkerCapabilities | None, node: str, now: float, heartbeat_s: float
) -> str | None:
    """Why ``node`` (its ``record``, None if absent) is not ready at ``now``; None when it is."""
    if record is None:
        return (
            f"{node} is not in the registry: not started or still preloading, or it has not "
            "beaten for two heartbeats (its record expired)"
        )
    age = now - record.heartbeat
    limit = 2 * heartbeat_s
    if age >= limit:
        return (
            f"{node}: last heartbeat {age:.1f} s ago, not younger than 2 x INFER_HEARTBEAT_S "
            f"= {limit:g} s: the process that owns the device is not beating"
        )
    if not record.accepting:
        return (
            f"{node} is not accepting: it cannot consume (no broker answers, or its consumer "
            "is reconnecting)"
        )
    return None


def find_record(store: RegistryStore, node: str) -> WorkerCapabilities | None:
    """``node``'s record in ``store``: one GET on Redis, else a scan of the records."""
    if isinstance(store, RedisStore):
        raw = store.client.get(store.prefix + node)
        return None if raw is None else WorkerCapabilities.from_json(raw)
    return next((r for r in store.load() if r.name == node), None)


def ready(
    node: str, store: RegistryStore, heartbeat_s: float, now: Callable[[], float] = time.time
) -> tuple[bool, str]:
    """(ready, the line to print) for ``node``, read from ``store`` once."""
    try:
        record = find_record(store, node)
    except Exception as e:  # the registry is down or unreadable: not ready, and say why
        return False, f"{node}: cannot read the registry: {type(e).__name__}: {e}"
    at = now()
    why = not_ready(record, node, at, heartbeat_s)
    if record is None or why is not None:
        return False, why or f"{node} is not in the registry"
    age = max(at - record.heartbeat, 0.0)
    return True, f"{node} ready: heartbeat {age:.1f} s ago, accepting, queue {record.queue}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.ops.health", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "ready", help="exit 0 if the worker is registered, beating and accepting"
    )
    check.add_argument(
        "--node", required=True, help="the worker's -n value, e.g. cpu0@%%h or $POD_NAME@%%h"
    )
    args = parser.parse_args(argv)

    from models.errors import ConfigurationError
    from tasks.settings import Settings
    from tasks.wire.backend import registry_store

    try:
        settings = Settings.from_env()
    except ConfigurationError as e:
        print(f"not ready: {e}", file=sys.stderr, flush=True)
        return 1
    node = node_name(args.node)
    ok, line = ready(node, registry_store(settings), settings.heartbeat_s)
    print(line, file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
