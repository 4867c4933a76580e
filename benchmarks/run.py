"""Run every lane in one process, interleaved A B C A B C ..., and assemble the results file."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery
from rich.progress import Progress

from benchmarks import vanilla
from benchmarks.lanes import (
    AmqpFloorLane,
    CeleryLane,
    ChunkedLane,
    DramatiqLane,
    InProcessLane,
    Lane,
    RoundConfig,
    RoundResult,
    rss_mb,
)
from benchmarks.machine import machine_info
from benchmarks.producers import request_input
from benchmarks.router_lane import RouterLane
from benchmarks.stats import median_of_rounds, percentiles, ratio
from routing.queues import direct_queue
from tasks import app, infer, noop
from tasks.client.routes import wait_for_workers
from tasks.ops.launcher import WorkerProcess
from tasks.wire.codec import encode

__all__ = ["Plan", "run"]

MODEL = "cnn"
BATCHES = (1, 64)
BATCHED_WINDOW = 64  # single-sample requests in flight for the dynamic batching lane


@dataclass(frozen=True)
class Plan:
    rounds: int
    round: RoundConfig
    device: str
    lanes: tuple[str, ...] | None = None  # None: every lane

    @classmethod
    def quick(cls, device: str) -> Plan:
        return cls(3, RoundConfig(requests=100, window=8, window_requests=200), device)

    @classmethod
    def full(cls, device: str) -> Plan:
        return cls(5, RoundConfig(requests=1000, window=16, window_requests=2000), device)


def _vanilla_lane(
    profile: str, run: str, logdir: Path, broker: str, backend: str, serializer: str
) -> CeleryLane:
    queue = f"bench-vanilla-{profile}-{run}"
    conf = vanilla.config(profile, broker, backend, serializer)
    client = Celery(f"vanilla-{profile}", set_as_current=False)
    client.conf.update(conf)
    env = dict(os.environ, BENCH_VANILLA_PROFILE=profile)
    if conf["result_backend"] != backend:
        # Celery reads CELERY_RESULT_BACKEND before its configuration: keep it
        # out of this peer's worker, and name the backend on the client app.
        env.pop("CELERY_RESULT_BACKEND", None)
        client.backend_cls = conf["result_backend"]
    task = client.task(name="vanilla.noop")(vanilla.noop.run)
    worker = WorkerProcess(
        f"vanilla-{profile}-{run}",
        "cpu",
        logdir=logdir,
        env=env,
        command=vanilla.worker_command(profile, f"vanilla-{profile}-{run}", queue),
    )
    return CeleryLane(f"celery_{profile}", lambda: task.apply_async(queue=queue), worker)


def build_lanes(plan: Plan, logdir: Path) -> list[Lane]:
    settings = app.infer_settings
    run = uuid.uuid4().hex[:6]
    broker, backend = settings.broker, settings.backend
    lanes: list[Lane] = [AmqpFloorLane(broker, logdir)]
    lanes += [
        _vanilla_lane(p, run, logdir, broker, backend, settings.serializer)
        for p in vanilla.PROFILES
    ]
    # The deployment lanes go through the capability router: no queue= given.
    shared = f"bench-deploy-{run}"
    name = f"bench-{run}"
    deploy = _RoutedWorker(
        name,
        plan.device,
        logdir=logdir,
        queues=[direct_queue(shared, name), shared],
        preload=(MODEL,),
    )

    # The saturation phase (--producers) addresses each worker's own queue from other
    # processes, so it measures the worker rather than one client's publish rate.
    def producer_args(task: str, queue: str) -> list[str]:
        return ["--task", task, "--model", MODEL, "--queue", queue]

    lanes.append(
        CeleryLane(
            "deployment_noop",
            lambda: noop.apply_async(),
            deploy,
            saturate=producer_args("noop", deploy.own_queue),
            saturate_window=BATCHED_WINDOW,
        )
    )
    x = request_input(MODEL)
    # Same worker process as deployment_noop: started once, stopped once.
    lanes.append(
        _SharedWorkerLane(
            "deployment_infer",
            lambda: infer.apply_async((MODEL, x)),
            deploy,
            saturate=producer_args("infer", deploy.own_queue),
            saturate_window=BATCHED_WINDOW,
        )
    )
    # Dynamic batching: a threads-pool worker of its own; many single-sample requests in flight.
    bname = f"bench-b-{run}"
    batched = WorkerProcess(
        bname,
        plan.device,
        logdir=logdir,
        batching=True,
        preload=(MODEL,),
        queues=[direct_queue(f"bench-b-{run}", bname), f"bench-b-{run}"],
        # Out of the router's sight, so the routed lanes keep measuring the batch-1 worker.
        env=dict(os.environ, INFER_REGISTRY_NAMESPACE=f"bench-batched-{run}"),
    )
    lanes.append(
        CeleryLane(
            "deployment_infer_batched",
            lambda: infer.apply_async((MODEL, x), queue=batched.own_queue),
            batched,
            window=BATCHED_WINDOW,
            saturate=producer_args("infer", batched.own_queue),
        )
    )
    lanes.append(ChunkedLane(MODEL, max(BATCHES), x.shape, deploy.own_queue))
    peer_python = os.environ.get("BENCH_CELERY_BATCHES_PYTHON")
    if (
        peer_python
    ):  # celery-batches needs celery < 5.7: its own environment (make celery-batches-venv)
        lanes.append(
            _celery_batches_lane(peer_python, run, logdir, settings.broker, settings.backend, x)
        )
    if importlib.util.find_spec("dramatiq") is not None:  # optional peer: pip install '.[peers]'
        lanes.append(DramatiqLane(logdir))
    lanes.append(RouterLane())
    assert settings.weights_dir is not None
    lanes.append(
        InProcessLane(MODEL, BATCHES, plan.device, settings.torch_threads, settings.weights_dir)
    )
    if plan.lanes:
        lanes = [lane for lane in lanes if lane.name in plan.lanes]
    return lanes


def _celery_batches_lane(
    python: str, run: str, logdir: Path, broker: str, backend: str, x: np.ndarray
) -> CeleryLane:
    queue = f"bench-cb-{run}"
    client = Celery("celery-batches-client", set_as_current=False)
    client.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
    )
    envelope = encode(x, binary=True)
    name = f"cb-{run}"
    worker = WorkerProcess(
        name,
        "cpu",
        logdir=logdir,
        python=python,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        command=[
            "celery",
            "-A",
            "benchmarks.celery_batches_peer",
            "worker",
            "-n",
            f"{name}@%h",
            "-Q",
            queue,
            "-P",
            "prefork",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ],
    )
    return CeleryLane(
        "celery_batches",
        lambda: client.send_task("celery_batches_peer.infer", args=(envelope,), queue=queue),
        worker,
        window=BATCHED_WINDOW,
    )


class _RoutedWorker(WorkerProcess):
    """The deployment's worker: ready once the router's registry has its heartbeat."""

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        super().wait_ready(timeout)
        wait_for_workers(app.router, {self.hostname}, timeout)
        return self


class _SharedWorkerLane(CeleryLane):
    """A second lane on a worker another lane owns: it neither starts nor stops it."""

    def start(self) -> None:
        pass

    def wait_ready(self) -> None:
        self.warm_up()

    def stop(self) -> None:
        pass


def run(plan: Plan) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Run the plan; return the results file content and the pooled latency samples."""
    settings = app.infer_settings
    if settings.embedded or not settings.broker.startswith(("amqp", "pyamqp")):
        raise SystemExit(
            "the benchmark compares against raw AMQP, so it needs RabbitMQ and Redis: set "
            "CELERY_BROKER_URL=amqp://... and CELERY_RESULT_BACKEND=redis://... (make bench sets "
            "the local defaults)"
        )
    logdir = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    lanes = build_lanes(plan, logdir)
    rounds: dict[str, list[RoundResult]] = {lane.name: [] for lane in lanes}
    memory: dict[str, float | None] = {}
    client_rss: float | None = None
    try:
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.wait_ready()
        with Progress(transient=True) as progress:
            job = progress.add_task("benchmark", total=plan.rounds * len(lanes))
            for r in range(plan.rounds):
                for lane in lanes:
                    if lane.name == "in_process" and client_rss is None:
                        # Before in_process loads torch here; without the lanes' worker subprocesses.
                        client_rss = rss_mb(os.getpid(), children=False)
                    progress.update(job, description=f"round {r + 1}/{plan.rounds} {lane.name}")
                    rounds[lane.name].append(lane.run_round(plan.round))
                    progress.advance(job)
        for lane in lanes:
            memory[lane.name] = lane.rss_mb()
    finally:
        for lane in lanes:
            lane.stop()
    if client_rss is None:
        client_rss = rss_mb(os.getpid(), children=False)
    results = {name: _summarise(name, rs, memory.get(name)) for name, rs in rounds.items()}
    if "deployment_noop" in results:  # the real router's own figures from the routed lanes
        results["deployment_noop"]["router_stats"] = app.router.stats.as_dict()
    samples = {
        name: [ms for r in rs for ms in r.rtt_ms] for name, rs in rounds.items() if rs[0].rtt_ms
    }
    return {
        "schema": 1,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(
            settings.broker, settings.backend, settings.serializer, plan.device
        ),
        "plan": {
            "rounds": plan.rounds,
            "requests": plan.round.requests,
            "window": plan.round.window,
            "window_requests": plan.round.window_requests,
            "producers": plan.round.producers,
            "saturation_in_flight": BATCHED_WINDOW if plan.round.producers else None,
            "model": MODEL,
        },
        "lanes": results,
        "ratios": ratios(results),
        "memory_mb": {
            "client_rss": client_rss,
            **{f"{k}_worker_rss": v for k, v in memory.items() if v},
        },
    }, samples


