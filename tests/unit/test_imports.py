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


def test_a_client_checking_text_and_image_requests_imports_neither_torch_nor_transformers() -> None:
    # The client checks a minilm request (strings) and a resnet50 request (uint8 images)
    # against their specs, as apply_async does before publishing; only a worker that loads
    # a Hugging Face model imports transformers.
    loaded = _modules_after(
        "import numpy as np; "
        "from tasks import app; "
        "from tasks.wire.catalog import local_catalog; "
        "from models.text import check_text; "
        "from models.validation import check_input; "
        "catalog = local_catalog(app.infer_settings); "
        "[check_text(catalog.resolve('minilm'), ['a sentence'], 1 << 20) "
        " if 'minilm' in catalog else None]; "
        "check_input(catalog.resolve('resnet50'), np.zeros((3, 224, 224), np.uint8), 1 << 20)"
    )
    assert "transformers" not in loaded and "torch" not in loaded
    assert "sentence_transformers" not in loaded and "tokenizers" not in loaded
