"""Admission control and the service meter, with fake clocks (routing/admission.py, tasks/worker/load.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from models.errors import InferenceError, Overloaded, RequestError
from routing.admission import Admission
from routing.capabilities import TaskRequirements
from routing.router import CapabilityRouter
from tasks.worker.load import ServiceMeter, SharedLoad
from tests.unit.test_routing import worker

T0 = 1000.0  # the records' heartbeat time in tests.unit.test_routing.worker


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_overloaded_is_not_a_request_error() -> None:
    # The request is fine; the fleet is busy: retrying later can succeed.
    assert issubclass(Overloaded, InferenceError) and not issubclass(Overloaded, RequestError)


def test_expected_wait_is_backlog_plus_one_over_the_rate() -> None:
    clock = Clock()
    admission = Admission(clock=clock)
    w = worker("a", service_rate=100.0, backlog=49)
    est = admission.expected_wait(w)
    assert est.wait_s == pytest.approx(0.5) and est.pending == 49 and est.rate == 100.0


def test_the_estimate_drains_since_the_heartbeat_and_counts_this_clients_sends() -> None:
    clock = Clock(T0 + 0.2)  # 0.2 s after the beat: 20 of the 49 have been served
    admission = Admission(clock=clock)
    w = worker("a", service_rate=100.0, backlog=49)
    assert admission.expected_wait(w).pending == pytest.approx(29)
    admission.routed(w, now=T0 - 0.1)  # before the beat: already in its backlog
    for _ in range(10):  # routed by this client after the beat
        admission.routed(w, now=T0 + 0.1)
    assert admission.expected_wait(w).pending == pytest.approx(39)
    # The next beat (backlog measured again) replaces this client's count.
    newer = worker("a", service_rate=100.0, backlog=5, heartbeat=T0 + 0.15)
    assert admission.expected_wait(newer).pending == pytest.approx(5 - 100 * 0.05)
    assert admission.expected_wait(
        worker("a", service_rate=100.0, backlog=49)
    ).pending == pytest.approx(29)


def test_an_idle_worker_with_an_old_heartbeat_is_not_credited_with_draining_new_sends() -> None:
    """Requests routed in the last moment have not been drained for the heartbeat's whole age:
    backlog + sent - rate x age admitted 366 at once at the start of the lane's 4x level."""
    clock = Clock(T0 + 1.8)  # the record is 1.8 s old; the worker was idle at the beat
    admission = Admission(margin=0.25, clock=clock)
    w = worker("a", service_rate=200.0, backlog=0, batch_s=0.1)
    admitted = 0
    for i in range(500):  # 500 requests in 50 ms, each with 500 ms left
        clock.t = T0 + 1.8 + i * 0.0001
        if admission.expected_wait(w).fits(0.5, admission.margin):
            admission.routed(w)
            admitted += 1
    # (pending / 200 + 0.1) x 1.25 <= 0.5: 60 pending, plus the 9 drained while they came.
    assert 60 <= admitted <= 71, admitted
    assert admission.expected_wait(w).pending == pytest.approx(60, abs=1.0)
    clock.t += 0.2  # 0.2 s later, 40 of them have been served
    assert admission.expected_wait(w).pending == pytest.approx(20, abs=1.0)


def test_a_request_s_own_batch_is_at_most_its_share_of_the_time_left() -> None:
    """The worker caps a deadline request's batch at INFER_BATCH_DEADLINE_SHARE of its budget:
    long batches of requests without a deadline must not make every deadline request refused
    (nothing admitted, nothing served, the figures never change)."""
    w = worker("a", service_rate=178.0, backlog=0, batch_s=0.36)  # after 64-request batches
    capped = Admission(margin=0.5, clock=Clock(), batch_share=0.25)
    assert capped.expected_wait(w, left=0.5).wait_s == pytest.approx(0.125)
    assert capped.choose(w, [w], T0 + 0.5) is w
    uncapped = Admission(margin=0.5, clock=Clock())
    with pytest.raises(Overloaded):
        uncapped.choose(w, [w], T0 + 0.5)  # 0.36 x 1.5 > 0.5
    assert capped.expected_wait(w).wait_s == pytest.approx(0.36)  # no deadline: its batches


def test_an_unmeasured_worker_is_admitted() -> None:
    admission = Admission(clock=Clock())
    idle = admission.expected_wait(worker("a", service_rate=0.0, backlog=0))
    assert idle.wait_s == 0.0 and idle.fits(0.001, 0.25)
    unknown = admission.expected_wait(worker("a", service_rate=0.0, backlog=30))
    assert unknown.wait_s is None and unknown.fits(0.001, 0.25)  # no data is not overload


