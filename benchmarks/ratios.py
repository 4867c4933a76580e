"""The figures that count: ratios between the lanes of one run.

Each key keeps its name from the issue that added it (the results file
contract in DESIGN.md); a ratio whose lanes did not run is None.
"""

from __future__ import annotations

from typing import Any

from benchmarks.stats import ratio

__all__ = ["SCALING_COUNTS", "overload_ratios", "ratios", "scaling_ratios"]

SCALING_COUNTS = (1, 2, 4, 8)  # the scaling lane's worker counts that always have a key


def ratios(lanes: dict[str, Any]) -> dict[str, float | None]:
    """The ratios of a results file, from its ``lanes``."""

    def p50(name: str) -> float | None:
        return lanes.get(name, {}).get("rtt_ms", {}).get("p50")

    def p95(name: str) -> float | None:
        return lanes.get(name, {}).get("rtt_ms", {}).get("p95")

    def tput(name: str) -> float | None:
        return lanes.get(name, {}).get("throughput_per_s")

    def cpu(name: str) -> dict[str, float]:
        """CPU ms per request over the saturation phase (infer.map producers) where one ran,
        else over the whole round (closed loop and window phases included)."""
        lane = lanes.get(name, {})
        return dict(
            lane.get("saturated_cpu_ms_per_request") or lane.get("cpu_ms_per_request") or {}
        )

    def worker_cpu(name: str) -> float | None:  # worker main + pool child, ms per request
        figures = cpu(name)
        if "worker_main" not in figures:
            return None
        return float(figures["worker_main"] + figures.get("worker_child", 0.0))

    def max_rate(worker: str) -> float | None:  # open_loop: max req/s with p99 <= 50 ms
        return lanes.get("open_loop", {}).get("max_rate_p99_50ms", {}).get(worker)

    def gain(model: str) -> dict[str, Any]:  # model_gain: one model's served phases
        return dict(lanes.get("model_gain", {}).get("models", {}).get(model) or {})

    def gain_p95(model: str, phase: str) -> float | None:
        return ((gain(model).get(phase) or {}).get("rtt_ms") or {}).get("p95")

    def gain_req_s(model: str, phase: str) -> float | None:
        return (gain(model).get(phase) or {}).get("req_s")

    batched = lanes.get("deployment_infer_batched", {})
    publish = lanes.get("publish", {})
    in_process = lanes.get("in_process", {}).get("by_batch", {})
    infer_rate = lanes.get("deployment_infer", {}).get("samples_per_s")
    floor = p50("amqp_floor")
    noop_p50 = p50("deployment_noop")
    infer_p50 = p50("deployment_infer")
    return {
        "deployment_noop_vs_celery_baseline_p50": ratio(noop_p50, p50("celery_baseline")),
        "deployment_noop_vs_amqp_floor_p50": ratio(noop_p50, floor),
        "celery_baseline_vs_amqp_floor_p50": ratio(p50("celery_baseline"), floor),
        "celery_default_vs_baseline_p50": ratio(p50("celery_default"), p50("celery_baseline")),
        "celery_tuned_vs_baseline_p50": ratio(p50("celery_tuned"), p50("celery_baseline")),
        "dramatiq_vs_celery_baseline_p50": ratio(p50("dramatiq"), p50("celery_baseline")),
        "broker_overhead_ms_noop": round(noop_p50 - floor, 3) if noop_p50 and floor else None,
        "broker_overhead_ms_infer": round(infer_p50 - floor, 3) if infer_p50 and floor else None,
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
        # The window phase's req/s (one client) over Dramatiq's no-op req/s.
        "batched_req_s_vs_dramatiq_noop": ratio(batched.get("throughput_per_s"), tput("dramatiq")),
        # The saturation phase's req/s (--producers; else None) over Dramatiq's no-op req/s.
        "batched_vs_dramatiq_noop_req_s": ratio(batched.get("saturated_req_s"), tput("dramatiq")),
        "chunked_vs_in_process_batch64_samples": ratio(
            lanes.get("deployment_infer_chunked", {}).get("samples_per_s"), in_process.get("64")
        ),
        "deployment_infer_vs_in_process_batch1_samples": ratio(infer_rate, in_process.get("1")),
        "deployment_infer_vs_in_process_batch64_samples": ratio(infer_rate, in_process.get("64")),
        # CPU accounting (benchmarks/cpu.py): CPU ms per request, median of rounds, over the
        # saturation phase where both lanes ran one (the same load shape on both workers).
        "batched_vs_infer_worker_cpu_per_request": ratio(
            worker_cpu("deployment_infer_batched"), worker_cpu("deployment_infer")
        ),
        "batched_total_cpu_ms_per_request": cpu("deployment_infer_batched").get("total"),
        # Publish lane: confirmed messages/s of one infer.map over sequential apply_async.
        "pipelined_vs_sequential_publish_msgs": ratio(
            publish.get("map_msgs_s"), publish.get("sequential_msgs_s")
        ),
        # Open loop (Poisson arrivals): the highest req/s with p99 <= 50 ms, batching / batch 1.
        "open_loop_batched_vs_infer_max_rate_p99": ratio(max_rate("batched"), max_rate("infer")),
        # model_gain: saturated req/s of a batching worker over a batch-1 worker, the same load
        # (INFER_BATCH_RESERVE x the model's batch in flight), on models that compute; beside
        # each, the client round trip's p95 (ms, not a ratio) on the batching and batch-1 worker.
        "batching_gain_resnet50": ratio(
            gain_req_s("resnet50", "batching"), gain_req_s("resnet50", "batch1")
        ),
        "batching_gain_resnet50_p95_ms": gain_p95("resnet50", "batching"),
        "batching_gain_resnet50_batch1_p95_ms": gain_p95("resnet50", "batch1"),
        "batching_gain_minilm": ratio(
            gain_req_s("minilm", "batching"), gain_req_s("minilm", "batch1")
        ),
        "batching_gain_minilm_p95_ms": gain_p95("minilm", "batching"),
        "batching_gain_minilm_batch1_p95_ms": gain_p95("minilm", "batch1"),
        **scaling_ratios(lanes.get("scaling") or {}),
        **overload_ratios(lanes.get("overload") or {}),
    }


