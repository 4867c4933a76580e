"""Two probes of what a client publishes: a stock Celery client, and a publish recorder.

A stock client imports nothing of this project, so it sends headers and
options as they are (no deadline normalised, no typed refusal).
:func:`publishes` records what this process publishes meanwhile, to prove a
refused call published nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

__all__ = ["plain_client", "publishes"]


@contextmanager
def plain_client() -> Iterator[Celery]:
    """Stock Celery on the session's broker and backend, with the workers' serializer."""
    client = Celery(
        "plain",
        broker=os.environ["CELERY_BROKER_URL"],
        backend=os.environ["CELERY_RESULT_BACKEND"],
    )
    client.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
        broker_transport_options={"confirm_publish": True},
    )
    try:
        yield client
    finally:
        client.close()


@contextmanager
def publishes() -> Iterator[list[str]]:
    """The names of the tasks this process publishes meanwhile (``before_task_publish``)."""
    sent: list[str] = []

    def record(sender: str | None = None, **_: Any) -> None:
        sent.append(str(sender))

    before_task_publish.connect(record, weak=False)
    try:
        yield sent
    finally:
        before_task_publish.disconnect(record)
