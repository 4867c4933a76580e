"""``python -m benchmarks``: latency and throughput of the deployment, as a user sees it.

Uses only the public surface of ``tasks`` (apply_async, AsyncResult), plus the
worker launcher to start real ``celery worker`` processes.
"""

__all__: list[str] = []
