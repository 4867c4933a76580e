"""Machine and software versions recorded in every results file."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["machine_info"]


def _rabbitmq_version(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.connect()
            version = conn.connection.server_properties.get("version")
    except OSError:
        return None
    return version.decode() if isinstance(version, bytes) else version


def _redis_version(url: str) -> str | None:
    import redis

    try:
        return str(redis.Redis.from_url(url, socket_timeout=5).info("server")["redis_version"])
    except redis.RedisError:
        return None


def machine_info(broker: str, backend: str, serializer: str, device: str) -> dict[str, Any]:
    import celery
    import kombu
    import torch

    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "rabbitmq": _rabbitmq_version(broker) if broker.startswith("amqp") else None,
        "redis": _redis_version(backend) if backend.startswith("redis") else None,
        "broker": broker.split(":", 1)[0],
        "backend": backend.split(":", 1)[0],
        "serializer": serializer,
    }
