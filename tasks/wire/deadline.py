"""Request deadlines: Celery's ``expires`` and the ``deadline`` header, as one absolute time.

A caller states a deadline in either of two ways (both may be given; the
earlier wins):

- stock Celery: ``infer.apply_async(args, expires=...)``: seconds from now, a
  ``datetime`` or an ISO 8601 string;
- a header: ``headers={"deadline": 500}`` (a number: **milliseconds from
  now**) or ``headers={"deadline": "2026-12-06T18:00:00.250+00:00"}`` (a
  string: an absolute ISO 8601 time; without a zone it is UTC).

This project's client (:meth:`tasks.app.InferenceApp.send_task`) turns both
into one absolute time before anything is published: already past is
:class:`~models.errors.DeadlineExceeded` at submit; otherwise the message
carries it as Celery's ``expires`` (so a stock worker honours it too) and as
an absolute ``deadline`` header.  A worker checks it again in its consumer,
before a request joins a batch, and in the pool child just before the
forward pass (:func:`check`).  A numeric header from a client that did not
convert it (one that imports nothing of ours) counts from the message's
``infer_sent_at`` stamp, else from when the worker received it.

Clocks: the deadline is wall-clock time, compared across hosts, so hosts
need synchronised clocks (NTP/chrony; see docs/beyond-one-machine.md).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from models.errors import BadArguments, DeadlineExceeded, echo
from routing.admission import DEADLINE_HEADER

__all__ = ["DEADLINE_HEADER", "absolute", "check", "normalize", "of_request"]

_FORMS = (
    "write headers={'deadline': 500} (milliseconds from now) or an ISO 8601 time such as "
    "'2026-12-06T18:00:00+00:00', or expires= (seconds from now, a datetime or ISO 8601)"
)


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _iso(value: str, what: str) -> float:
    try:
        return _timestamp(datetime.fromisoformat(value))
    except ValueError:
        raise BadArguments(f"{what} {echo(value)} is not an ISO 8601 time: {_FORMS}") from None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def absolute(
    expires: object, header: object, now: float, since: float | None = None
) -> float | None:
    """The earlier of ``expires`` and the ``deadline`` header, as wall-clock seconds; None if neither.

    ``expires``: seconds from ``now``, a datetime or an ISO string (Celery's
    forms).  ``header``: milliseconds from ``since`` (default ``now``), or an
    ISO string.  Anything else is :class:`~models.errors.BadArguments`
    naming the forms that work.
    """
    found: list[float] = []
    if expires is not None:
        seconds = _number(expires)
        if isinstance(expires, datetime):
            found.append(_timestamp(expires))
        elif isinstance(expires, str):
            found.append(_iso(expires, "expires="))
        elif seconds is not None:
            found.append(now + seconds)
        else:
            raise BadArguments(f"expires={echo(expires)} is not a time: {_FORMS}")
    if header is not None:
        ms = _number(header)
        if isinstance(header, str):
            found.append(_iso(header, "the deadline header"))
        elif ms is not None:
            found.append((now if since is None else since) + ms / 1000.0)
        else:
            raise BadArguments(f"the deadline header {echo(header)} is not a deadline: {_FORMS}")
    return min(found) if found else None


def check(deadline: float | None, now: float, where: str) -> None:
    """Raise :class:`~models.errors.DeadlineExceeded` if ``deadline`` is past at ``now``."""
    if deadline is not None and now >= deadline:
        late_ms = (now - deadline) * 1000.0
        raise DeadlineExceeded(
            f"the request's deadline passed {late_ms:.0f} ms before {where}: it was not computed. "
            "Send it again with a later deadline (expires= or the deadline header), or add "
            "workers if requests keep waiting this long"
        )


def normalize(options: dict[str, Any], now: float) -> float | None:
    """A caller's ``send_task`` options with their deadline made absolute; the deadline, or None.

    Sets ``expires`` (a UTC datetime) and the ``deadline`` header (ISO 8601)
    to the earlier of the two.  Raises DeadlineExceeded when it is already
    past: nothing is published.
    """
    headers = options.get("headers")
    header = headers.get(DEADLINE_HEADER) if isinstance(headers, dict) else None
    deadline = absolute(options.get("expires"), header, now)
    if deadline is None:
        return None
    check(deadline, now, "it was published")
    when = datetime.fromtimestamp(deadline, UTC)
    options["expires"] = when
    options["headers"] = {**(headers or {}), DEADLINE_HEADER: when.isoformat()}
    return deadline


def of_request(request: dict[str, Any] | Any, arrived: float) -> float | None:
    """The deadline of a received request (its ``expires`` and ``deadline`` header); None if none.

    ``request`` is Celery's request dict or context (``expires``, headers
    merged in).  A malformed value counts as no deadline here: the client
    refuses those at submit, and a foreign producer's junk must not fail the
    request.
    """
    get = request.get if isinstance(request, dict) else lambda k: getattr(request, k, None)
    sent = _number(get("infer_sent_at"))
    try:
        return absolute(get("expires"), get(DEADLINE_HEADER), arrived, since=sent or arrived)
    except BadArguments:
        return None
