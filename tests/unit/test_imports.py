"""Dependency rules and import hygiene, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("package", ["routing", "models"])
def test_routing_and_models_import_without_torch_or_celery(package: str) -> None:
    loaded = _modules_after(f"import {package}")
    assert "torch" not in loaded
    assert "celery" not in loaded


def test_tasks_import_is_light_and_lazy() -> None:
    # No torch in the client, and no configuration read or connection made at import.
    code = (
        "import sys, tasks; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert tasks.app._infer_settings is None, 'settings read at import'; "
        "assert tasks.app._pool is None, 'broker connection pool created at import'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_models_package_never_imports_celery_even_with_torch() -> None:
    loaded = _modules_after("import models.loader, models.cache, models.runner")
    assert "torch" in loaded and "celery" not in loaded
