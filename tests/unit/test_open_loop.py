"""The pure parts of the ``open_loop`` lane and the ratios it feeds (no broker, no worker)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lanes.base import RoundConfig
from benchmarks.lanes.open_loop import (
    FACTORS,
    P99_TARGET_MS,
    PointRound,
    max_rate_within,
    poisson_schedule,
    summarise_points,
    sweep,
)
from benchmarks.plots import open_loop_plot
from benchmarks.ratios import ratios
from benchmarks.report import open_loop_rows, render, rows

ROOT = Path(__file__).resolve().parents[2]


def test_the_poisson_schedule_is_seeded_increasing_and_has_the_asked_rate() -> None:
    times = poisson_schedule(200.0, 20_000, seed=7)
    assert times == poisson_schedule(200.0, 20_000, seed=7)  # the same seed, the same schedule
    assert times != poisson_schedule(200.0, 20_000, seed=8)
    assert len(times) == 20_000
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(g >= 0 for g in gaps) and times[0] > 0
    # Exponential gaps: mean 1/rate and standard deviation 1/rate (seeded, so exact each run).
    assert statistics.fmean(gaps) == pytest.approx(1 / 200, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 200, rel=0.05)


@pytest.mark.parametrize(("rate", "n"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_the_poisson_schedule_refuses_nonsense(rate: float, n: int) -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        poisson_schedule(rate, n, seed=0)


def _point(
    achieved: float, p99: float | None, errors: int = 0, timeouts: int = 0
) -> dict[str, Any]:
    latency = None if p99 is None else {"p50": 1.0, "p95": p99, "p99": p99}
    return {
        "achieved_req_s": achieved,
        "latency_ms": latency,
        "errors": errors,
        "timeouts": timeouts,
    }


def test_max_rate_is_the_highest_achieved_rate_whose_p99_meets_the_target() -> None:
    points = [
        _point(50.0, 8.0),
        _point(100.0, 20.0),
        _point(150.0, 50.0),  # on the bound: counts
        _point(170.0, 50.1),  # over it
        _point(140.0, 900.0),
    ]
    assert max_rate_within(points) == 150.0
    assert max_rate_within(points, target_ms=10.0) == 50.0


def test_a_point_with_an_error_a_timeout_or_no_latency_does_not_count() -> None:
    points = [
        _point(50.0, 8.0),
        _point(100.0, 9.0, errors=1),
        _point(120.0, 9.0, timeouts=2),
        _point(130.0, None),
    ]
    assert max_rate_within(points) == 50.0
    assert max_rate_within(points[1:]) is None
    assert max_rate_within([]) is None


def test_points_pool_their_rounds() -> None:
    a = PointRound(1.0, 100.0, latency_ms=[1.0, 2.0, 3.0], requests=4, errors=1)
    a.sent_per_s, a.achieved_req_s = 99.0, 90.0
    b = PointRound(1.0, 100.0, latency_ms=[4.0, 5.0], requests=2, timeouts=0)
    b.sent_per_s, b.achieved_req_s = 101.0, 110.0
    c = PointRound(1.0, 100.0, latency_ms=[6.0], requests=3, timeouts=2)
    c.sent_per_s, c.achieved_req_s = 100.0, 50.0
    (point,) = summarise_points([[a], [b], [c]])
    assert point["factor"] == 1.0 and point["offered_req_s"] == 100.0
    assert point["sent_per_s"] == 100.0 and point["achieved_req_s"] == 90.0  # medians
    assert point["requests"] == 9 and point["errors"] == 1 and point["timeouts"] == 2
    assert point["latency_ms"]["p50"] == 3.5  # 1..6 pooled
    assert point["per_round"]["achieved_req_s"] == [90.0, 110.0, 50.0]
    assert point["per_round"]["latency_ms.p99"][2] is None  # one sample: no percentile
    # The summary's points are what max_rate_within reads.
    assert max_rate_within([point], target_ms=P99_TARGET_MS) is None  # it had errors


def test_the_sweep_scales_with_the_plan() -> None:
    full, quick, tiny = (
        sweep(RoundConfig(requests=1, window=16, window_requests=w)) for w in (2000, 200, 16)
    )
    assert full == (FACTORS["full"], 3.0)
    assert quick == (FACTORS["quick"], 0.5)
    assert tiny == (FACTORS["tiny"], 0.25)
    for factors, _ in (full, quick, tiny):
        assert factors[0] == 0.25 and factors[-1] == 3.0 and list(factors) == sorted(factors)


def test_the_new_ratios_from_a_fake_run() -> None:
    lanes: dict[str, Any] = {
        "deployment_infer": {"saturated_req_s": 200.0, "samples_per_s": 150.0},
        "deployment_infer_batched": {"saturated_req_s": 300.0, "throughput_per_s": 250.0},
        "dramatiq": {"throughput_per_s": 1000.0},
        "deployment_infer_chunked": {"samples_per_s": 1000.0},
        "in_process": {"by_batch": {"1": 2000.0, "64": 4000.0}},
        "open_loop": {"max_rate_p99_50ms": {"infer": 120.0, "batched": 180.0}},
    }
    got = ratios(lanes)
    assert got["batched_vs_dramatiq_noop_req_s"] == 0.3  # saturated batched / Dramatiq no-op
    assert got["batched_req_s_vs_dramatiq_noop"] == 0.25  # the older key: the window phase
    assert got["chunked_vs_in_process_batch64_samples"] == 0.25
    assert got["batched_vs_infer_saturated_req_s"] == 1.5
    assert got["open_loop_batched_vs_infer_max_rate_p99"] == 1.5
    # A worker that never met the target: no ratio.
    lanes["open_loop"]["max_rate_p99_50ms"]["infer"] = None
    assert ratios(lanes)["open_loop_batched_vs_infer_max_rate_p99"] is None


def test_every_named_ratio_key_is_there_even_when_its_lanes_did_not_run() -> None:
    keys = set(ratios({}))
    assert {
        "batched_vs_dramatiq_noop_req_s",
        "batched_req_s_vs_dramatiq_noop",
        "chunked_vs_in_process_batch64_samples",
        "deployment_noop_vs_celery_baseline_p50",
        "batched_vs_infer_saturated_req_s",
        "pipelined_vs_sequential_publish_msgs",
        "batched_vs_infer_worker_cpu_per_request",
        "batched_total_cpu_ms_per_request",
        "open_loop_batched_vs_infer_max_rate_p99",
    } <= keys
    assert all(v is None for v in ratios({}).values())


def _open_loop_lane() -> dict[str, Any]:
    def points(scale: float) -> list[dict[str, Any]]:
        return [
            {
                "factor": f,
                "offered_req_s": 100.0 * f,
                "sent_per_s": 100.0 * f,
                "achieved_req_s": min(100.0 * f, 100.0 * scale),
                "latency_ms": {"p50": 3.0 * f, "p95": 9.0 * f, "p99": 30.0 * f, "mean": 4.0 * f},
                "requests": 50,
                "errors": 0,
                "timeouts": 0,
            }
            for f in (0.5, 1.0, 2.0)
        ]

    infer, batched = points(1.0), points(1.5)
    return {
        "capacity_req_s": 100.0,
        "capacity_source": "measured",
        "capacity_figures": {"measured": 100.0},
        "factors": [0.5, 1.0, 2.0],
        "duration_s": 0.5,
        "p99_target_ms": P99_TARGET_MS,
        "rounds": 3,
        "worker_rss_mb": 300.0,
        "workers": {"infer": {"points": infer}, "batched": {"points": batched}},
        "max_rate_p99_50ms": {"infer": max_rate_within(infer), "batched": max_rate_within(batched)},
    }


def test_the_report_and_the_plot_show_the_sweep(tmp_path: Path) -> None:
    result = json.loads((ROOT / "benchmarks/results/cpu-2026-11-26.json").read_text())
    result["lanes"]["open_loop"] = lane = _open_loop_lane()
    assert lane["max_rate_p99_50ms"] == {"infer": 100.0, "batched": 100.0}  # 2x: p99 60 ms
    (row,) = [r for r in rows(result) if r[0] == "open_loop"]
    assert "100 (infer) / 100 (batched)" in row[8]
    sweep_rows = open_loop_rows(result)
    assert len(sweep_rows) == 6 and sweep_rows[0][:2] == ("infer", "0.5")
    text = render(result, "x.json")
    assert "| worker | offered x |" in text and "| batched | 2 | 200 |" in text
    assert open_loop_rows({"lanes": {}}) == []
    png = open_loop_plot(lane, tmp_path / "ol.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
