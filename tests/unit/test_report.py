from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import BEGIN, END, render, splice
from benchmarks.stats import percentiles

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "benchmarks/results/cpu-amqp-redis.json"


def test_readme_results_block_is_generated_from_the_committed_json() -> None:
    block = render(json.loads((ROOT / SOURCE).read_text()), SOURCE)
    readme = (ROOT / "README.md").read_text()
    assert f"{BEGIN}\n{block}\n{END}" in readme


def test_splice_replaces_only_the_block() -> None:
    text = f"a\n{BEGIN}\nold\n{END}\nb"
    assert splice(text, "new") == f"a\n{BEGIN}\nnew\n{END}\nb"
    with pytest.raises(ValueError, match="markers"):
        splice("no markers", "x")


def test_percentiles() -> None:
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["mean"]) == (50.5, 95.05, 99.01, 50.5)
    with pytest.raises(ValueError):
        percentiles([1.0])
