"""The Celery app.  ``celery -A tasks`` finds it as ``tasks.app``.

Configuration is lazy: the environment is read the first time the app's
configuration is needed (``add_defaults`` with a callable), not at import, and
nothing connects to a broker until a task is sent or a worker starts.  With
``INFER_SIGNING_DIR`` set, that first read also switches on message signing
(:mod:`tasks.signing`; task and control messages are signed, results are not).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from tasks.codec import display
from tasks.settings import Settings

__all__ = ["SENT_AT_HEADER", "InferenceApp", "app"]

# Wall-clock publish time, added to every task message so the worker can
# report queue wait (meaningful across hosts when their clocks are synced).
SENT_AT_HEADER = "infer_sent_at"


class InferenceApp(Celery):
    """A Celery app whose configuration comes from one :class:`Settings` object."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("amqp", "tasks.queues:InferenceAMQP")
        # Every task skips a duplicate delivery whose SUCCESS is stored (tasks.dedup).
        kwargs.setdefault("task_cls", "tasks.dedup:IdempotentTask")
        # redis:// results through tasks.backend.ResilientRedisBackend (rides out a Redis restart).
        kwargs.setdefault("loader", "tasks.backend:InferenceLoader")
        super().__init__("tasks", **kwargs)
        if settings is not None:
            # Celery's conf.result_backend prefers the CELERY_RESULT_BACKEND
            # environment variable over any configuration; an app given its
            # own settings must use their backend.  (Its broker still comes
            # from CELERY_BROKER_URL when that is set.)
            self.backend_cls = settings.backend
        self._infer_settings = settings
        self.add_defaults(self._config)
        self.on_after_configure.connect(self._enable_signing, weak=False)

    def _config(self) -> dict[str, Any]:
        config = self.infer_settings.celery_config()
        if config["task_routes"] and self is not app:
            from tasks.routes import AppRoute  # tasks.routes imports this module

            config["task_routes"] = [AppRoute(self)]  # its own router, from its own settings
        if self.infer_settings.signing_dir is not None:
            from tasks import signing  # loads the key and certificates: a bad file stops us here

            config.update(signing.celery_config(self.infer_settings))
        return config

    def _enable_signing(self, **_: Any) -> None:
        # setup_security needs the configuration read (it checks task_serializer
        # is auth), so it runs once that is done, never at import.
        if self.infer_settings.signing_dir is not None:
            from tasks import signing

            signing.enable(self)

    @property
    def infer_settings(self) -> Settings:
        """The settings, read from the environment on first use unless given."""
        if self._infer_settings is None:
            self._infer_settings = Settings.from_env()
        return self._infer_settings


app = InferenceApp()
app.conf.include = [
    "tasks.inference",
    "tasks.batching",
    "tasks.diagnostics",
    "tasks.worker",
    "tasks.control",
]


@before_task_publish.connect
def _stamp_sent_at(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **_: Any,
) -> None:
    # The signal fires for every Celery app in the process: stamp only our tasks.
    if headers is not None and sender in app.tasks:
        headers.setdefault(SENT_AT_HEADER, time.time())
        args, kwargs = (body or ((), {}))[:2] if isinstance(body, tuple | list) else ((), {})
        # What Flower, events and logs show: shapes and sizes, never tensor bytes.
        headers["argsrepr"] = "(" + ", ".join(display(a) for a in args or ()) + ")"
        headers["kwargsrepr"] = (
            "{" + ", ".join(f"{k!r}: {display(v)}" for k, v in (kwargs or {}).items()) + "}"
        )
