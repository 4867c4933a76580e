"""Every model one process can name: its sources, their precedence, and version resolution.

Sources, highest precedence first:

1. each folder of ``INFER_MODEL_REPOSITORY``, in the order given
   (:mod:`models.repository`);
2. installed packages, through the ``infer.models`` entry-point group, in
   entry-point name order.  This project registers two: ``zoo`` (the
   built-in models, :mod:`models.zoo`) and ``packaged`` (models inside other
   installed wheels, e.g. ``minilm``).

The zoo is one more source, with no special case.  A name that two sources
both define is served from the higher one; the other is logged as shadowed.
A model a source cannot read is kept in :attr:`ModelCatalog.errors` (and
logged), and the others are served.

An entry point is a callable ``source(weights_dir: Path)`` that returns
:class:`~models.repository.ModelEntry` objects (or a repository folder, a
``Path``).  Pure Python: no torch, no celery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from models.errors import ConfigurationError, UnknownModel, UnknownVersion, echo
from models.repository import ModelEntry, scan
from models.spec import ModelSpec, parse_ref

__all__ = ["ENTRY_POINT_GROUP", "ModelCatalog", "discover"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "infer.models"


class ModelCatalog:
    """Models by name, each with its versions and its (movable) default version."""

    def __init__(
        self,
        entries: Iterable[ModelEntry] = (),
        errors: Iterable[ConfigurationError] = (),
    ) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self.errors: list[ConfigurationError] = list(errors)
        self.shadowed: list[str] = []
        self._lock = threading.Lock()
        for entry in entries:
            if entry.name in self._entries:
                kept = self._entries[entry.name]
                self.shadowed.append(
                    f"{entry.name} from {entry.source} (shadowed by {kept.source})"
                )
                continue
            self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise self.unknown(name) from None

    def resolve(self, model: object) -> ModelSpec:
        """The spec ``model`` names: ``name`` is its default version, ``name@N`` version N."""
        name, version = parse_ref(model)
        entry = self.entry(name)
        if version is None:
            return entry.default
        spec = entry.versions.get(version)
        if spec is None:
            raise UnknownVersion(
                f"model {name!r} has no version {version} here (versions: "
                f"{', '.join(map(str, sorted(entry.versions)))}; default {entry.default_version}): "
                f"pin one of them, or add {name}/{version}/ to the model repository and load it "
                f"(celery -A tasks control load_model {name}@{version})"
            )
        return spec

    def unknown(self, name: object) -> UnknownModel:
        return UnknownModel(
            f"unknown model {echo(name)}: no model repository, installed package or live worker "
            f"serves it. Known here: {', '.join(self.names()) or 'none'} "
            "(python -m models list shows them with their inputs; a worker's own models are "
            "known once it has advertised them)"
        )

    def set_default(self, name: str, version: int) -> ModelSpec:
        """Make ``version`` the default of ``name`` in this process (UnknownVersion if absent)."""
        spec = self.resolve(f"{name}@{version}")
        with self._lock:
            self._entries[name] = replace(self._entries[name], default_version=version)
        return spec

    def merge(self, other: ModelCatalog) -> None:
        """Add ``other``'s versions of models this catalog has, and models it lacks (a rescan).

        A moved default stays where it was moved.
        """
        with self._lock:
            for entry in other.entries():
                mine = self._entries.get(entry.name)
                if mine is None:
                    self._entries[entry.name] = entry
                elif mine.source == entry.source:
                    versions = {**entry.versions, **mine.versions}
                    self._entries[entry.name] = replace(mine, versions=versions)


def discover(
    repositories: Sequence[Path] = (),
    weights_dir: Path = Path("var/weights"),
    use_entry_points: bool = True,
    log_errors: bool = True,
) -> ModelCatalog:
    """The catalog of every source (see the module); bad models are logged, not raised.

    ``log_errors=False``: the caller reports :attr:`ModelCatalog.errors` itself.
    """
    entries: list[ModelEntry] = []
    errors: list[ConfigurationError] = []
    for folder in repositories:
        found, bad = scan(Path(folder), source=f"repository {folder}")
        entries += found
        errors += bad
    if use_entry_points:
        for name, load in _entry_point_sources():
            try:
                produced = load()(weights_dir)
                if isinstance(produced, Path):
                    found, bad = scan(produced, source=f"package {name}")
                    entries += found
                    errors += bad
                else:
                    entries += list(produced)
            except ConfigurationError as e:
                errors.append(e)
            except Exception as e:  # a broken plug-in must not take the others down
                errors.append(
                    ConfigurationError(f"entry point {name!r} ({ENTRY_POINT_GROUP}): {e}")
                )
    catalog = ModelCatalog(entries, errors)
    if not log_errors:
        return catalog
    for error in catalog.errors:
        log.error("model not served: %s", error)
    for line in catalog.shadowed:
        log.warning("model %s", line)
    return catalog


def _entry_point_sources() -> list[tuple[str, Any]]:
    found = entry_points(group=ENTRY_POINT_GROUP)
    return [(ep.name, ep.load) for ep in sorted(found, key=lambda ep: ep.name)]
