"""What the caller and the worker agree on: codec, requests, queues, result backend, signing.

Imported by both ends; this package itself imports nothing.
"""