def _summarise(name: str, rounds: list[RoundResult], worker_rss: float | None) -> dict[str, Any]:
    if name == "router":
        figures = median_of_rounds([r.samples_per_s for r in rounds])
        return {
            "decision_us_p99": figures["decision_p99_us"],
            "sticky_hit_rate": figures["sticky_hit_rate"],
            "registry": "64 workers x 16 models (decisions); 8 models over 4 workers (hit rate)",
            "rounds": len(rounds),
        }
    if name == "deployment_infer_chunked":
        by_batch = median_of_rounds([r.samples_per_s for r in rounds])
        ((batch, rate),) = by_batch.items()
        return {"model": MODEL, "batch": int(batch), "samples_per_s": rate, "rounds": len(rounds)}
    if name == "in_process":
        by_batch = median_of_rounds([r.samples_per_s for r in rounds])
        top = str(max(BATCHES))
        return {
            "model": MODEL,
            "batch": int(top),
            "samples_per_s": by_batch[top],
            "by_batch": by_batch,
            "rounds": len(rounds),
        }
    lane: dict[str, Any] = {
        "rtt_ms": median_of_rounds([percentiles(r.rtt_ms) for r in rounds]),
        "throughput_per_s": median_of_rounds([{"v": r.throughput_per_s} for r in rounds])["v"],
        "publish_us": median_of_rounds([{"v": r.publish_us or 0.0} for r in rounds])["v"],
        "requests": sum(len(r.rtt_ms) for r in rounds),
        "rounds": len(rounds),
        "worker_rss_mb": worker_rss,
    }
    saturated = [r.saturated_per_s for r in rounds if r.saturated_per_s is not None]
    if saturated:
        lane["saturated_req_s"] = median_of_rounds([{"v": v} for v in saturated])["v"]
    if name in ("deployment_infer", "deployment_infer_batched", "celery_batches"):
        lane.update(model=MODEL, samples_per_s=lane["throughput_per_s"])
    if name == "deployment_infer_batched":
        lane["window"] = BATCHED_WINDOW
    keys = rounds[0].breakdown_ms.keys()
    if keys:
        lane["breakdown_ms"] = {
            k: percentiles([ms for r in rounds for ms in r.breakdown_ms.get(k, [])]) for k in keys
        }
    return lane


