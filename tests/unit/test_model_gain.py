"""The ``model_gain`` lane's pure parts, its summary, ratios and report (no broker, no worker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.lanes.base import LaneContext, RoundConfig
from benchmarks.lanes.model_gain import (
    MODELS,
    ModelGainLane,
    PhaseRound,
    available_models,
    saturate,
    sentences,
    sizes,
    summarise_phase,
)
from benchmarks.ratios import ratios
from benchmarks.report import model_gain_rows, render, rows
from models.text import estimated_bucket

ROOT = Path(__file__).resolve().parents[2]


def test_sentences_are_seeded_varied_and_share_one_length_bucket() -> None:
    texts = sentences(256, seed=15)
    assert texts == sentences(256, seed=15) and texts != sentences(256, seed=16)
    assert len(set(texts)) == len(texts)
    assert all(60 <= len(t) <= 120 and len(t.split()) == 10 for t in texts)
    # The batching worker groups text by this estimate: one bucket, so they can share a pass.
    assert {estimated_bucket(t, 256) for t in texts} == {32}


def test_sizes_follow_the_plan() -> None:
    full = sizes(RoundConfig(requests=1000, window=16, window_requests=2000))
    quick = sizes(RoundConfig(requests=100, window=8, window_requests=200))
    tiny = sizes(RoundConfig(requests=5, window=8, window_requests=16))
    assert (full.tier, quick.tier, tiny.tier) == ("full", "quick", "tiny")
    assert full.batch(32) == quick.batch(32) == 32 and tiny.batch(32) == 4 and tiny.batch(2) == 2
    assert full.requests_per_window > quick.requests_per_window and tiny.min_phase_s == 0


class _Result:
    """An AsyncResult stand-in: ``then`` keeps the callback, ``get`` fires it and replies."""

    def __init__(self, index: int, log: dict[str, Any]) -> None:
        self.id, self.index, self.log = f"r{index}", index, log
        self.callbacks: list[Any] = []

    def then(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def get(self, timeout: float) -> dict[str, Any]:
        self.log["done"] += 1
        for callback in self.callbacks:
            callback(self)
        batch = 4 if self.index % 2 else 2
        return {"forward_batch": batch, "timing": {"total_ms": 5.0, "compute_ms": 1.0}}


def _publisher(log: dict[str, Any], in_flight: int) -> Any:
    def publish(start: int, n: int) -> list[_Result]:
        assert start == log["sent"], "requests are numbered in order"
        log["sent"] += n
        log["peak"] = max(log["peak"], log["sent"] - log["done"])
        assert log["sent"] - log["done"] <= in_flight, "never more than the window in flight"
        return [_Result(start + i, log) for i in range(n)]

    return publish


def test_saturate_keeps_the_window_and_collects_the_replies() -> None:
    log = {"sent": 0, "done": 0, "peak": 0}
    phase = saturate(_publisher(log, 8), in_flight=8, requests=20)
    assert phase.requests == log["sent"] == log["done"] == 20 and log["peak"] == 8
    assert len(phase.rtt_ms) == 20 and all(ms >= 0 for ms in phase.rtt_ms)
    assert phase.reply_total_ms == [5.0] * 20 and phase.compute_ms == [1.0] * 20
    assert sorted(set(phase.forward_batch)) == [2, 4] and phase.elapsed_s >= 0


def test_saturate_tops_up_whole_chunks_until_its_minimum_time_within_its_cap() -> None:
    log = {"sent": 0, "done": 0, "peak": 0}
    phase = saturate(_publisher(log, 4), in_flight=4, requests=4, min_s=60.0, max_requests=12)
    assert phase.requests == 12  # the cap, long before 60 s


def _phase(req_s: float, rtt: list[float], batch: int) -> PhaseRound:
    n = len(rtt)
    return PhaseRound(
        in_flight=8,
        requests=n,
        elapsed_s=n / req_s,
        rtt_ms=rtt,
        reply_total_ms=[ms - 1 for ms in rtt],
        compute_ms=[1.0] * n,
        forward_batch=[batch] * n,
    )


def test_summarise_phase_pools_latency_and_takes_the_median_rate() -> None:
    rounds = [_phase(10.0, [1.0, 2.0], 4), _phase(30.0, [3.0, 4.0], 2), _phase(20.0, [5.0, 6.0], 3)]
    out = summarise_phase(rounds)
    assert out["req_s"] == 20.0 and out["requests"] == 6
    assert out["rtt_ms"]["p50"] == 3.5 and out["forward_batch_mean"] == 3.0


def _lane(tmp_path: Path, models: tuple[str, ...] = MODELS) -> ModelGainLane:
    """The lane with three made-up rounds (nothing started: workers are only argv here)."""
    lane = ModelGainLane(LaneContext(tmp_path, "cpu", "cnn", run="t3st"), models)
    lane.sizes = sizes(RoundConfig(requests=100, window=8, window_requests=200))
    lane.device = "cpu"
    for m, part in lane.parts.items():
        batch = str(part.max_batch_size)
        rates = (10.0, 40.0) if m == "minilm" else (8.0, 6.0)
        for r in range(3):
            part.in_process.append({"1": 10.0 + r, batch: 20.0 + r})
            part.rounds["batch1"].append(_phase(rates[0], [100.0 + r, 200.0, 300.0], 1))
            part.rounds["batching"].append(_phase(rates[1], [50.0, 60.0 + r, 90.0], 30))
    return lane


def test_the_summary_feeds_the_ratios_and_the_report(tmp_path: Path) -> None:
    lane = _lane(tmp_path)
    # Its four workers: their own queues and registry namespace, batch 1 and batching.
    processes = [w.process for part in lane.parts.values() for w in part.workers.values()]
    assert len({p.name for p in processes}) == 4
    assert {p.env["INFER_REGISTRY_NAMESPACE"] for p in processes} == {"bench-gain-t3st"}
    assert sorted(p.env.get("INFER_BATCHING") for p in processes) == [
        "false",
        "false",
        "true",
        "true",
    ]
    summary = lane.summary(None)
    assert set(summary["models"]) == set(MODELS) and summary["rounds"] == 3
    assert summary["gain"] == {"resnet50": 0.75, "minilm": 4.0}
    resnet = summary["models"]["resnet50"]
    assert (resnet["batch"], resnet["in_flight"]) == (32, 64)
    assert resnet["in_process"] == {"by_batch": {"1": 11.0, "32": 21.0}, "gain": 1.909}
    assert resnet["batching"]["forward_batch_mean"] == 30.0
    assert summary["per_round"]["gain.minilm"] == [4.0, 4.0, 4.0]
    assert len(summary["per_round"]["models.resnet50.batching.rtt_ms.p95"]) == 3
    json.dumps(summary)  # the results file takes it as it is

    r = ratios({"model_gain": summary})
    assert r["batching_gain_resnet50"] == 0.75 and r["batching_gain_minilm"] == 4.0
    assert r["batching_gain_minilm_p95_ms"] == resnet["batching"]["rtt_ms"]["p95"]
    assert r["batching_gain_resnet50_batch1_p95_ms"] == resnet["batch1"]["rtt_ms"]["p95"]
    assert ratios({})["batching_gain_resnet50"] is None  # lane absent: no invented figure

    result = json.loads((ROOT / "benchmarks/results/cpu-2026-12-06.json").read_text())
    result["lanes"]["model_gain"] = summary
    (row,) = [x for x in rows(result) if x[0] == "model_gain"]
    assert "0.75x (resnet50) / 4.00x (minilm)" in row[8]
    table = model_gain_rows(result)
    assert [t[0] for t in table] == ["resnet50", "minilm"] and table[0][-1] == "0.75x"
    assert "| model | in flight |" in render(result, "x.json")
    assert model_gain_rows({"lanes": {}}) == []


def test_a_model_the_install_lacks_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = LaneContext(tmp_path, "cpu", "cnn")
    assert available_models(ctx) == MODELS  # this environment has the models extra
    monkeypatch.setattr("benchmarks.lanes.model_gain.available_models", lambda ctx: ())
    assert ModelGainLane.build(ctx) is None
    summary = _lane(tmp_path, ("resnet50",)).summary(None)
    assert set(summary["models"]) == {"resnet50"}
    r = ratios({"model_gain": summary})
    assert r["batching_gain_resnet50"] == 0.75 and r["batching_gain_minilm"] is None
    (row,) = model_gain_rows({"lanes": {"model_gain": summary}})
    assert row[0] == "resnet50"


def test_a_lane_can_be_named_first_and_an_unknown_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []

    class Stop(Exception):
        pass

    def fake_run(plan: Any) -> Any:
        seen.append(plan)
        raise Stop

    monkeypatch.setattr("benchmarks.__main__.run", fake_run)
    with pytest.raises(Stop):
        bench_main(["model_gain", "--quick", "--json", "/dev/null"])
    assert seen[0].lanes == ("model_gain",) and seen[0].rounds == 3
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--lanes", "model_gian"])
    assert exit_info.value.code == 2 and "no lane named model_gian" in capsys.readouterr().err
