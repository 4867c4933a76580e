"""The overload lane runs end to end in its quick mode on the real broker (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTCOMES = {"good", "late", "expired", "refused", "failed", "lost", "unsent"}


@pytest.mark.timeout(420)  # two fleets boot, two capacity runs, 4 levels x 2 modes
def test_quick_overload_run_writes_json_table_and_plot(tmp_path: Path, weights_dir: Path) -> None:
    out_json = tmp_path / "overload.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "overload",
            "--quick",
            "--seconds",
            "1.5",
            "--json",
            str(out_json),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=400,
    )
    # 0: nothing computed past its deadline, nothing refused untyped, nothing lost.
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out_json.read_text())
    assert set(result) == {"schema", "date", "machine", "plan", "lanes", "ratios", "memory_mb"}
    assert result["plan"]["lane"] == "overload" and result["plan"]["quick"] is True
    lane = result["lanes"]["overload"]
    assert lane["levels"] == [0.5, 1.0, 2.0, 4.0] and lane["deadline_ms"] == 500.0
    assert lane["capacity_req_s"] > 0 and set(lane["capacity_figures"]) == {
        "admission",
        "no_admission",
    }
    assert lane["computed_after_deadline"] == 0 and lane["untyped_refusals"] == 0
    for mode in ("admission", "no_admission"):
        points = lane["modes"][mode]["points"]
        assert [p["factor"] for p in points] == lane["levels"], mode
        for p in points:
            counts = p["counts"]
            assert set(counts) == {"scheduled", "attempted", *OUTCOMES}, (mode, p)
            assert counts["scheduled"] == sum(counts[k] for k in OUTCOMES) > 0, (mode, p)
            assert counts["attempted"] == counts["scheduled"] - counts["unsent"], (mode, p)
            assert counts["lost"] == 0, (mode, p)
            # Every refusal at submit is the typed Overloaded, and only with admission on.
            assert set(p["refused_by"]) <= ({"Overloaded"} if mode == "admission" else set())
            assert p["attempted_per_s"] > 0 and p["offered_req_s"] > 0, (mode, p)
            assert p["cores_busy"]["worker_child"] > 0, (mode, p)
            assert p["advertised"]["service_rate"] is not None, (mode, p)
        assert points[0]["goodput_req_s"] > 0, mode  # half the capacity is served
    for key in (
        "overload_goodput_4x_vs_1x",
        "overload_goodput_4x_vs_1x_no_admission",
        "overload_goodput_4x_admission_vs_no_admission",
    ):
        assert key in result["ratios"], key
    assert (tmp_path / "overload.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Overload on `cpu` (minilm)" in proc.stdout  # the terminal table
    assert "overload_goodput_4x_vs_1x" in proc.stdout