def test_choose_keeps_a_fitting_worker_reroutes_or_refuses_naming_the_figures() -> None:
    clock = Clock()
    admission = Admission(margin=0.25, clock=clock)
    slow = worker("slow", service_rate=100.0, backlog=99)  # 1.0 s
    fast = worker("fast", service_rate=100.0, backlog=19)  # 0.2 s
    assert admission.choose(fast, [slow, fast], T0 + 0.3) is fast  # 0.25 s with the margin
    assert admission.choose(slow, [slow, fast], T0 + 0.3) is fast  # rerouted
    with pytest.raises(Overloaded) as raised:
        admission.choose(slow, [slow, fast], T0 + 0.2)  # 0.2 x 1.25 > 0.2
    message = str(raised.value)
    assert "expected wait 0.200 s" in message and "fast@h" in message
    assert "200 ms left" in message and "nothing was published" in message
    assert admission.refused == 1


def _router(workers: list[Any], admission: Admission) -> CapabilityRouter:
    snapshot = {w.name: w for w in workers}
    return CapabilityRouter(
        lambda: snapshot, lambda *_: TaskRequirements(), admission=admission, clock=Clock()
    )


def test_the_router_admits_by_the_deadline_header_and_counts_refusals() -> None:
    clock = Clock()
    busy = worker("busy", service_rate=10.0, backlog=40)  # 4.1 s
    router = _router([busy], Admission(clock=clock))
    # As Celery calls it: expires= is not in the options, the absolute deadline header is.
    late = {"headers": {"deadline": datetime.fromtimestamp(T0 + 10, UTC).isoformat()}}
    soon = {"headers": {"deadline": datetime.fromtimestamp(T0 + 1, UTC).isoformat()}}
    assert router("tasks.infer", [], {}, late) == {"queue": busy.queue}
    with pytest.raises(Overloaded):
        router("tasks.infer", [], {}, soon)
    assert router.stats.overloaded == 1
    # No deadline: never refused here (the queue bound applies instead).
    assert router("tasks.infer", [], {}, {}) == {"queue": busy.queue}
    # Switched off (INFER_ADMISSION=false): admitted whatever the wait.
    off = _router([busy], Admission(enabled=False, clock=clock))
    assert off("tasks.infer", [], {}, soon)
    # A header not made absolute (a numeric one from a foreign client) or junk: no deadline.
    assert router("tasks.infer", [], {}, {"headers": {"deadline": 5}}) == {"queue": busy.queue}
    assert router("tasks.infer", [], {}, {"headers": {"deadline": "x"}}) == {"queue": busy.queue}


def test_the_router_reroutes_a_sticky_request_whose_worker_is_too_slow() -> None:
    clock = Clock()
    slow = worker("slow", service_rate=10.0, backlog=40, models_loaded=("m",))
    fast = worker("fast", service_rate=100.0, backlog=0)
    router = _router([slow, fast], Admission(clock=clock))
    req = TaskRequirements(model="m")
    assert router.decide(req).name == slow.name  # holds the model: the ladder's pick
    assert router.decide(req, deadline=T0 + 1).name == fast.name
    assert router.stats.rerouted == 1
    assert router.sticky.get(req.key) == slow.name  # affinity kept for calmer times


def test_service_meter_counts_busy_time_only() -> None:
    clock = Clock(0.0)
    meter = ServiceMeter(window_s=10.0, clock=clock)
    assert meter.rate() == 0.0
    meter.arrived(4)
    clock.t = 0.1
    meter.left(4)  # 4 served in 0.1 s of work
    clock.t = 5.0  # idle for 4.9 s: not counted against it
    assert meter.rate() == pytest.approx(40.0)
    meter.arrived(2)
    clock.t = 5.1
    meter.left(2, completed=0)  # dropped past their deadline: busy time, no completions
    assert meter.rate() == pytest.approx(4 / 0.2)
    clock.t = 20.0  # everything slid out of the window: an idle worker keeps its last rate
    assert meter.rate() == pytest.approx(4 / 0.2) and meter.outstanding == 0


