"""The ``overload`` lane's pure parts, its summary, ratios, report and docs block (no broker)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.compare import compare
from benchmarks.lanes.base import LaneContext
from benchmarks.lanes.overload import (
    LEVELS,
    MODES,
    OUTCOMES,
    Options,
    OverloadLane,
    PointRound,
    Sent,
    classify,
    compute_window,
    goodput_ratio,
    merge_reports,
    open_loop,
    parse_args,
    parse_levels,
    results_file,
    saturation_window,
    schedule,
    summarise_point,
)
from benchmarks.plots import overload_plot
from benchmarks.ratios import ratios
from benchmarks.report import blocks, overload_rows, render, rows
from models.errors import DeadlineExceeded, Overloaded

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results/overload-2026-12-06.json"

# ------------------------------------------------------------------ arguments and arithmetic


def test_levels_are_parsed_sorted_and_once() -> None:
    assert parse_levels("4,0.5,1,2,2") == (0.5, 1.0, 2.0, 4.0) == LEVELS
    for bad in ("", "0,1", "1,x", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_the_command_line_becomes_options() -> None:
    options, path = parse_args(["--json", "x.json"])
    assert options == Options() and path == Path("x.json")
    assert (options.seconds, options.deadline_ms, options.levels) == (20.0, 500.0, LEVELS)
    assert (options.model, options.workers, options.clients, options.rounds) == ("minilm", 1, 1, 1)
    quick, _ = parse_args(["--quick"])
    assert quick.quick and quick.seconds == 3.0 and quick.capacity_s < options.capacity_s
    short, _ = parse_args(["--quick", "--seconds", "1.5", "--levels", "1,4", "--model", "mlp"])
    assert (short.seconds, short.levels, short.model) == (1.5, (1.0, 4.0), "mlp")


@pytest.mark.parametrize(
    "argv",
    [["--levels", "0"], ["--seconds", "0"], ["--clients", "0"], ["--deadline-ms", "-1"]],
)
def test_bad_arguments_are_refused_before_anything_starts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["overload", *argv])  # python -m benchmarks overload ...: this lane's parser
    assert exit_info.value.code == 2 and "python -m benchmarks overload" in capsys.readouterr().err


def test_the_capacity_window_is_twice_what_the_workers_reserve() -> None:
    assert saturation_window(workers=1, max_batch=64, reserve=2) == 256
    assert saturation_window(workers=3, max_batch=32, reserve=1) == 192


def test_a_level_schedule_is_seeded_and_spans_its_seconds() -> None:
    times = schedule(400.0, 5.0, seed=3)
    assert times == schedule(400.0, 5.0, seed=3) != schedule(400.0, 5.0, seed=4)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 5.0
    assert 1800 < len(times) < 2200  # 400 req/s for 5 s, Poisson


# ------------------------------------------------------------------ one request's outcome


class _Result:
    """A fake AsyncResult: a reply (dict) or an exception, arriving at ``arrives``."""

    def __init__(self, index: int, value: Any, arrives: float | None) -> None:
        self.id, self.result, self.arrives = f"r{index}", value, arrives
        self.state = "SUCCESS" if isinstance(value, dict) else "FAILURE"
        self.callbacks: list[Callable[[Any], None]] = []

    def successful(self) -> bool:
        return self.state == "SUCCESS"

    def then(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)


def _reply(queued_ms: float, total_ms: float, compute_ms: float = 5.0) -> dict[str, Any]:
    timing = {
        "queue_wait_ms": queued_ms / 2,
        "batch_wait_ms": queued_ms / 2,
        "compute_ms": compute_ms,
        "service_ms": total_ms - queued_ms,
        "total_ms": total_ms,
    }
    return {"worker": "w@host", "forward_batch": 8, "timing": timing}


def test_the_forward_pass_start_is_bounded_by_the_reply_timing() -> None:
    sent = Sent(scheduled=100.0, called=100.0, returned=100.002, deadline=100.5)
    # Its batch started 100 ms after the send at the earliest; its pass ended by the batch's
    # end, 300 ms after the send, so it started by 295 ms after (the send by 100.002).
    assert compute_window(sent, _reply(100.0, 300.0)["timing"]) == pytest.approx((100.1, 100.297))
    assert compute_window(sent, {"queue_wait_ms": None, "batch_wait_ms": 1.0}) is None


def test_each_outcome_is_classified() -> None:
    def sent(value: Any = None, refused: str | None = None) -> Sent:
        result = None if refused else _Result(0, value, None)
        return Sent(0.0, 0.0, 0.001, 0.5, result=result, refused=refused)

    assert classify(sent(refused="Overloaded"), None) == "refused"
    assert classify(sent(_reply(10.0, 20.0)), 0.5) == "good"  # on the deadline itself
    assert classify(sent(_reply(10.0, 20.0)), 0.6) == "late"
    assert classify(sent(DeadlineExceeded("past")), 0.6) == "expired"
    assert classify(sent(RuntimeError("boom")), 0.1) == "failed"
    assert classify(sent(_reply(10.0, 20.0)), None) == "lost"


class _Fleet:
    """A fake fleet and clock: ``submit`` costs 1 ms; a result arrives at its set time, when
    ``wait`` has moved the clock past it.  Every third request is refused (Overloaded)."""

    def __init__(self, plan: Callable[[int, float], tuple[Any, float | None]]) -> None:
        self.t = 1000.0
        self.plan = plan
        self.live: list[_Result] = []
        self.n = 0
        self.samples = 0

    def clock(self) -> float:
        return self.t

    def submit(self, deadline: float) -> _Result:
        index, self.n = self.n, self.n + 1
        self.t += 0.001
        if index % 3 == 2:
            raise Overloaded("expected wait 0.9 s exceeds the 500 ms left")
        value, after = self.plan(index, deadline)
        result = _Result(index, value, None if after is None else self.t + after)
        self.live.append(result)
        return result

    def wait(self, timeout: float) -> None:
        self.t += timeout
        for result in [r for r in self.live if r.arrives is not None and r.arrives <= self.t]:
            self.live.remove(result)
            for callback in result.callbacks:
                callback(result)

    def sample(self) -> None:
        self.samples += 1


def test_the_open_loop_counts_every_outcome_and_times_replies_from_their_send() -> None:
    def plan(index: int, deadline: float) -> tuple[Any, float | None]:
        kind = index % 6  # 2 and 5 are refused at submit
        if kind == 0:
            return _reply(50.0, 100.0), 0.1  # good: back in 100 ms
        if kind == 1:
            return _reply(450.0, 600.0), 0.6  # late: started in time, back after the deadline
        if kind == 3:
            return DeadlineExceeded("dropped"), 0.55  # expired in the worker
        return RuntimeError("no reply"), None  # lost: never comes back

    fleet = _Fleet(plan)
    offsets = [0.01 * i for i in range(60)]
    records: list[dict[str, Any]] = []
    report = open_loop(
        fleet.submit,
        offsets,
        fleet.t + 0.005,
        0.5,
        fleet.wait,
        clock=fleet.clock,
        drain_s=2.0,
        sample=fleet.sample,
        records=records,
    )
    counts = report["counts"]
    assert counts == {
        "good": 10,
        "late": 10,
        "expired": 10,
        "refused": 20,
        "failed": 0,
        "lost": 10,
        "unsent": 0,
    }
    assert report["attempted"] == 60 and report["published"] == 40
    assert report["refused_by"] == {"Overloaded": 20} and report["untyped"] == 0
    assert len(report["good_ms"]) == 10 and all(99.0 <= ms <= 160.0 for ms in report["good_ms"])
    assert len(report["late_ms"]) == 10 and all(ms > 0 for ms in report["late_ms"])
    # The late ones started their pass within their deadline: none computed after it.
    assert report["computed_after_deadline"] == 0
    assert sum(report["timeline"]["refused"]) == 20 and fleet.samples >= 1
    assert len(records) == 60 and {r["outcome"] for r in records} == set(OUTCOMES) - {
        "failed",
        "unsent",
    }
    json.dumps(report)  # it travels to the parent as one JSON line


def test_a_reply_computed_after_its_deadline_is_counted() -> None:
    # Its batch started 700 ms after the send: past the 500 ms deadline.
    fleet = _Fleet(lambda index, deadline: (_reply(700.0, 710.0), 0.72))
    report = open_loop(
        fleet.submit, [0.0, 0.01], fleet.t, 0.5, fleet.wait, clock=fleet.clock, drain_s=2.0
    )
    assert report["counts"]["late"] == 2 and report["computed_after_deadline"] == 2


def test_a_lagging_client_skips_what_is_long_overdue_and_an_untyped_refusal_is_counted() -> None:
    fleet = _Fleet(lambda index, deadline: (_reply(1.0, 2.0), 0.01))
    submit = fleet.submit

    def slow_submit(deadline: float) -> _Result:
        fleet.t += 0.1  # each send takes 100 ms: the client falls behind its schedule
        if fleet.n == 4:
            fleet.n += 1
            raise KeyError("not one of ours")
        return submit(deadline)

    offsets = [0.001 * i for i in range(100)]  # 100 requests due in 0.1 s
    report = open_loop(
        slow_submit,
        offsets,
        fleet.t,
        0.5,
        fleet.wait,
        clock=fleet.clock,
        drain_s=1.0,
        lag_limit_s=1.0,
        is_typed=lambda e: isinstance(e, Overloaded),
    )
    counts = report["counts"]
    assert counts["unsent"] > 80 and report["attempted"] + counts["unsent"] == 100
    assert report["untyped"] == 1 and report["refused_by"]["KeyError"] == 1
    assert max(report["lag_ms"]) <= 1000.0 + 101.0  # nothing is sent later than the limit


# ------------------------------------------------------------------ summary, ratios, report


def _client_report(good: int, refused: int, late: int = 1, expired: int = 2) -> dict[str, Any]:
    return {
        "counts": {
            "good": good,
            "late": late,
            "expired": expired,
            "refused": refused,
            "failed": 0,
            "lost": 0,
            "unsent": 0,
        },
        "attempted": good + late + expired + refused,
        "published": good + late + expired,
        "refused_by": {"Overloaded": refused} if refused else {},
        "failed_by": {},
        "untyped": 0,
        "good_ms": [100.0 + i % 50 for i in range(good)],
        "late_ms": [20.0] * late,
        "lag_ms": [1.0, 2.0, 3.0],
        "computed_after_deadline": 0,
        "compute_start_undetermined": 1,
        "send_span_s": 10.0,
        "timeline": {"good": [good // 2, good - good // 2], "refused": [refused, 0]},
        "router": {"decisions": good + refused, "overloaded": refused, "rerouted": 0},
        "advertised": {"service_rate": [200.0, 210.0], "backlog": [10.0, 30.0], "age_s": [0.5]},
    }


def _lane(tmp_path: Path, rounds: int = 2) -> OverloadLane:
    """The lane with made-up rounds: capacity 200 req/s; with admission the goodput stays
    near it past 1x, without it collapses."""
    lane = OverloadLane(LaneContext(tmp_path, "cpu", "minilm", run="t3st"), Options())
    goodput = {"admission": (990, 1900, 1880, 1850), "no_admission": (995, 1500, 300, 40)}
    for r in range(rounds):
        lane.capacity.append({"admission": 200.0 + r, "no_admission": 198.0})
        points: dict[str, list[PointRound]] = {}
        for mode in MODES:
            points[mode] = []
            for factor, good in zip(LEVELS, goodput[mode], strict=True):
                offered = factor * 200.0
                refused = max(0, int(offered * 10) - good - 3) if mode == "admission" else 0
                report = _client_report(good + r, refused)
                cpu = {"client": 2.0, "worker_main": 4.0, "worker_child": 6.0}
                points[mode].append(merge_reports(factor, offered, 10.0, [report], cpu, 15.0))
        lane.rounds.append(points)
    lane.rss = {m: (500.0, 90.0) for m in MODES}
    return lane


def test_the_summary_feeds_the_ratios_the_report_and_the_results_file(tmp_path: Path) -> None:
    lane = _lane(tmp_path)
    # One fleet per mode: workers, queue and namespace of its own; admission set in its clients.
    on, off = lane.fleets["admission"], lane.fleets["no_admission"]
    assert on.queue != off.queue and on.env["INFER_REGISTRY_NAMESPACE"] == on.queue
    assert (on.env["INFER_ADMISSION"], off.env["INFER_ADMISSION"]) == ("true", "false")
    assert all(w.env["INFER_BATCHING"] == "true" for f in (on, off) for w in f.workers)
    assert {w.consumed_queues[1] for w in on.workers} == {on.queue}

    summary = lane.summary(500.0)
    assert summary["rounds"] == 2 and summary["levels"] == list(LEVELS)
    assert summary["capacity_req_s"] == 199.0  # the first round's, both fleets' mean
    assert summary["capacity_figures"] == {"admission": 200.0, "no_admission": 198.0}
    four = summary["modes"]["admission"]["points"][3]
    assert four["factor"] == 4.0 and four["offered_req_s"] == 800.0
    assert four["goodput_req_s"] == 185.05  # median of rounds: (1850 + 1851) / 2 / 10 s
    assert four["counts"]["good"] == 1850 + 1851 and four["refused_by"]["Overloaded"] > 0
    assert sum(four["fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert four["latency_ms"]["p50"] > 0 and four["lag_ms"]["max"] == 3.0
    assert four["advertised"]["service_rate"] == {"min": 200.0, "median": 205.0, "max": 210.0}
    assert four["cores_busy"]["worker_child"] == 0.6 and four["machine_busy"] == 1.5
    assert four["timeline"]["good"] == [925 + 925, 925 + 926]  # summed over the rounds
    assert four["router"]["overloaded"] == four["counts"]["refused"]
    assert summary["computed_after_deadline"] == 0 and summary["untyped_refusals"] == 0
    assert summary["goodput_4x_vs_1x"] == {"admission": 0.974, "no_admission": 0.027}
    assert summary["per_round"]["goodput_4x_vs_1x.admission"] == [0.974, 0.974]
    json.dumps(summary)

    r = ratios({"overload": summary})
    assert r["overload_goodput_4x_vs_1x"] == 0.974
    assert r["overload_goodput_4x_vs_1x_no_admission"] == 0.027
    assert r["overload_goodput_4x_admission_vs_no_admission"] == 45.691
    assert all(
        ratios({})[k] is None
        for k in (
            "overload_goodput_4x_vs_1x",
            "overload_goodput_4x_vs_1x_no_admission",
            "overload_goodput_4x_admission_vs_no_admission",
        )
    )
    assert goodput_ratio([{"factor": 1.0, "goodput_req_s": 10.0}]) is None  # no 4x level

    result = results_file(summary, Options(), _machine(), client_rss=90.0, date="2026-12-06")
    assert set(result) == {"schema", "date", "machine", "plan", "lanes", "ratios", "memory_mb"}
    assert result["plan"]["lane"] == "overload" and result["plan"]["deadline_ms"] == 500.0
    assert result["memory_mb"] == {"client_rss": 90.0, "overload_worker_rss": 500.0}

    (row,) = rows(result)
    assert row[0] == "overload" and "0.974 (admission) / 0.027 (none)" in row[8]
    table = overload_rows(result)
    assert [t[:2] for t in table[:4]] == [("on", "0.5"), ("off", "0.5"), ("on", "1"), ("off", "1")]
    assert len(table) == 8 and table[6][5] == "185.1"
    assert overload_rows({"lanes": {}}) == []
    text = render(result, "x.json")
    assert "Lane `overload` alone: levels [0.5, 1.0, 2.0, 4.0] x capacity" in text
    assert "| admission | offered x |" in text and "| overload_goodput_4x_vs_1x | 0.974 |" in text

    _, diff = compare(result, result)  # the headline figures and the ratios, side by side
    assert "goodput_4x_vs_1x.admission" in diff and "overload_goodput_4x_vs_1x" in diff
    png = overload_plot(summary, tmp_path / "overload.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_point_with_no_reply_has_no_latency(tmp_path: Path) -> None:
    empty = {**_client_report(0, 10, late=0, expired=0), "good_ms": []}
    point = summarise_point([merge_reports(4.0, 800.0, 10.0, [empty])])
    assert point["goodput_req_s"] == 0.0 and point["latency_ms"] is None
    assert point["fractions"]["refused"] == 1.0 and point["cores_busy"] == {}


def _machine() -> dict[str, Any]:
    return {
        "cpus": 2,
        "gpu": None,
        "device": "cpu",
        "python": "3.11",
        "torch": "2",
        "celery": "5.7",
        "rabbitmq": "3.10",
        "redis": "7",
        "serializer": "msgpack",
    }


# ------------------------------------------------------------------ the committed run


def test_the_committed_run_is_in_the_docs_as_its_rendering() -> None:
    """docs/benchmarks.md's block for the overload results file is that file's rendering."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    result = json.loads((ROOT / RESULTS).read_text())
    assert blocks(doc)[RESULTS] == render(result, RESULTS)
    lane = result["lanes"]["overload"]
    assert result["plan"]["lane"] == "overload" and lane["levels"] == list(LEVELS)
    assert set(lane["modes"]) == set(MODES) and lane["deadline_ms"] == 500.0
    assert lane["computed_after_deadline"] == 0 and lane["untyped_refusals"] == 0
    assert "overload_goodput_4x_vs_1x" in result["ratios"]
