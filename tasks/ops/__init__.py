"""Operators' entry points: the ``celery`` CLI plugin, Flower, the worker launcher, the demo.

This package itself imports nothing.
"""
