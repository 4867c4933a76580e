"""The spec a test means by a model name: this environment's own catalog (zoo, packages, repositories)."""

from __future__ import annotations

from models.spec import ModelSpec


def spec_of(model: str) -> ModelSpec:
    from tasks.app import app
    from tasks.wire.catalog import local_catalog

    return local_catalog(app.infer_settings).resolve(model)


def zoo_names() -> list[str]:
    """The built-in models (the ``zoo`` source), sorted."""
    from tasks.app import app
    from tasks.wire.catalog import local_catalog

    return [e.name for e in local_catalog(app.infer_settings).entries() if e.source == "zoo"]
