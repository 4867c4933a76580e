"""The multihost ledgers as one results file, and the docs table rendered from it.

``python -m tests.multihost.table --save benchmarks/results/multihost-DATE.json``
gathers ``var/multihost/<scenario>.json`` (written by the last run of
``make multihost``), leaving out the per-request arrays;
``python -m tests.multihost.table benchmarks/results/multihost-DATE.json``
prints the markdown table that docs/beyond-one-machine.md carries between
its ``multihost:begin``/``multihost:end`` markers (a unit test checks that
the page's table is this rendering of the committed file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "gather", "render"]

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "var" / "multihost"
BULKY = {"completions", "publishes", "latencies", "line"}

SCENARIOS = {
    "broker_leader_kill": "1. `kill -9` of the node leading the class queue",
    "broker_minority_partition": "2. One broker node cut off from the other two, then healed",
    "worker_host_cut": "3. A worker host cut off for 15 s, then healed",
    "client_host_cut": "4. The client host cut off while publishing",
    "worker_link_netem": "5. A worker host's link: +20 ms, 1% loss",
    "worker_redis_outage": "6. Redis unreachable from a worker host for 10 s",
    "asymmetric_no_redis": "7a. A worker host reaches the brokers, not Redis",
    "asymmetric_no_brokers": "7b. A worker host reaches Redis, not the brokers",
}


def gather(runs: Path = RUNS) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for name in SCENARIOS:
        path = runs / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            scenarios[name] = {k: v for k, v in record.items() if k not in BULKY}
    return {
        "schema": "multihost/1",
        "date": date.today().isoformat(),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "scale": "full"
        if scenarios and all(r.get("scale") == "full" for r in scenarios.values())
        else "reduced",
        "scenarios": scenarios,
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def render(results: dict[str, Any]) -> str:
    lines = [
        "| Scenario | submitted | succeeded | failed (typed) | lost | unpublished (typed) | run twice | what was measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, title in SCENARIOS.items():
        record = results["scenarios"].get(name)
        if record is None:
            lines.append(f"| {title} | not run | | | | | | |")
            continue
        ledger = record["ledger"]
        failed = sum(ledger["failed"].values())
        lines.append(
            f"| {title} | {ledger['submitted']} | {ledger['succeeded']} | {failed} | "
            f"**{ledger['lost']}** | {ledger['unpublished']} | {ledger['duplicates']} | "
            f"{record.get('summary', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.multihost.table", description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, help="a committed results file to render")
    parser.add_argument("--save", type=Path, help="gather var/multihost/ into this file")
    args = parser.parse_args(argv)
    if args.save is not None:
        results = gather()
        args.save.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    elif args.results is not None:
        results = json.loads(args.results.read_text())
    else:
        results = gather()
    sys.stdout.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
