"""This process's own model catalog, built once from its settings (both ends use it).

:func:`local_catalog` discovers the sources the settings name
(``INFER_MODEL_REPOSITORY``, installed packages' entry points, the built-in
zoo under ``INFER_WEIGHTS_DIR``) on first use, never at import, and keeps the
result per process: a default version moved by ``set_default_version`` stays
moved.  :func:`rescan` reads the sources again and adds what is new (a
version folder dropped in since), which ``load_model name@N`` does before it
gives up on an unknown version.

A worker serves only what its own catalog holds; a client also knows what
workers advertise (:mod:`tasks.client.specs`).
"""

from __future__ import annotations

import threading
from pathlib import Path

from models.catalog import ModelCatalog, discover
from tasks.settings import Settings

__all__ = ["advertised", "check_preload", "local_catalog", "rescan"]

_catalogs: dict[tuple[tuple[str, ...], str], ModelCatalog] = {}
_lock = threading.Lock()


def _key(settings: Settings) -> tuple[tuple[str, ...], str]:
    return settings.model_repository, str(settings.weights_dir)


def _discover(settings: Settings) -> ModelCatalog:
    assert settings.weights_dir is not None
    return discover([Path(p) for p in settings.model_repository], settings.weights_dir)


def local_catalog(settings: Settings) -> ModelCatalog:
    """The catalog of the sources ``settings`` name, discovered once per process."""
    key = _key(settings)
    with _lock:
        catalog = _catalogs.get(key)
        if catalog is None:
            catalog = _catalogs[key] = _discover(settings)
        return catalog


def rescan(settings: Settings) -> ModelCatalog:
    """Read the sources again and add new models and versions to this process's catalog."""
    catalog = local_catalog(settings)
    catalog.merge(_discover(settings))
    return catalog


def advertised(catalog: ModelCatalog) -> dict[str, dict[str, object]]:
    """What a worker advertises of its catalog: per model, its default and each version's spec."""
    return {
        entry.name: {
            "default": entry.default_version,
            "versions": {str(v): spec.to_wire() for v, spec in sorted(entry.versions.items())},
        }
        for entry in catalog.entries()
    }


def check_preload(settings: Settings) -> None:
    """Refuse an ``INFER_PRELOAD`` entry no local source knows (UnknownModel names the choices)."""
    catalog = local_catalog(settings)
    for model in settings.preload:
        catalog.resolve(model)
