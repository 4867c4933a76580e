"""A vanilla Celery app, not ours: the peers the deployment is measured against.

``celery -A benchmarks.vanilla worker`` with ``BENCH_VANILLA_PROFILE`` set to:

- ``baseline``: the deployment's durability and nothing else: same broker,
  backend and serializer, quorum queues (Celery's own
  ``task_create_missing_queue_type``), publisher confirms, late acks, reject
  on worker loss, prefetch 1, one prefork child.  The ratio
  ``deployment_noop / celery_baseline`` isolates what our own code adds.
- ``default``: stock Celery defaults (json, early acks, prefetch 4, prefork
  with one child per CPU, gossip/mingle/heartbeat on), same broker and backend.
  One deviation: it also *accepts* msgpack, because at start-up mingle asks
  every worker on the broker to say hello, and ours answer in msgpack; a
  strictly stock worker would crash on that reply (ContentDisallowed).
- ``tuned``: the fastest stock configuration we found on this broker: solo
  pool (no parent-to-child pipe), msgpack, early acks, no confirms, no
  gossip/mingle/heartbeat, and ``rpc://`` results (replies over AMQP to the
  caller's own queue).  With Redis results this profile had a better closed-
  loop p50 (1.8 ms vs 2.5 ms here) but stalled for ~10 s at a time with 16 in
  flight (70-120 tasks/s): the worker had finished every task while the
  client's ``AsyncResult.get`` sat in Celery 5.7.0's Redis pub/sub consumer.
  rpc results do not stall, so they are the strongest stock choice overall.

The profile is read lazily, when the app's configuration is first needed.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

__all__ = ["PROFILES", "app", "config", "noop", "worker_command"]

PROFILES = ("baseline", "default", "tuned")


def config(profile: str, broker: str, backend: str, serializer: str) -> dict[str, Any]:
    """The Celery configuration of one peer profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown vanilla profile {profile!r}: use one of {', '.join(PROFILES)}")
    conf: dict[str, Any] = {"broker_url": broker, "result_backend": backend}
    if profile == "baseline":
        conf.update(
            task_serializer=serializer,
            result_serializer=serializer,
            accept_content=[serializer],
            result_accept_content=[serializer],
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            task_default_queue_type="quorum",
            task_create_missing_queue_type="quorum",
            broker_transport_options={"confirm_publish": True} if broker.startswith("amqp") else {},
        )
    elif profile == "default":
        conf.update(accept_content=["json", "msgpack"])
    elif profile == "tuned":
        conf.update(
            result_backend="rpc://",
            task_serializer="msgpack",
            result_serializer="msgpack",
            accept_content=["msgpack"],
            result_accept_content=["msgpack"],
        )
    return conf


def worker_command(profile: str, name: str, queue: str) -> list[str]:
    """The ``celery worker`` argv for ``profile`` (first word ignored by the launcher)."""
    base = [
        "celery",
        "-A",
        "benchmarks.vanilla",
        "worker",
        "-n",
        f"{name}@%h",
        "-Q",
        queue,
        "-l",
        "INFO",
    ]
    if profile == "baseline":
        return [*base, "-P", "prefork", "-c", "1", "--without-gossip", "--without-mingle"]
    if profile == "tuned":
        return [*base, "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return base


app = Celery("vanilla")
app.add_defaults(
    lambda: config(
        os.environ.get("BENCH_VANILLA_PROFILE", "default"),
        os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
        os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
        os.environ.get("INFER_SERIALIZER", "msgpack"),
    )
)


@app.task(name="vanilla.noop")
def noop() -> None:
    """Do nothing."""
