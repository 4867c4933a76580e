"""The Redis result backend, made to ride out a short Redis restart.

Celery's Redis backend builds its connection pool with no redis-py ``Retry``,
so any command that meets a dropped connection fails at once.  Celery's own
``result_backend_always_retry`` covers ``store_result`` and ``get``, but not
the chord join in ``on_chord_part_return``: a Redis blip while the last
header task of a chord stores its part turned the whole chord into a
``ChordError`` (seen in CI: scenario 6, Redis restart mid-run).

:class:`ResilientRedisBackend` gives every connection of the pool a redis-py
``Retry`` that reconnects for about ``INFER_BACKEND_RECONNECT_S`` seconds on
``ConnectionError``/``TimeoutError``, so each command (the chord's Lua script,
its join pipeline, its claim and cleanup scripts included) waits for Redis to
come back instead of failing.  Longer outages still surface, then Celery's
``result_backend_max_retries`` takes over where it applies.

It is selected through the app's loader (:class:`InferenceLoader`), Celery's
own ``override_backends`` hook, so ``redis://`` and ``rediss://`` URLs keep
their usual form everywhere (compose, the CLI, Flower).

The window multiplies with Celery's own retry loops where they exist
(``result_backend_max_retries`` for results, the result consumer's reconnect
policy of 20 tries for a client's pub/sub): a Redis that stays down is
reported after about that many windows instead of that many tries.  Hence a
short default (5 s, enough for a restart).

Caveat: a command whose reply was lost after Redis ran it is sent again.  The
writes we make are idempotent (SET of a result; celery's chord script skips a
part it already counted), except the fault suite's execution ledger's HINCRBY (tests/reliability/ledger_hook.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery._state import task_join_will_block
from celery.backends.filesystem import FilesystemBackend
from celery.backends.redis import RedisBackend, ResultConsumer
from celery.loaders.app import AppLoader
from kombu.utils.encoding import ensure_bytes
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from routing.registry import RegistryStore, store_for
from tasks.settings import Settings

__all__ = [
    "InferenceLoader",
    "ManyResultConsumer",
    "ResilientRedisBackend",
    "reconnect_retry",
    "registry_store",
]

_BASE_S = 0.05  # first waits 0.1, 0.2, 0.4 s, then every CAP
_CAP_S = 0.5


def reconnect_retry(seconds: float) -> Retry:
    """A redis-py ``Retry`` that keeps reconnecting for about ``seconds``."""
    waits, retries = 0.0, 0
    while waits < seconds:
        retries += 1
        waits += min(_CAP_S, _BASE_S * 2**retries)
    return Retry(
        ExponentialBackoff(cap=_CAP_S, base=_BASE_S),
        retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError),
    )


class ManyResultConsumer(ResultConsumer):
    """Celery's Redis result consumer that can subscribe to many result channels in one SUBSCRIBE.

    Celery subscribes to each task's result channel as the task is sent (one
    round trip to Redis each: 10-17% of ``infer.map``'s publishing CPU in a
    profile).  :meth:`consume_from_many` does what Celery's ``consume_from``
    does for each id, for all of them at once.  It uses that method's own
    private steps (``_locked``, ``_pubsub``, ``_pending_unsubscribe``,
    ``_get_key_for_task``, ``start``), as a subclass must;
    ``tests/integration/test_pipelined_publish.py`` pins it (results of a
    batch subscribed this way arrive over pub/sub).
    """

    def consume_from_many(self, task_ids: list[str]) -> None:
        if not task_ids:
            return
        with self._locked():
            if self._pubsub is None:
                self.start(task_ids[0])  # Celery's own first subscribe
            keys = []
            for task_id in task_ids:
                key = self._get_key_for_task(task_id)
                self._pending_unsubscribe.discard(key)
                if key not in self.subscribed_to:
                    self.subscribed_to.add(key)
                    keys.append(key)
            if keys:
                with self.reconnect_on_error():
                    self._pubsub.subscribe(*keys)


class ResilientRedisBackend(RedisBackend):
    """Celery's Redis backend whose connections reconnect through a short outage.

    :meth:`subscribing_together` lets a client that sends many tasks at once
    (``infer.map``, ``infer_many``) subscribe to their results in one SUBSCRIBE.
    """

    ResultConsumer = ManyResultConsumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = getattr(self.app, "infer_settings", None)
        seconds = settings.backend_reconnect_s if settings else Settings.backend_reconnect_s
        self.connparams["retry"] = reconnect_retry(seconds)
        self._deferred = threading.local()

    def on_task_call(self, producer: Any, task_id: str) -> None:
        deferred = getattr(self._deferred, "ids", None)
        if deferred is None:
            super().on_task_call(producer, task_id)
        else:
            deferred.append(task_id)

    @contextmanager
    def subscribing_together(self) -> Iterator[None]:
        """Tasks sent in this thread inside the block subscribe to their results on the way out.

        One SUBSCRIBE for all of them, after they are published, instead of one
        before each.  A result stored before that SUBSCRIBE is not missed: every
        wait for a result reads it first (``get``, ``GroupResult.join_native``).
        """
        if getattr(self._deferred, "ids", None) is not None:
            yield  # already inside one: the outer block subscribes
            return
        self._deferred.ids = []
        try:
            yield
        finally:
            ids, self._deferred.ids = self._deferred.ids, None
            if ids and not task_join_will_block():
                self.result_consumer.consume_from_many(ids)


class AtomicFilesystemBackend(FilesystemBackend):
    """Celery's ``file://`` result backend (the embedded default), whose writes are atomic.

    Celery's ``set`` opens the result file for writing and writes into it, so a
    client polling ``get`` can read half a result: with ``resnet50``'s larger
    replies the demo's client raised ``DecodeError: Unpack failed: incomplete
    input``.  Here the value goes to a temporary file in the same folder,
    which then replaces the result file (``os.replace``: atomic on POSIX).
    """

    def set(self, key: Any, value: Any) -> None:
        path = os.fsencode(self._filename(key))  # Celery's file names are bytes
        tmp = path + f".{os.getpid()}.{threading.get_ident()}.tmp".encode()
        with self.open(tmp, "wb") as outfile:
            outfile.write(ensure_bytes(value))
        os.replace(tmp, path)


class InferenceLoader(AppLoader):
    """Celery's app loader, with ``redis://``/``rediss://`` mapped to :class:`ResilientRedisBackend`
    and ``file://`` to :class:`AtomicFilesystemBackend`."""

    override_backends = {
        "redis": "tasks.wire.backend:ResilientRedisBackend",
        "rediss": "tasks.wire.backend:ResilientRedisBackend",
        "file": "tasks.wire.backend:AtomicFilesystemBackend",
    }


def registry_store(settings: Settings) -> RegistryStore:
    """The capability registry on the result backend ``settings`` name (workers write, clients read)."""
    return store_for(settings.backend, settings.home, settings.registry_namespace)
