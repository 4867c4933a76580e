"""Custom inspect commands: ``celery -A tasks inspect capabilities``.

The worker's main process answers from the registry record its pool child
publishes on every heartbeat (the child owns the device and the models).
"""

from __future__ import annotations

import json
from typing import Any

from celery.worker.control import inspect_command

from routing.registry import store_for
from tasks.app import app

__all__ = ["capabilities"]


@inspect_command()
def capabilities(state: Any) -> dict[str, Any]:
    """This worker's advertised capabilities (device, memory, dtypes, models, load)."""
    settings = app.infer_settings
    hostname = state.consumer.hostname
    for record in store_for(settings.backend, settings.home, settings.registry_namespace).load():
        if record.name == hostname:
            return json.loads(record.to_json())
    return {
        "error": f"no capability record for {hostname} yet (heartbeat every {settings.heartbeat_s}s)"
    }
