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


def _grown(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` as a later run writes it: a new lane, a new lane key, a new ratio; one gone."""
    grown = json.loads(json.dumps(base))
    grown["lanes"]["open_loop"] = {"capacity_req_s": 280.0, "max_rate_p99_50ms": {"infer": 250.0}}
    grown["lanes"]["deployment_noop"]["saturated_req_s"] = 500.0
    grown["ratios"]["open_loop_batched_vs_infer_max_rate_p99"] = 1.2
    del grown["ratios"]["x_vs_y_p50"]
    return grown


def test_what_only_one_file_has_is_added_or_removed_not_a_failure() -> None:
    before = _result(5.0, [4.95, 5.0, 5.05])
    same, text = compare(before, _grown(before))
    assert not same  # the shapes differ, and the text says how
    assert "shape: differs" in text
    assert "lanes added: open_loop" in text
    assert "deployment_noop keys added: saturated_req_s" in text
    assert "ratios added: open_loop_batched_vs_infer_max_rate_p99" in text
    assert "ratios removed: x_vs_y_p50" in text
    assert "open_loop (added)" in text
    assert _line(text, "max_rate_p99_50ms.infer").split()[-1] == "added"
    assert _line(text, "saturated_req_s").split()[-2:] == ["500.000", "added"]
    assert _line(text, "open_loop_batched_vs_infer_max_rate_p99").split()[-1] == "added"
    assert _line(text, "x_vs_y_p50").split()[-1] == "removed"
    assert "rtt_ms.p50" in text  # the figures both have are still compared
    # The other way round: removed.
    _, text = compare(_grown(before), before)
    assert "lanes removed: open_loop" in text and "open_loop (removed)" in text


def test_main_exits_0_when_files_differ_in_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    before = _result(5.0, [4.95, 5.0, 5.05])
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(_grown(before)))
    assert main([str(a), str(b)]) == 0
    assert "lanes added: open_loop" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "{not json", '{"lanes": {}}', "[1, 2]"])
def test_main_exits_2_on_an_input_that_is_not_a_results_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_result(5.0, None)))
    if content is not None:
        bad.write_text(content)
    assert main([str(good), str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
