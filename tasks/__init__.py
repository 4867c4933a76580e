"""Celery app and tasks for distributed PyTorch inference.

Application code needs only ``from tasks import app, infer`` and stock Celery
calls.  Importing this package neither connects to a broker nor imports torch.
"""

from tasks import control  # registers `celery -A tasks inspect capabilities` for the CLI too
from tasks.app import app
from tasks.canvas import infer_many
from tasks.diagnostics import noop, sleep
from tasks.inference import infer

__all__ = ["app", "control", "infer", "infer_many", "noop", "sleep"]
