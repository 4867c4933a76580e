"""``python -m benchmarks compare``: a change counts only beyond the rounds' spread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.compare import Rule, compare, main, significant


def _result(p50: float, rounds: list[float] | None) -> dict[str, Any]:
    lane: dict[str, Any] = {"rtt_ms": {"p50": p50}, "throughput_per_s": 100.0}
    if rounds is not None:
        lane["per_round"] = {"rtt_ms.p50": rounds, "throughput_per_s": [99.0, 100.0, 101.0]}
    return {"lanes": {"deployment_noop": lane}, "ratios": {"x_vs_y_p50": 1.0}}


def _line(text: str, figure: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(figure + " "))


def test_a_change_inside_the_spread_is_not_marked() -> None:
    # Before spreads 1.8..2.6 (0.8), after 2.4..2.9 (0.5): +0.6 is within 1.3.
    same, text = compare(_result(2.0, [1.8, 2.0, 2.6]), _result(2.6, [2.4, 2.6, 2.9]))
    assert same
    row = _line(text, "rtt_ms.p50")
    assert "+30.0%" in row and "!" not in row and "spread 1.3" in row  # beyond 25%, yet noise


def test_a_change_beyond_the_spread_is_marked() -> None:
    # Spreads 0.1 and 0.1: +0.5 (only 10%, under the fixed tolerance) is real.
    _, text = compare(_result(5.0, [4.95, 5.0, 5.05]), _result(5.5, [5.45, 5.5, 5.55]))
    row = _line(text, "rtt_ms.p50")
    assert "+10.0%" in row and " ! " in row and "spread 0.2" in row
    assert "no per-round figures" not in text


def test_a_stated_multiple_of_the_spread() -> None:
    before, after = _result(5.0, [4.95, 5.0, 5.05]), _result(5.5, [5.45, 5.5, 5.55])
    _, text = compare(before, after, Rule(spread=3.0))
    assert "!" not in _line(text, "rtt_ms.p50")  # 0.5 < 3 x 0.2


def test_without_per_round_figures_it_falls_back_to_the_tolerance_and_says_so() -> None:
    old = _result(2.0, None)  # a results file from before per_round
    _, text = compare(old, _result(2.6, [2.4, 2.6, 2.9]))
    assert "before has no per-round figures" in text and "after has no" not in text
    row = _line(text, "rtt_ms.p50")
    assert "+30.0%" in row and " ! " in row and "tol 25%" in row
    _, text = compare(old, _result(2.4, [2.3, 2.4, 2.5]))
    assert "!" not in _line(text, "rtt_ms.p50")  # +20% < 25%
    # Ratios have no per-round values: always the tolerance.
    assert "tol 25%" in _line(text, "x_vs_y_p50")


@pytest.mark.parametrize(
    ("rounds_a", "rounds_b", "basis"),
    [
        ([1.0], [1.0, 2.0], "tol 25%"),  # one round: no spread
        (None, [1.0, 2.0], "tol 25%"),
        ([1.0, None], [1.0, 2.0], "tol 25%"),  # not numbers
        ([1.0, 2.0], [1.0, 2.0], "spread 2.000"),
    ],
)
def test_significant_basis(rounds_a: Any, rounds_b: Any, basis: str) -> None:
    assert significant(1.0, 1.5, rounds_a, rounds_b, Rule())[1] == basis


def test_main_reads_two_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(5.0, [4.95, 5.0, 5.05])))
    b.write_text(json.dumps(_result(5.5, [5.45, 5.5, 5.55])))
    assert main([str(a), str(b), "--spread", "3"]) == 0
    assert "3 x the rounds' combined spread" in capsys.readouterr().out
