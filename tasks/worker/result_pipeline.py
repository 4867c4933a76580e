"""A batch's results in one Redis round trip, written exactly as Celery's Redis backend writes them.

Celery stores each task's result with its own round trips: a GET (so a
SUCCESS is never overwritten), then a pipeline of ``SETEX
celery-task-meta-<id>`` and ``PUBLISH`` on the same key (the channel
``AsyncResult.get()`` listens on).  A batch of 32 requests made 64 round trips
for that, plus one GET each for deduplication.  Here a batch makes two:

- :func:`succeeded_ids`: one ``MGET`` of every request's result key.  A
  request whose SUCCESS is stored is acked, never run again (deduplication),
  and the same read stands in for Celery's GET-before-SET.
- :func:`store_all`: one pipeline with a ``SETEX`` (``SET`` when results do
  not expire) and a ``PUBLISH`` per result, same keys, same encoding
  (``backend.encode`` of the meta Celery builds), same expiry (failures use
  ``result_failure_expires``), retried on a connection error the way the
  backend retries its own writes (``backend.ensure``).

The meta comes from ``backend._get_result_meta``, a private Celery method,
used because it is the one place that builds the stored dict (``date_done``,
``children``, ``group_id``, ``parent_id``, the extended fields).
``tests/unit/test_result_pipeline.py`` pins it: for the same result, the key
and the decoded value equal what ``backend.store_result`` writes, and a
Celery upgrade that changes either fails that test.

Chord parts, chains and errbacks are not written here: the batch job calls
the backend's public ``on_chord_part_return`` and ``mark_as_failure(...,
store_result=False)`` for those requests after this pipeline has run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from celery import states
from celery.backends.redis import RedisBackend

__all__ = ["ResultEntry", "result_entry", "store_all", "succeeded_ids", "supports_pipeline"]

log = logging.getLogger(__name__)


class ResultEntry(NamedTuple):
    key: str
    value: Any  # what backend.encode returns (bytes under msgpack, str under json)
    expires: int | None


def supports_pipeline(backend: Any) -> bool:
    """Whether ``backend`` is Celery's Redis backend (or ours, built on it)."""
    return isinstance(backend, RedisBackend)


def succeeded_ids(backend: RedisBackend, task_ids: Sequence[str]) -> set[str]:
    """The ids among ``task_ids`` whose SUCCESS is stored: one MGET (empty if it cannot tell)."""
    if not task_ids:
        return set()
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    try:
        values = backend.mget(keys)
    except Exception as e:  # an unreachable backend must not stop the work
        log.warning("deduplication read of %d results failed (%s): running them", len(keys), e)
        return set()
    done: set[str] = set()
    for task_id, value in zip(task_ids, values, strict=True):
        if value and backend.decode_result(value).get("status") == states.SUCCESS:
            done.add(task_id)
    return done


def result_entry(
    backend: RedisBackend,
    task_id: str,
    result: Any,
    state: str,
    traceback: str | None = None,
    request: Any = None,
) -> ResultEntry:
    """The key, value and expiry Celery's ``store_result`` would write for this result."""
    encoded = backend.encode_result(result, state)
    # private: Celery's own builder of the stored meta (see the module docstring)
    meta = backend._get_result_meta(
        result=encoded, state=state, traceback=traceback, request=request
    )
    meta["task_id"] = task_id
    value = backend.encode(meta)
    if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:  # private: its limit
        raise ValueError(f"the result of {task_id} is over Redis' value size limit")
    expires = backend.failure_expires if state == states.FAILURE else backend.expires
    return ResultEntry(backend.get_key_for_task(task_id), value, expires)


def store_all(backend: RedisBackend, entries: Sequence[ResultEntry]) -> None:
    """Write every entry (SETEX or SET, then PUBLISH) in one pipeline, retried like the backend's."""
    if entries:
        backend.ensure(_execute, (backend, entries))


def _execute(backend: RedisBackend, entries: Sequence[ResultEntry]) -> None:
    with backend.client.pipeline(transaction=False) as pipe:
        for key, value, expires in entries:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.execute()
