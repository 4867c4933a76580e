"""The harness runs end to end in a tiny mode on the real broker (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUND_TRIP_LANES = (
    "deployment_infer_batched",
    "amqp_floor",
    "celery_baseline",
    "celery_default",
    "celery_tuned",
    "deployment_noop",
    "deployment_infer",
    "dramatiq",
)


@pytest.mark.timeout(540)  # every lane, model_gain's four resnet50/minilm workers included
def test_tiny_run_writes_json_table_and_plots(tmp_path: Path, weights_dir: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--rounds",
            "3",
            "--requests",
            "5",
            "--window-requests",
            "16",
            "--device",
            "cpu",
            "--producers",
            "2",
            "--json",
            str(out_json),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out_json.read_text())
    assert result["schema"] == 1
    machine = result["machine"]
    assert machine["cpus"] >= 1 and machine["broker"] == "amqp" and machine["backend"] == "redis"
    assert machine["rabbitmq"] and machine["redis"] and machine["torch"] and machine["celery"]
    lanes = result["lanes"]
    assert set(lanes) == {
        *ROUND_TRIP_LANES,
        "router",
        "in_process",
        "deployment_infer_chunked",
        "publish",
        "open_loop",
        "model_gain",
    }
    assert lanes["deployment_infer_chunked"]["samples_per_s"] > 0
    # The publish lane: sequential apply_async vs one infer.map, both confirmed, per round.
    publish = lanes["publish"]
    assert publish["messages"] == 16 and publish["rounds"] == 3
    assert publish["sequential_msgs_s"] > 0 and publish["map_msgs_s"] > 0
    assert len(publish["per_round"]["map_msgs_s"]) == 3
    assert len(publish["per_round"]["sequential_msgs_s"]) == 3
    assert result["ratios"]["pipelined_vs_sequential_publish_msgs"] > 0
    assert result["ratios"]["batched_vs_infer_samples"] > 0
    assert lanes["router"]["decision_us_p99"] > 0 and 0 < lanes["router"]["sticky_hit_rate"] <= 1
    assert (
        lanes["deployment_noop"]["router_stats"]["decisions"] > 0
    )  # the lanes went through the router
    for name in ROUND_TRIP_LANES:
        lane = lanes[name]
        assert lane["rounds"] == 3 and lane["requests"] == 15, name
        assert 0 < lane["rtt_ms"]["p50"] <= lane["rtt_ms"]["p95"] <= lane["rtt_ms"]["p99"], name
        assert lane["throughput_per_s"] > 0 and lane["publish_us"] > 0, name
        assert lane["worker_rss_mb"] > 0, name
        # Per-round figures for compare, and CPU accounting of every process involved.
        assert len(lane["per_round"]["rtt_ms.p50"]) == 3, name
        assert len(lane["per_round"]["throughput_per_s"]) == 3, name
        cpu = lane["cpu_ms_per_request"]
        assert {"client", "worker_main", "worker_child", "total"} <= set(cpu), name
        assert all(v >= 0 for v in cpu.values()) and cpu["total"] >= cpu["client"], name
    assert lanes["deployment_infer"]["samples_per_s"] > 0
    # The saturation phase: 2 producer processes per deployment lane, every request answered.
    assert result["plan"]["producers"] == 2
    for name in ("deployment_noop", "deployment_infer", "deployment_infer_batched"):
        assert lanes[name]["saturated_req_s"] > 0, name
    assert "saturated_req_s" not in lanes["celery_baseline"]
    assert result["ratios"]["batched_vs_infer_saturated_req_s"] > 0
    assert len(lanes["deployment_infer_batched"]["per_round"]["saturated_req_s"]) == 3
    assert lanes["deployment_infer"]["cpu_ms_per_request"]["total"] > 0
    assert result["ratios"]["batched_vs_infer_worker_cpu_per_request"] > 0
    assert result["ratios"]["batched_total_cpu_ms_per_request"] > 0
    assert len(lanes["deployment_infer_chunked"]["per_round"]["samples_per_s"]) == 3
    assert lanes["deployment_infer"]["breakdown_ms"]["compute_ms"]["p50"] > 0
    assert lanes["in_process"]["by_batch"]["1"] > 0 and lanes["in_process"]["by_batch"]["64"] > 0
    assert result["ratios"]["deployment_noop_vs_celery_baseline_p50"] > 0
    assert result["memory_mb"]["client_rss"] > 0
    # The open loop: a tiny Poisson sweep (3 rates) against each worker, every request counted.
    open_loop = lanes["open_loop"]
    assert open_loop["rounds"] == 3 and len(open_loop["factors"]) == 3
    # deployment_infer ran first in the round: its saturated figure was one of the candidates.
    assert "deployment_infer.saturated_req_s" in open_loop["capacity_figures"]
    assert open_loop["capacity_req_s"] == max(open_loop["capacity_figures"].values())
    for worker in ("infer", "batched"):
        points = open_loop["workers"][worker]["points"]
        assert [p["factor"] for p in points] == open_loop["factors"], worker
        for p in points:
            assert p["requests"] >= 3 * 16 and p["errors"] == 0, (worker, p)
            assert p["achieved_req_s"] > 0 and p["sent_per_s"] > 0, (worker, p)
            latency = p["latency_ms"]
            assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], (worker, p)
        assert worker in open_loop["max_rate_p99_50ms"]
        assert len(open_loop["per_round"][f"max_rate_p99_50ms.{worker}"]) == 3
    assert "open_loop_batched_vs_infer_max_rate_p99" in result["ratios"]
    # Model gain: resnet50 and minilm, each in process, on a batch-1 and a batching worker.
    gain = lanes["model_gain"]
    assert gain["rounds"] == 3 and set(gain["models"]) == {"resnet50", "minilm"}
    for model, figures in gain["models"].items():
        assert figures["batch"] == 4 and figures["in_flight"] == 8, model  # tiny plan: capped
        assert all(v > 0 for v in figures["in_process"]["by_batch"].values()), model
        for phase in ("batch1", "batching"):
            served = figures[phase]
            assert served["req_s"] > 0 and served["requests"] >= 3 * 8, (model, phase)
            assert 0 < served["rtt_ms"]["p50"] <= served["rtt_ms"]["p95"], (model, phase)
        assert figures["batch1"]["forward_batch_mean"] == 1.0, model
        assert figures["batching"]["forward_batch_mean"] >= 1.0, model
        assert result["ratios"][f"batching_gain_{model}"] > 0, model
        assert result["ratios"][f"batching_gain_{model}_p95_ms"] > 0, model
        assert len(gain["per_round"][f"gain.{model}"]) == 3, model
    assert "Model gain on" in proc.stdout
    for suffix in ("-latency-cdf.png", "-throughput.png", "-open-loop.png"):
        png = tmp_path / f"bench{suffix}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "deployment_noop_vs_celery_baseline_p50" in proc.stdout  # the terminal table
    assert "CPU ms per request" in proc.stdout
    assert "Open loop: Poisson arrivals" in proc.stdout
