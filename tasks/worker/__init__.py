"""What runs in a worker: its runtime, consumer, batcher, heartbeat, metrics, dedup, poison.

Never imports :mod:`tasks.client`.  ``python -m tasks.worker`` starts a worker
(``__main__``); this package itself imports nothing.
"""
