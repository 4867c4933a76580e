"""CPU accounting over fake process objects: deltas per group, children, per-request medians."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from benchmarks.cpu import CpuMeter, descendants, own, per_request_ms, round_ms
from benchmarks.ratios import ratios
from benchmarks.report import cpu_rows


@dataclass
class FakeProcess:
    pid: int
    user: float = 0.0
    system: float = 0.0
    children_user: float = 0.0
    children_system: float = 0.0
    kids: list[FakeProcess] = field(default_factory=list)
    gone: bool = False

    def cpu_times(self) -> Any:
        if self.gone:
            raise psutil.NoSuchProcess(self.pid)
        return SimpleNamespace(
            user=self.user,
            system=self.system,
            children_user=self.children_user,
            children_system=self.children_system,
        )

    def children(self, recursive: bool = False) -> list[FakeProcess]:
        if self.gone:
            raise psutil.NoSuchProcess(self.pid)
        out = []
        for kid in self.kids:
            out.append(kid)
            if recursive:
                out += kid.children(recursive=True)
        return out


def test_the_meter_counts_each_group_over_its_window_only() -> None:
    client = FakeProcess(1, user=10.0, system=2.0)
    child = FakeProcess(3, user=5.0)
    worker = FakeProcess(2, user=1.0, kids=[child])
    broker = FakeProcess(4, user=100.0, system=50.0)
    meter = CpuMeter(
        {
            "client": own(client),
            "worker_main": own(worker),
            "worker_child": descendants(worker),
            "rabbitmq": own(broker),
            "redis": own(None),  # not on this host: no entry
        }
    )
    meter.start()
    client.user += 0.3
    client.system += 0.1
    worker.system += 0.2
    child.user += 0.5
    broker.user += 0.25
    cpu = meter.stop({"client": 0.4})  # e.g. what the producer processes reported
    assert cpu == pytest.approx(
        {"client": 0.8, "worker_main": 0.2, "worker_child": 0.5, "rabbitmq": 0.25}
    )
    # The next window starts from the new readings.
    meter.start()
    broker.system += 0.5
    assert meter.stop() == pytest.approx(
        {"client": 0.0, "worker_main": 0.0, "worker_child": 0.0, "rabbitmq": 0.5}
    )


def test_a_new_pool_child_counts_from_zero_and_a_reaped_one_through_its_parent() -> None:
    old = FakeProcess(3, user=5.0)
    worker = FakeProcess(2, kids=[old])
    meter = CpuMeter({"worker_child": descendants(worker)})
    meter.start()
    worker.kids = [FakeProcess(4, user=0.7, kids=[FakeProcess(5, system=0.1)])]  # old replaced
    worker.children_user += 5.2  # the old child's total, reaped by the worker
    assert meter.stop() == pytest.approx({"worker_child": 0.7 + 0.1 + 5.2})


def test_a_process_gone_at_the_end_reads_as_nothing_not_an_error() -> None:
    peer = FakeProcess(7, user=1.0)
    meter = CpuMeter({"worker_main": own(peer), "worker_child": descendants(peer)})
    meter.start()
    peer.gone = True
    assert meter.stop() == {"worker_main": 0.0, "worker_child": 0.0}


def test_per_request_ms_is_the_median_of_rounds_and_total_the_median_of_totals() -> None:
    rounds = [
        ({"client": 0.1, "worker_main": 0.2}, 100),  # 1 + 2 = 3 ms
        ({"client": 0.3, "worker_main": 0.1}, 100),  # 3 + 1 = 4 ms
        ({"client": 0.2, "worker_main": 0.6}, 200),  # 1 + 3 = 4 ms
        ({"client": 1.0}, 0),  # served nothing: skipped
    ]
    assert round_ms(*rounds[0]) == pytest.approx({"client": 1.0, "worker_main": 2.0, "total": 3.0})
    assert per_request_ms(rounds) == {"client": 1.0, "worker_main": 2.0, "total": 4.0}
    assert per_request_ms([]) == {}


def test_the_cpu_ratios() -> None:
    def lane(cpu: dict[str, float]) -> dict[str, Any]:
        return {"cpu_ms_per_request": cpu}

    lanes = {
        "deployment_infer": lane({"client": 1.0, "worker_main": 2.0, "worker_child": 6.0}),
        "deployment_infer_batched": lane(
            {"client": 1.0, "worker_main": 1.0, "worker_child": 1.0, "total": 3.5}
        ),
    }
    r = ratios(lanes)
    assert r["batched_vs_infer_worker_cpu_per_request"] == 0.25
    assert r["batched_total_cpu_ms_per_request"] == 3.5
    empty = ratios({})
    assert empty["batched_vs_infer_worker_cpu_per_request"] is None
    assert empty["batched_total_cpu_ms_per_request"] is None


def test_the_terminal_cpu_table_has_a_row_per_lane_that_records_cpu() -> None:
    result = {
        "lanes": {
            "router": {"decision_us_p99": 1.0},
            "amqp_floor": {"cpu_ms_per_request": {"client": 0.5, "rabbitmq": 0.25, "total": 0.75}},
        }
    }
    assert cpu_rows(result) == [("amqp_floor", "0.500", "-", "-", "0.250", "-", "0.750")]
