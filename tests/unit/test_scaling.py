"""The ``scaling`` lane's pure parts, its summary, ratios and report (no broker, no worker)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.compare import compare
from benchmarks.lanes.base import LaneContext
from benchmarks.lanes.scaling import (
    Options,
    ScalingLane,
    closed_loop,
    efficiency,
    marginal,
    merge_reports,
    parse_args,
    parse_workers,
    results_file,
)
from benchmarks.ratios import ratios
from benchmarks.report import render, rows, scaling_rows

# ------------------------------------------------------------------ arguments and arithmetic


def test_worker_counts_are_parsed_sorted_and_once() -> None:
    assert parse_workers("1,2,4") == (1, 2, 4)
    assert parse_workers("8, 1,4,2,2") == (1, 2, 4, 8)
    for bad in ("", "0,1", "1,x", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_workers(bad)


def test_the_command_line_becomes_options() -> None:
    options, path = parse_args(["--workers", "1,2,4,8", "--seconds", "5", "--json", "x.json"])
    assert options.workers == (1, 2, 4, 8) and options.seconds == 5.0 and path == Path("x.json")
    assert (options.model, options.device, options.rounds) == ("mlp", "cpu", 3)
    # One client per worker by default, each with the per-worker window in flight ...
    assert options.clients_for(4) == 4 and options.window_for(4) == options.in_flight
    # ... or a fixed number of clients sharing the fleet's window (rounded up).
    two = Options(in_flight=5, clients=2)
    assert two.clients_for(4) == 2 and two.window_for(4) == 10 and two.window_for(1) == 3


@pytest.mark.parametrize(
    "argv", [["--workers", "0"], ["--rounds", "0"], ["--seconds", "0"], ["--clients", "-1"]]
)
def test_bad_arguments_are_refused_before_anything_starts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["scaling", *argv])  # python -m benchmarks scaling ...: this lane's parser
    assert exit_info.value.code == 2 and "python -m benchmarks scaling" in capsys.readouterr().err


def test_efficiency_is_throughput_over_n_times_one_worker() -> None:
    req_s = {4: 200.0, 1: 100.0, 2: 180.0}
    assert efficiency(req_s) == {1: 1.0, 2: 0.9, 4: 0.5}
    # What each added worker brought, over one worker's req/s: the cores run out at 4.
    assert marginal(req_s) == {1: 1.0, 2: 0.8, 4: 0.1}
    assert marginal({1: 100.0, 2: 90.0}) == {1: 1.0, 2: -0.1}  # a worker that costs
    # Without a 1-worker figure there is nothing to scale from: no invented figure.
    assert efficiency({2: 180.0, 4: 200.0}) == {2: None, 4: None}
    assert marginal({2: 180.0}) == {2: None}
    assert efficiency({1: 0.0, 2: 10.0}) == {1: None, 2: None}


# ------------------------------------------------------------------ the client's closed loop


class _Clock:
    """A fake clock: every read moves it 1 ms on."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


class _Broker:
    """Fake results: each wait completes the *newest* request in flight (out of order)."""

    def __init__(self, clock: _Clock, stuck: frozenset[int] = frozenset()) -> None:
        self.clock, self.stuck = clock, stuck
        self.live: list[_Result] = []
        self.sent = 0
        self.peak = 0

    def submit(self) -> _Result:
        result = _Result(self, self.sent)
        self.sent += 1
        self.live.append(result)
        self.peak = max(self.peak, len(self.live))
        return result

    def complete_newest(self) -> None:
        for result in reversed(self.live):
            if result.index not in self.stuck:
                self.live.remove(result)
                result.done = True
                for callback in result.callbacks:
                    callback(result)
                return


