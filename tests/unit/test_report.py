from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.ratios import ratios
from benchmarks.report import END, begin, blocks, main, render, rows, splice, stale
from benchmarks.stats import cdf, median_of_rounds, percentiles, ratio

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"


def test_every_results_block_in_the_docs_is_generated_from_its_json() -> None:
    doc = DOC.read_text()
    sources = blocks(doc)
    assert {
        "benchmarks/results/cpu-2026-11-26.json",  # the CPU run
        "benchmarks/results/gpu-h100-2026-11-27.json",  # the GPU run
    } <= set(sources)
    for source, text in sources.items():
        assert text == render(json.loads((ROOT / source).read_text()), source), source
    assert stale(doc, ROOT) == []
    # Every results table on the page is inside a generated block.
    assert doc.count("| lane | p50 ms |") == len(sources)


def test_a_drifted_block_is_caught() -> None:
    doc = DOC.read_text()
    source = "benchmarks/results/cpu-2026-11-26.json"
    drifted = doc.replace(blocks(doc)[source], blocks(doc)[source].replace("0.996", "0.950", 1))
    assert drifted != doc
    assert stale(drifted, ROOT) == [source]


def test_the_readme_headline_ratios_come_from_the_json() -> None:
    readme = (ROOT / "README.md").read_text()
    header = re.search(r"^\| ratio((?: \| [\w.-]+)+) \|$", readme, re.M)
    assert header is not None, "README has no headline ratio table"
    runs = header[1].split(" | ")[1:]
    figures = {
        run: json.loads((ROOT / f"benchmarks/results/{run}.json").read_text())["ratios"]
        for run in runs
    }
    table = readme[header.end() :].strip("\n").split("\n\n", 1)[0].splitlines()[1:]
    assert len(table) >= 2
    for line in table:
        key, *shown = (cell.strip() for cell in line.strip("|").split("|"))
        key = key.strip("`")
        assert shown == [format(figures[run][key], ".3f") for run in runs], key


def test_splice_replaces_only_the_block_of_its_source() -> None:
    a, b = begin("a.json"), begin("b.json")
    text = f"x\n{a}\nold a\n{END}\ny\n{b}\nold b\n{END}\n"
    assert splice(text, "new", "b.json") == f"x\n{a}\nold a\n{END}\ny\n{b}\nnew\n{END}\n"
    assert blocks(text) == {"a.json": "old a", "b.json": "old b"}
    with pytest.raises(ValueError, match=r"c\.json"):
        splice(text, "x", "c.json")


def test_doc_option_rewrites_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = "benchmarks/results/cpu-2026-11-26.json"
    doc = tmp_path / "page.md"
    doc.write_text(f"# Results\n\n{begin(source)}\nstale\n{END}\n\nafter\n")
    monkeypatch.chdir(ROOT)
    assert main([source, "--doc", str(doc)]) == 0
    assert blocks(doc.read_text()) == {
        source: render(json.loads((ROOT / source).read_text()), source)
    }
    assert doc.read_text().endswith(f"{END}\n\nafter\n")


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
