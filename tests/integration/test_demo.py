"""``make demo``'s main job also runs on the embedded broker (no RabbitMQ, no Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_on_the_embedded_broker(tmp_path: Path, weights_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env.update(INFER_HOME=str(tmp_path / "home"), INFER_WEIGHTS_DIR=str(weights_dir))
    out = subprocess.run(
        [sys.executable, "-m", "tasks.ops.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "embedded broker (kombu filesystem transport)" in out.stdout
    assert "demo ok" in out.stdout and "stray processes: none" in out.stdout
    # Every model here (the zoo's four, and minilm with the models extra) x 3 requests,
    # each matching its in-process forward pass.
    models = [line for line in out.stdout.splitlines() if line.startswith("│ ")]
    assert out.stdout.count(" yes ") == len(models) >= 12
    assert any("resnet50" in line for line in models)
    assert (tmp_path / "home" / "broker" / "queue").is_dir()
    assert any((tmp_path / "home" / "results").iterdir())  # results went to the file backend