class _Result:
    def __init__(self, broker: _Broker, index: int) -> None:
        self.broker, self.index, self.id = broker, index, f"r{index}"
        self.callbacks: list[Any] = []
        self.done = False

    def then(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def get(self, timeout: float, interval: float, propagate: bool) -> Any:
        from celery.exceptions import TimeoutError as ResultTimeout

        self.broker.complete_newest()
        if not self.done:
            raise ResultTimeout("still pending")
        return self.result

    def successful(self) -> bool:
        return self.index % 10 != 9  # every tenth request fails

    @property
    def result(self) -> Any:
        if not self.successful():
            return RuntimeError("failed")
        worker = f"w{self.index % 2}@host"
        return {"worker": worker, "timing": {"queue_wait_ms": 2.0, "service_ms": 0.5}}


def test_the_closed_loop_keeps_its_window_though_results_arrive_out_of_order() -> None:
    clock = _Clock()
    broker = _Broker(clock, stuck=frozenset({0}))  # the very first request never comes back
    report = closed_loop(broker.submit, 8, t0=0.05, t1=0.5, clock=clock, drain_s=0.05)
    # The window stays full although its oldest request is stuck: arrivals free their slots.
    assert broker.peak == 8 and report["sent"] == broker.sent > 8
    assert report["lost"] == 1  # the stuck one, counted once the drain time is over
    counted = report["completed"] + report["errors"] + report["lost"]
    assert counted <= report["sent"]  # results before t0 count nowhere but errors
    assert report["completed"] == len(report["rtt_ms"]) > 0
    assert all(ms >= 0 for ms in report["rtt_ms"])
    assert report["errors"] > 0  # every tenth request fails, whenever it arrives
    assert sum(report["served_by"].values()) == report["completed"]
    assert set(report["served_by"]) == {"w0@host", "w1@host"}
    assert report["timing_ms"]["service_ms"] == [0.5] * report["completed"]
    json.dumps(report)  # it travels to the parent as one JSON line


def test_the_closed_loop_drains_everything_after_its_window() -> None:
    clock = _Clock()
    broker = _Broker(clock)
    waits: list[float] = []

    def wait(oldest: Any, timeout: float) -> None:  # the client's: one message, any request's
        waits.append(timeout)
        broker.complete_newest()

    report = closed_loop(broker.submit, 4, t0=0.0, t1=0.2, wait=wait, clock=clock, poll_s=0.01)
    assert report["lost"] == 0 and broker.live == []  # nothing left in flight
    # Every result came back: in the window, or among the last window's, drained after t1.
    assert report["sent"] - 4 <= report["completed"] + report["errors"] <= report["sent"]
    assert waits and set(waits) == {0.01}


# ------------------------------------------------------------------ summary, ratios, report


def _report(completed: int, shares: dict[str, int], spills: int = 5) -> dict[str, Any]:
    return {
        "sent": completed + 8,
        "completed": completed,
        "errors": 0,
        "lost": 0,
        "rtt_ms": [10.0 + i % 7 for i in range(completed)],
        "served_by": shares,
        "timing_ms": {"queue_wait_ms": [3.0, 4.0], "service_ms": [0.3, 0.4]},
        "router": {"decisions": completed, "sticky_hits": completed - spills, "spills": spills},
    }


def _lane(tmp_path: Path, options: Options) -> ScalingLane:
    """The lane with made-up rounds: 1 worker 100 req/s, 2 workers 180, 4 workers 200."""
    lane = ScalingLane(LaneContext(tmp_path, "cpu", "mlp", run="t3st"), options)
    rates = {1: 100, 2: 180, 4: 200}
    for r in range(options.rounds):
        for n in options.workers:
            per_client = rates[n] * 10 // n  # a 10 s window, n clients (one more in round r)
            reports = [
                _report(c, {f"bench-s{n}w{i}-t3st@host": c})
                for i, c in enumerate(per_client + (r if i == 0 else 0) for i in range(n))
            ]
            cpu_s = {"client": 0.001 * rates[n] * 10, "worker_main": 0.5, "worker_child": 1.5}
            lane.rounds[n].append(merge_reports(n, 10.0, reports, cpu_s, machine_busy_s=15.0))
    lane.rss = {n: (300.0 + n, 90.0) for n in options.workers}
    return lane


def test_the_summary_feeds_the_ratios_the_report_and_the_results_file(tmp_path: Path) -> None:
    options = Options(workers=(1, 2, 4), rounds=3, seconds=10.0)
    lane = _lane(tmp_path, options)
    # Each fleet: n workers of its own, its own class queue and registry namespace.
    for n, fleet in lane.fleets.items():
        assert len(fleet.workers) == n
        assert {w.env["INFER_REGISTRY_NAMESPACE"] for w in fleet.workers} == {fleet.queue}
        assert all(w.consumed_queues[1] == fleet.queue for w in fleet.workers)
        assert all(w.env["INFER_BATCHING"] == "false" for w in fleet.workers)
    assert len({fleet.queue for fleet in lane.fleets.values()}) == 3

    summary = lane.summary(None)
    assert summary["workers"] == [1, 2, 4] and summary["rounds"] == 3
    assert summary["req_s"] == {"1": 100.1, "2": 180.1, "4": 200.1}
    assert summary["efficiency"]["1"] == 1.0 and summary["efficiency"]["4"] == 0.5
    four = summary["points"]["4"]
    assert (four["clients"], four["in_flight"], four["worker_rss_mb"]) == (4, 32, 304.0)
    assert four["share"] == [0.25] * 4 and four["router"]["spills"] == 4 * 5 * 3
    assert four["requests"] == 3 * 2000 + 0 + 1 + 2 and four["errors"] == four["lost"] == 0
    assert four["cpu_ms_per_request"]["worker_child"] == pytest.approx(1.5 * 1000 / 2001, 1e-3)
    assert four["cores_busy"]["worker_child"] == 0.15 and four["machine_busy"] == 1.5
    assert four["service_ms"]["p50"] == 0.35 and four["rtt_ms"]["p50"] > 0
    assert summary["per_round"]["req_s.2"] == [180.0, 180.1, 180.2]
    assert len(summary["per_round"]["efficiency.4"]) == 3
    assert summary["cores"]["cpu_count"] >= summary["cores"]["affinity"] >= 1
    json.dumps(summary)

    r = ratios({"scaling": summary})
    assert r["scaling_rps_1w"] == 100.1 and r["scaling_rps_8w"] is None
    assert r["scaling_efficiency_2w"] == summary["efficiency"]["2"]
    assert r["scaling_efficiency_4w"] == 0.5 and r["scaling_efficiency_8w"] is None
    assert r["scaling_cpu_ms_per_request_4w"] == four["cpu_ms_per_request"]["total"]
    empty = ratios({})
    assert empty["scaling_efficiency_2w"] is None and empty["scaling_rps_1w"] is None
    assert "scaling_efficiency_1w" not in r  # 1 worker is the reference: no key
    # A count outside 1, 2, 4, 8 gets its keys when it ran.
    assert "scaling_efficiency_3w" not in r
    assert ratios({"scaling": {"points": {"3": {"req_s": 5.0}}}})["scaling_rps_3w"] == 5.0

    result = results_file(summary, options, {"cpus": 2}, client_rss=90.0, date="2026-12-06")
    assert set(result) == {"schema", "date", "machine", "plan", "lanes", "ratios", "memory_mb"}
    assert result["plan"]["workers"] == [1, 2, 4] and result["plan"]["lane"] == "scaling"
    assert result["memory_mb"] == {"client_rss": 90.0, "scaling_worker_rss": 304.0}

    (row,) = rows(result)
    assert row[0] == "scaling" and "efficiency: 0.900 (2w) / 0.500 (4w)" in row[8]
    table = scaling_rows(result)
    assert [t[0] for t in table] == ["1", "2", "4"] and table[2][4] == "0.500"
    assert table[2][-1] == "25%/25%"
    assert scaling_rows({"lanes": {}}) == []
    machine = {
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
    text = render({**result, "machine": machine}, "x.json")
    assert "Lane `scaling` alone: [1, 2, 4] workers" in text and "| workers | clients |" in text
    assert "| scaling_efficiency_4w | 0.500 |" in text

    # compare: the per-worker-count figures, judged by the spread of their rounds.
    _, diff = compare(result, result)
    assert "req_s.4" in diff and "efficiency.2" in diff and "scaling_efficiency_4w" in diff


def test_without_a_one_worker_point_there_is_no_efficiency(tmp_path: Path) -> None:
    lane = _lane(tmp_path, Options(workers=(2, 4), rounds=1))
    summary = lane.summary(None)
    assert summary["efficiency"] == {"2": None, "4": None}
    assert "efficiency.2" not in summary["per_round"]
    assert ratios({"scaling": summary})["scaling_efficiency_4w"] is None
