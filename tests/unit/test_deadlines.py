"""Deadlines at every hop, with a fake clock: submit, the worker's consumer, before the forward pass."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery.app.task import Context

from models.errors import BadArguments, DeadlineExceeded, RequestError
from tasks.wire.deadline import DEADLINE_HEADER, absolute, check, normalize, of_request

NOW = 1_800_000_000.0  # a fixed wall-clock time (2027)


def test_deadline_exceeded_is_a_request_error() -> None:
    assert issubclass(DeadlineExceeded, RequestError)


@pytest.mark.parametrize(
    ("expires", "header", "expected"),
    [
        (None, None, None),
        (2, None, NOW + 2),  # Celery: seconds from now
        (0.5, None, NOW + 0.5),
        (datetime.fromtimestamp(NOW + 3, UTC), None, NOW + 3),
        (datetime.fromtimestamp(NOW + 3, UTC).isoformat(), None, NOW + 3),
        (None, 500, NOW + 0.5),  # the header: milliseconds from now
        (None, 250.0, NOW + 0.25),
        (None, datetime.fromtimestamp(NOW + 4, UTC).isoformat(), NOW + 4),
        (10, 500, NOW + 0.5),  # both: the earlier wins
        (0.1, 500, NOW + 0.1),
    ],
)
def test_absolute_reads_every_form(expires: Any, header: Any, expected: float | None) -> None:
    got = absolute(expires, header, NOW)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_a_naive_iso_time_is_utc() -> None:
    naive = datetime.fromtimestamp(NOW + 1, UTC).replace(tzinfo=None).isoformat()
    assert absolute(None, naive, NOW) == pytest.approx(NOW + 1)


@pytest.mark.parametrize(
    ("expires", "header", "named"),
    [
        ("tomorrow", None, "expires="),
        ([1], None, "expires="),
        (None, "soon", "deadline header"),
        (None, True, "deadline header"),  # a bool is not a number of milliseconds
        (None, {"ms": 5}, "deadline header"),
        (None, float("nan"), "deadline header"),
    ],
)
def test_a_malformed_deadline_is_bad_arguments_naming_the_forms(
    expires: Any, header: Any, named: str
) -> None:
    with pytest.raises(BadArguments, match=named) as raised:
        absolute(expires, header, NOW)
    assert "milliseconds from now" in str(raised.value)


def test_check_raises_only_when_past() -> None:
    check(None, NOW, "x")
    check(NOW + 0.001, NOW, "x")
    with pytest.raises(DeadlineExceeded, match=r"passed 250 ms before its forward pass"):
        check(NOW - 0.25, NOW, "its forward pass")
    with pytest.raises(DeadlineExceeded):
        check(NOW, NOW, "x")  # at the deadline is too late


def test_normalize_at_submit_makes_one_absolute_deadline() -> None:
    options: dict[str, Any] = {"headers": {"deadline": 500, "requires": {"device": "cpu"}}}
    assert normalize(options, NOW) == pytest.approx(NOW + 0.5)
    assert options["expires"] == datetime.fromtimestamp(NOW + 0.5, UTC)  # stock workers honour it
    assert options["headers"]["requires"] == {"device": "cpu"}  # other headers kept
    header = options["headers"][DEADLINE_HEADER]
    assert isinstance(header, str)
    # Absolute now: a worker reading it later gets the same time, whenever it receives it.
    assert absolute(None, header, NOW + 100) == pytest.approx(NOW + 0.5)


def test_normalize_refuses_a_past_deadline_and_leaves_no_deadline_untouched() -> None:
    with pytest.raises(DeadlineExceeded, match="before it was published"):
        normalize({"expires": -1}, NOW)
    with pytest.raises(DeadlineExceeded):
        normalize({"expires": datetime.fromtimestamp(NOW - 5, UTC)}, NOW)
    options: dict[str, Any] = {"queue": "cpu"}
    assert normalize(options, NOW) is None and options == {"queue": "cpu"}


def test_a_worker_reads_the_deadline_of_a_request_dict_or_context() -> None:
    iso = datetime.fromtimestamp(NOW + 2, UTC).isoformat()
    assert of_request({"expires": iso}, NOW) == pytest.approx(NOW + 2)
    assert of_request(Context({"expires": iso}), NOW) == pytest.approx(NOW + 2)
    assert of_request({}, NOW) is None
    # A numeric header a foreign producer did not convert counts from its send stamp...
    assert of_request({"deadline": 300, "infer_sent_at": NOW - 1}, NOW) == pytest.approx(NOW - 0.7)
    # ...else from its arrival
    assert of_request({"deadline": 300}, NOW) == pytest.approx(NOW + 0.3)
    # Junk from a foreign producer is no deadline (it must not fail the request).
    assert of_request({"deadline": "junk"}, NOW) is None


def test_the_pool_child_drops_late_requests_just_before_the_forward_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.worker import batch_job

    monkeypatch.setattr(batch_job.time, "time", lambda: NOW)
    past = datetime.fromtimestamp(NOW - 0.01, UTC).isoformat()
    future = datetime.fromtimestamp(NOW + 1, UTC).isoformat()
    requests = [
        batch_job._Request(0, Context({"id": "a", "expires": future}), NOW - 0.1),
        batch_job._Request(1, Context({"id": "b", "deadline": past}), NOW - 0.1),
        batch_job._Request(2, Context({"id": "c"}), NOW - 0.1),
        batch_job._Request(3, Context({"id": "d", "deadline": 5, "infer_sent_at": NOW - 1}), 0.0),
    ]
    kept = batch_job._in_time(requests)
    assert [r.context.id for r in kept] == ["a", "c"]
    late = [r for r in requests if r.error is not None]
    assert [r.context.id for r in late] == ["b", "d"]
    assert all(isinstance(r.error, DeadlineExceeded) for r in late)
    assert all(r.traceback is None for r in late)  # a RequestError: stored without a traceback


def test_the_consumer_drops_by_deadline_but_leaves_revoked_ones_to_celery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.worker import expired

    def request(request_dict: dict[str, Any]) -> Any:
        """A request as DeadlineRequest sees it: its deadline read by its own property."""
        r = SimpleNamespace(id="r1", request_dict=request_dict, _deadline=False)
        r.deadline = expired.DeadlineRequest.deadline.fget(r)  # type: ignore[attr-defined]
        return r

    past = {"expires": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
    late = expired.DeadlineRequest.past_deadline(request(past), datetime.now(UTC).timestamp())
    assert isinstance(late, DeadlineExceeded) and "could start it" in str(late)
    later = request({"deadline": (datetime.now(UTC) + timedelta(seconds=9)).isoformat()})
    assert expired.DeadlineRequest.past_deadline(later, datetime.now(UTC).timestamp()) is None
    # Revoked by id (AsyncResult.revoke()): Celery's REVOKED, whatever its deadline.
    monkeypatch.setattr(expired, "revoked_tasks", {"r1"})
    assert (
        expired.DeadlineRequest.past_deadline(request(past), datetime.now(UTC).timestamp()) is None
    )


def test_a_request_reads_its_deadline_once() -> None:
    """A numeric header without a send stamp counts from the first read, not from each check."""
    from tasks.worker import expired

    r = SimpleNamespace(request_dict={"deadline": 500}, _deadline=False)
    first = expired.DeadlineRequest.deadline.fget(r)  # type: ignore[attr-defined]
    time.sleep(0.01)
    assert expired.DeadlineRequest.deadline.fget(r) == first  # type: ignore[attr-defined]
    assert first is not None and abs(first - (time.time() + 0.5)) < 0.1
    assert (
        expired.DeadlineRequest.deadline.fget(  # type: ignore[attr-defined]
            SimpleNamespace(request_dict={}, _deadline=False)
        )
        is None
    )


def test_model_of_an_infer_call_for_the_metric_label() -> None:
    from tasks.worker.expired import model_of

    assert model_of(["mlp@2", [0.5]], {}) == "mlp"
    assert model_of([], {"model": "cnn", "inputs": [1]}) == "cnn"
    assert model_of("junk", None) == "unknown"
