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

from typing import Any

from celery.backends.redis import RedisBackend
from celery.loaders.app import AppLoader
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from routing.registry import RegistryStore, store_for
from tasks.settings import Settings

__all__ = ["InferenceLoader", "ResilientRedisBackend", "reconnect_retry", "registry_store"]

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


class ResilientRedisBackend(RedisBackend):
    """Celery's Redis backend whose connections reconnect through a short outage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = getattr(self.app, "infer_settings", None)
        seconds = settings.backend_reconnect_s if settings else Settings.backend_reconnect_s
        self.connparams["retry"] = reconnect_retry(seconds)


class InferenceLoader(AppLoader):
    """Celery's app loader, with ``redis://``/``rediss://`` mapped to :class:`ResilientRedisBackend`."""

    override_backends = {
        "redis": "tasks.wire.backend:ResilientRedisBackend",
        "rediss": "tasks.wire.backend:ResilientRedisBackend",
    }


def registry_store(settings: Settings) -> RegistryStore:
    """The capability registry on the result backend ``settings`` name (workers write, clients read)."""
    return store_for(settings.backend, settings.home, settings.registry_namespace)
