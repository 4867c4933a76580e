from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.report import BEGIN, END, render, rows, splice
from benchmarks.run import ratios
from benchmarks.stats import cdf, median_of_rounds, percentiles, ratio

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _committed() -> tuple[str, dict[str, object]]:
    marker = (ROOT / "README.md").read_text().split("Source: `", 1)[1].split("`", 1)[0]
    return marker, json.loads((ROOT / marker).read_text())


def test_readme_results_block_is_generated_from_the_committed_json() -> None:
    source, result = _committed()
    assert source.startswith("benchmarks/results/")
    readme = (ROOT / "README.md").read_text()
    assert f"{BEGIN}\n{render(result, source)}\n{END}" in readme


def test_every_results_table_in_the_readme_is_generated_from_its_json() -> None:
    readme = (ROOT / "README.md").read_text()
    sources = re.findall(r"Source: `(benchmarks/results/[^`]+\.json)`", readme)
    assert len(sources) >= 2  # the CPU run and the GPU run
    for source in sources:
        assert render(json.loads((ROOT / source).read_text()), source) in readme, source


def test_splice_replaces_only_the_block() -> None:
    text = f"a\n{BEGIN}\nold\n{END}\nb"
    assert splice(text, "new") == f"a\n{BEGIN}\nnew\n{END}\nb"
    with pytest.raises(ValueError, match="markers"):
        splice("no markers", "x")


def test_percentiles_on_known_input() -> None:
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["mean"]) == (50.5, 95.05, 99.01, 50.5)
    with pytest.raises(ValueError):
        percentiles([1.0])


def test_median_of_rounds_and_ratio() -> None:
    rounds = [{"p50": 3.0, "p99": 9.0}, {"p50": 1.0, "p99": 30.0}, {"p50": 2.0, "p99": 10.0}]
    assert median_of_rounds(rounds) == {"p50": 2.0, "p99": 10.0}
    with pytest.raises(ValueError):
        median_of_rounds([])
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_cdf() -> None:
    assert cdf([3.0, 1.0, 2.0, 4.0]) == ([1.0, 2.0, 3.0, 4.0], [0.25, 0.5, 0.75, 1.0])


def _lane(p50: float, tput: float = 100.0) -> dict[str, object]:
    return {
        "rtt_ms": {"p50": p50, "p95": p50, "p99": p50},
        "throughput_per_s": tput,
        "publish_us": 10.0,
        "worker_rss_mb": 50.0,
    }


def test_ratios_and_rows_on_known_lanes() -> None:
    lanes = {
        "amqp_floor": _lane(1.0),
        "celery_baseline": _lane(2.0),
        "deployment_noop": {**_lane(2.2), "saturated_req_s": 900.0},
        "deployment_infer": {**_lane(4.0, 250.0), "samples_per_s": 250.0, "saturated_req_s": 300.0},
        "deployment_infer_batched": {**_lane(5.0, 400.0), "saturated_req_s": 750.0},
        "in_process": {"by_batch": {"1": 1000.0, "64": 5000.0}},
    }
    r = ratios(lanes)
    assert r["deployment_noop_vs_celery_baseline_p50"] == 1.1
    assert r["deployment_noop_vs_amqp_floor_p50"] == 2.2
    assert r["broker_overhead_ms_noop"] == 1.2 and r["broker_overhead_ms_infer"] == 3.0
    assert r["deployment_infer_vs_in_process_batch1_samples"] == 0.25
    assert r["deployment_infer_vs_in_process_batch64_samples"] == 0.05
    assert r["celery_tuned_vs_baseline_p50"] is None  # lane absent: no invented figure
    table = {row[0]: row for row in rows({"lanes": lanes})}
    assert table["deployment_noop"][4:6] == ("2.20", "1.10")
    assert table["in_process"][8] == "1,000 (b1) / 5,000 (b64)"
    assert r["batched_vs_infer_saturated_req_s"] == 2.5
    assert r["batched_vs_noop_saturated_req_s"] == round(750 / 900, 3)
    assert table["deployment_infer_batched"][7] == "750" and table["amqp_floor"][7] == "-"