def test_service_meter_prefers_pool_job_service_time_over_busy_time() -> None:
    # A batching worker fed at half its capacity is busy nearly all the time: busy time would
    # advertise what it was offered.  Its pool jobs' service time says what it can do.
    clock = Clock(0.0)
    meter = ServiceMeter(window_s=10.0, clock=clock)
    meter.arrived(100)
    for _ in range(10):
        clock.t += 1.0
        meter.left(10)
        meter.served(10, 0.05)  # 10 requests in a 50 ms batch, once a second
    assert meter.rate() == pytest.approx(200.0)
    assert meter.batch_s == pytest.approx(0.05)


def test_service_meter_counts_saturated_jobs_and_a_half_fed_worker_keeps_their_rate() -> None:
    """Small batches of a half-fed worker are slower per request; advertising their rate made
    admission refuse more, which fed the worker less.  Saturated jobs say what it can do."""
    clock = Clock(0.0)
    meter = ServiceMeter(window_s=10.0, clock=clock)
    for _ in range(5):
        clock.t += 0.3
        meter.served(60, 0.3, saturated=True)  # full batches: 200 req/s
        meter.served(2, 0.03)  # a small one in between: 67 req/s, not counted beside them
    assert meter.rate() == pytest.approx(200.0)
    clock.t += 11.0  # the saturated jobs slide out; the worker is now fed in small batches
    for _ in range(5):
        clock.t += 0.1
        meter.served(2, 0.03)
    assert meter.rate() == pytest.approx(200.0)  # what its full batches did last time
    clock.t += 11.0
    for _ in range(5):
        clock.t += 0.3
        meter.served(60, 0.5, saturated=True)  # slower now (another process on the core)
    assert meter.rate() == pytest.approx(120.0)  # saturated jobs always win: it fell
    fresh = ServiceMeter(window_s=10.0, clock=clock)
    fresh.served(2, 0.03)  # never saturated: all its jobs
    assert fresh.rate() == pytest.approx(2 / 0.03)


def test_the_estimate_counts_the_requests_own_batch() -> None:
    admission = Admission(clock=Clock())
    # 20 ahead at 200 req/s, then its own batch of 300 ms: 0.4 s, not 0.105 s.
    w = worker("a", service_rate=200.0, backlog=20, batch_s=0.3)
    assert admission.expected_wait(w).wait_s == pytest.approx(0.4)


def test_service_meter_open_busy_interval_counts_until_now() -> None:
    clock = Clock(0.0)
    meter = ServiceMeter(window_s=10.0, clock=clock)
    meter.arrived(10)
    clock.t = 1.0
    meter.left(5)
    clock.t = 2.0  # still busy with 5
    assert meter.rate() == pytest.approx(5 / 2.0) and meter.outstanding == 5


def test_shared_load_carries_figures_heads_and_drops_to_the_forked_process() -> None:
    shared = SharedLoad(["mlp", "cnn"], ["cpu.direct.w", "cpu"])
    clock = Clock(0.0)
    meter = ServiceMeter(clock=clock)
    meter.arrived(3)
    clock.t = 0.5
    meter.left(1)
    assert shared.outstanding is None  # the consumer has not published: the child measures
    shared.publish(meter, from_consumer=True)
    assert shared.outstanding == 2 and shared.rate == pytest.approx(2.0)
    other = ServiceMeter(clock=clock)
    shared.publish(other, from_consumer=False)  # the consumer's figures win
    assert shared.outstanding == 2
    assert shared.heads() == {}
    shared.head("cpu", 0.25, 123.0)
    shared.head("elsewhere", 1.0, 1.0)  # not a queue it consumes
    assert shared.heads() == {"cpu": [0.25, 123.0]}
    shared.expired("mlp")
    shared.expired("mlp")
    shared.expired("a-model-added-later")
    assert shared.expired_counts() == {"mlp": 2, "unknown": 1}


def test_a_worker_that_cannot_consume_is_passed_over_even_for_a_busy_one() -> None:
    # Issue 16's scenario 7b: the sticky worker reaches Redis but no broker (accepting false,
    # advertised at its limit) while every other worker is at its limit too.
    stuck = worker("stuck", in_flight=4, accepting=False, models_loaded=("m",))
    busy = worker("busy", in_flight=4)
    router = _router([stuck, busy], Admission(clock=Clock()))
    req = TaskRequirements(model="m")
    router.sticky.put(req.key, stuck.name, "m")
    assert router.decide(req).name == busy.name
    assert router.sticky.get(req.key) == stuck.name
    # Fresh choices rank it last too, loaded model or not.
    fresh = _router([stuck, busy], Admission(clock=Clock()))
    assert fresh.decide(TaskRequirements(model="m")).name == busy.name