def scaling_ratios(lane: dict[str, Any]) -> dict[str, float | None]:
    """The ``scaling`` lane's figures by worker count n (the lane: :mod:`benchmarks.lanes.scaling`).

    ``scaling_rps_<n>w``: saturated req/s of n workers behind the router (not a
    ratio); ``scaling_efficiency_<n>w``: that over n x the 1-worker req/s (1.0:
    linear); ``scaling_cpu_ms_per_request_<n>w``: CPU ms per request of every
    process involved (not a ratio).  Keys for :data:`SCALING_COUNTS` are always
    there (None where that count did not run), plus those of any other count run.
    """
    points = lane.get("points") or {}
    counts = sorted({*SCALING_COUNTS, *(int(n) for n in points)})
    out: dict[str, float | None] = {}
    for n in counts:
        out[f"scaling_rps_{n}w"] = (points.get(str(n)) or {}).get("req_s")
    for n in (n for n in counts if n > 1):
        out[f"scaling_efficiency_{n}w"] = (points.get(str(n)) or {}).get("efficiency")
    for n in counts:
        cpu = (points.get(str(n)) or {}).get("cpu_ms_per_request") or {}
        out[f"scaling_cpu_ms_per_request_{n}w"] = cpu.get("total")
    return out


def overload_ratios(lane: dict[str, Any]) -> dict[str, float | None]:
    """The ``overload`` lane's figures (the lane: :mod:`benchmarks.lanes.overload`).

    ``overload_goodput_4x_vs_1x``: goodput (replies delivered within their
    deadline, per second) at 4x the fleet's capacity over goodput at 1x, with
    admission control on (issue 17's figure: >= 0.9); the same with it off
    (``..._no_admission``); and goodput at 4x with admission on over off
    (``overload_goodput_4x_admission_vs_no_admission``).
    """
    modes = lane.get("modes") or {}

    def goodput(mode: str, factor: float) -> float | None:
        points = (modes.get(mode) or {}).get("points") or []
        return next((p["goodput_req_s"] for p in points if p["factor"] == factor), None)

    return {
        "overload_goodput_4x_vs_1x": ratio(goodput("admission", 4.0), goodput("admission", 1.0)),
        "overload_goodput_4x_vs_1x_no_admission": ratio(
            goodput("no_admission", 4.0), goodput("no_admission", 1.0)
        ),
        "overload_goodput_4x_admission_vs_no_admission": ratio(
            goodput("admission", 4.0), goodput("no_admission", 4.0)
        ),
    }