def ratios(lanes: dict[str, Any]) -> dict[str, float | None]:
    """The figures that count: ratios between lanes of one run."""

    def p50(name: str) -> float | None:
        return lanes.get(name, {}).get("rtt_ms", {}).get("p50")

    def p95(name: str) -> float | None:
        return lanes.get(name, {}).get("rtt_ms", {}).get("p95")

    def tput(name: str) -> float | None:
        return lanes.get(name, {}).get("throughput_per_s")

    batched = lanes.get("deployment_infer_batched", {})
    in_process = lanes.get("in_process", {}).get("by_batch", {})
    infer_rate = lanes.get("deployment_infer", {}).get("samples_per_s")
    floor = p50("amqp_floor")
    noop_p50 = p50("deployment_noop")
    return {
        "deployment_noop_vs_celery_baseline_p50": ratio(noop_p50, p50("celery_baseline")),
        "deployment_noop_vs_amqp_floor_p50": ratio(noop_p50, floor),
        "celery_baseline_vs_amqp_floor_p50": ratio(p50("celery_baseline"), floor),
        "celery_default_vs_baseline_p50": ratio(p50("celery_default"), p50("celery_baseline")),
        "celery_tuned_vs_baseline_p50": ratio(p50("celery_tuned"), p50("celery_baseline")),
        "dramatiq_vs_celery_baseline_p50": ratio(p50("dramatiq"), p50("celery_baseline")),
        "broker_overhead_ms_noop": round(noop_p50 - floor, 3) if noop_p50 and floor else None,
        "broker_overhead_ms_infer": (
            round(p50("deployment_infer") - floor, 3) if p50("deployment_infer") and floor else None  # type: ignore[operator]
        ),
        "router_decision_p99_us": lanes.get("router", {}).get("decision_us_p99"),
        "router_sticky_hit_rate": lanes.get("router", {}).get("sticky_hit_rate"),
        "batched_vs_infer_samples": ratio(batched.get("samples_per_s"), infer_rate),
        "batched_vs_celery_batches_samples": ratio(
            batched.get("samples_per_s"), lanes.get("celery_batches", {}).get("samples_per_s")
        ),
        # Saturation phase (--producers): the workers' capacity, several clients at once.
        "batched_vs_infer_saturated_req_s": ratio(
            batched.get("saturated_req_s"), lanes.get("deployment_infer", {}).get("saturated_req_s")
        ),
        "batched_vs_noop_saturated_req_s": ratio(
            batched.get("saturated_req_s"), lanes.get("deployment_noop", {}).get("saturated_req_s")
        ),
        "batched_vs_infer_p95": ratio(
            batched.get("rtt_ms", {}).get("p95"), p95("deployment_infer")
        ),
        "batched_req_s_vs_celery_baseline_noop": ratio(
            batched.get("throughput_per_s"), tput("celery_baseline")
        ),
        "batched_req_s_vs_celery_tuned_noop": ratio(
            batched.get("throughput_per_s"), tput("celery_tuned")
        ),
        "batched_req_s_vs_dramatiq_noop": ratio(batched.get("throughput_per_s"), tput("dramatiq")),
        "chunked_vs_in_process_batch64_samples": ratio(
            lanes.get("deployment_infer_chunked", {}).get("samples_per_s"), in_process.get("64")
        ),
        "deployment_infer_vs_in_process_batch1_samples": ratio(infer_rate, in_process.get("1")),
        "deployment_infer_vs_in_process_batch64_samples": ratio(infer_rate, in_process.get("64")),
    }
