"""``python -m benchmarks``: every lane side by side in one run, as JSON, a table and plots.

Lanes (one file each under benchmarks/lanes/, the plan in benchmarks/run.py):
amqp_floor (raw pika round trip), celery_baseline / celery_default /
celery_tuned (vanilla Celery), deployment_noop, deployment_infer,
deployment_infer_batched and deployment_infer_chunked (ours), celery_batches
and dramatiq (optional peers), router (its decisions, in process), publish
(confirmed publishes), in_process (the CNN forward pass, batch 1 and 64),
open_loop (Poisson arrivals at a sweep of offered rates, batch-1 and batching
worker), model_gain (resnet50 and minilm: in process, served at batch 1 and
with dynamic batching).  All on the broker and backend the environment
configures, interleaved over several rounds.

``python -m benchmarks LANE[,LANE...] [options]`` runs only those lanes (the
same as ``--lanes``), e.g. ``python -m benchmarks model_gain --quick --json
PATH``.  ``python -m benchmarks burst`` runs the 10,000-task burst (lane
``burst``, merged into the results file); ``python -m benchmarks scaling
[--workers 1,2,4] --json PATH`` runs the worker-scaling lane alone, with
options of its own (:mod:`benchmarks.lanes.scaling`), into a results file of
its own; ``python -m benchmarks overload [--quick] --json PATH`` runs the
overload lane alone (goodput at 0.5x to 4x the fleet's capacity, admission
control on and off, :mod:`benchmarks.lanes.overload`), likewise; ``python -m benchmarks compare BEFORE AFTER`` sets two results files
side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.lanes.base import RoundConfig
from benchmarks.plots import write_plots
from benchmarks.report import print_table
from benchmarks.run import LANES, Plan, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["burst"]:  # python -m benchmarks burst: the 10,000-task burst (make chaos)
        from benchmarks.lanes.burst import main as burst

        return burst(argv[1:])
    if argv[:1] == ["scaling"]:  # python -m benchmarks scaling --workers 1,2,4 --json PATH
        from benchmarks.lanes.scaling import main as scaling

        return scaling(argv[1:])
    if argv[:1] == ["overload"]:  # python -m benchmarks overload [--quick] --json PATH
        from benchmarks.lanes.overload import main as overload

        return overload(argv[1:])
    if argv[:1] == ["compare"]:  # python -m benchmarks compare BEFORE.json AFTER.json
        from benchmarks.compare import main as compare

        return compare(argv[1:])
    names = [cls.name for cls in LANES]
    if argv[:1] and not argv[0].startswith("-"):  # python -m benchmarks model_gain --quick ...
        argv = ["--lanes", argv[0], *argv[1:]]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="3 short rounds (a few minutes on 2 cores)"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("var/bench/latest.json"), help="results file"
    )
    parser.add_argument(
        "--device", default="auto", help="device of the inference lanes: cpu, cuda:N, auto"
    )
    parser.add_argument(
        "--rounds", type=int, help="override the number of interleaved rounds (>= 3)"
    )
    parser.add_argument("--requests", type=int, help="override closed-loop requests per round")
    parser.add_argument("--window-requests", type=int, help="override windowed requests per round")
    parser.add_argument(
        "--lanes", help="comma-separated subset of lanes (or name them first): " + ", ".join(names)
    )
    parser.add_argument(
        "--producers",
        type=int,
        default=0,
        help="client processes of the saturation phase of the deployment lanes (0: skip it); "
        "one client cannot outpace a batching worker, see benchmarks/producers.py",
    )
    args = parser.parse_args(argv)
    if args.lanes and (unknown := sorted(set(args.lanes.split(",")) - set(names))):
        parser.error(f"no lane named {', '.join(unknown)}: the lanes are {', '.join(names)}")

    plan = Plan.quick(args.device) if args.quick else Plan.full(args.device)
    rc = plan.round
    plan = replace(
        plan,
        rounds=max(3, args.rounds or plan.rounds),
        round=RoundConfig(
            requests=max(2, args.requests or rc.requests),
            window=rc.window,
            window_requests=max(rc.window, args.window_requests or rc.window_requests),
            producers=max(0, args.producers),
        ),
        lanes=tuple(args.lanes.split(",")) if args.lanes else None,
    )
    result, samples = run(plan)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    stem = args.json.with_suffix("")
    plots = write_plots(samples, result["lanes"], stem)
    print_table(result, args.json.as_posix())
    print(f"wrote {args.json}, " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
