"""Capability-based routing, pure Python (never imports torch or celery).

- :mod:`routing.capabilities`: what a request needs and what a worker advertises;
- :mod:`routing.registry`: the live registry of workers (heartbeats on Redis or files);
- :mod:`routing.sticky`: the bounded, expiring sticky-key cache;
- :mod:`routing.router`: the decision ladder Celery's ``task_routes`` calls;
- :mod:`routing.queues`: queue names and their RabbitMQ arguments.

``tasks.client.routes`` plugs the router into each Celery app.
"""

from routing.capabilities import TaskRequirements, WorkerCapabilities
from routing.router import CapabilityRouter
from routing.sticky import StickyCache

__all__ = ["CapabilityRouter", "StickyCache", "TaskRequirements", "WorkerCapabilities"]
