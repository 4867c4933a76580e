"""Capability-based routing (pure Python, never imports torch).

Placeholder package: the router, the worker registry and the sticky-key
cache arrive with issue 4.  Until then requests go to the queue the caller
names (``queue=``), else to the default ``cpu`` queue.
"""

__all__: list[str] = []
