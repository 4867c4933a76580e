"""Session-wide environment for every test tier.

Set before ``tasks`` reads its settings (lazily, on first use), so the test
process and the worker subprocesses it starts agree on broker, backend and
weights.  Existing CELERY_* variables win, so the suite can target another
RabbitMQ/Redis.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BACKEND = "redis://127.0.0.1:6379/0"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("CELERY_BROKER_URL", BROKER)
    os.environ.setdefault("CELERY_RESULT_BACKEND", BACKEND)
    os.environ.setdefault("INFER_WEIGHTS_DIR", str(ROOT / "var" / "weights"))
    os.environ.setdefault("INFER_HOME", str(ROOT / "var" / "test-home"))
    # Small enough that the oversized-payload cases stay cheap on a real broker.
    os.environ.setdefault("INFER_MAX_PAYLOAD_BYTES", str(1024 * 1024))
    # Many workers per host here: metrics only where a test gives a worker its own port.
    os.environ.setdefault("INFER_METRICS_PORT", "0")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The built weights (``make`` builds them; build here if a test run skipped make)."""
    from models.loader import build_weights
    from models.zoo import source

    path = Path(os.environ["INFER_WEIGHTS_DIR"])
    build_weights(spec for entry in source(path) for spec in entry.versions.values())
    return path
