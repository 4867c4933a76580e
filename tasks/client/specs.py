"""The spec a client checks a request against: its own sources first, then the workers'.

A client with no model repository still checks and routes requests for the
models workers serve: every worker advertises, with its heartbeat, the specs
of the models its catalog holds (:func:`tasks.wire.catalog.advertised`), and
the router's registry snapshot already holds them.  :func:`resolve_spec`
looks a model up

1. in this process's own catalog (its ``INFER_MODEL_REPOSITORY``, installed
   packages, the zoo);
2. else in the specs live workers advertise (parsed once per snapshot); for
   an unpinned name, the default version most workers advertise;
3. else, once, in a fresh snapshot if the one in hand is older than a
   heartbeat (at most one read per 100 ms, as the router does);

and only then raises :class:`~models.errors.UnknownModel` (or
:class:`~models.errors.UnknownVersion` when the model is known and the
version is not).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from models.catalog import ModelCatalog
from models.errors import UnknownVersion
from models.repository import ModelEntry
from models.spec import ModelSpec, parse_ref
from routing.capabilities import WorkerCapabilities
from tasks.settings import Settings
from tasks.wire.catalog import local_catalog

__all__ = ["AdvertisedSpecs", "SpecLookup", "resolve_spec"]


class AdvertisedSpecs:
    """The models live workers advertise, as a catalog, rebuilt when the snapshot changes."""

    def __init__(self) -> None:
        self._snapshot: int | None = None
        self._catalog = ModelCatalog()
        self._lock = threading.Lock()

    def catalog(self, workers: Mapping[str, WorkerCapabilities]) -> ModelCatalog:
        with self._lock:
            if id(workers) != self._snapshot:
                self._catalog = _from_workers(workers)
                self._snapshot = id(workers)
            return self._catalog


def _from_workers(workers: Mapping[str, WorkerCapabilities]) -> ModelCatalog:
    versions: dict[str, dict[int, ModelSpec]] = {}
    defaults: dict[str, Counter[int]] = {}
    sources: dict[str, str] = {}
    for w in workers.values():
        for name, served in (w.models or {}).items():
            try:
                for v, wire in dict(served.get("versions") or {}).items():
                    versions.setdefault(name, {})[int(v)] = ModelSpec.from_wire(wire)
                defaults.setdefault(name, Counter())[int(served["default"])] += 1
                sources.setdefault(name, f"advertised by {w.name}")
            except (TypeError, ValueError, KeyError, AttributeError):
                continue  # a record this client cannot read: the others still count
    entries = []
    for name, specs in versions.items():
        ranked = [v for v, _ in defaults[name].most_common() if v in specs]
        default = ranked[0] if ranked else max(specs)
        entries.append(ModelEntry(name, sources[name], specs, default))
    return ModelCatalog(entries)


def resolve_spec(
    model: object,
    local: ModelCatalog,
    workers: Any = None,
    advertised: AdvertisedSpecs | None = None,
    refresh: Any = None,
) -> ModelSpec:
    """The spec of ``model`` (see the module): local, else advertised, else a typed error.

    ``workers()`` returns the registry snapshot and ``refresh()`` renews a
    stale one (True when it did); both None: the local catalog only.
    """
    name, _ = parse_ref(model)
    if name in local:
        try:
            return local.resolve(model)
        except UnknownVersion:
            if workers is None:
                raise  # a version only a worker holds is looked up below
    if workers is None:
        raise local.unknown(name)
    advertised = advertised or AdvertisedSpecs()
    for attempt in range(2):
        catalog = advertised.catalog(workers())
        if name in catalog:
            return catalog.resolve(model)
        if attempt == 0 and not (refresh is not None and refresh()):
            break
    if name in local:
        return local.resolve(model)  # raises UnknownVersion with the local versions
    # "Known here" names what this client can call: its own models and the advertised ones.
    raise ModelCatalog([*local.entries(), *catalog.entries()]).unknown(name)


class SpecLookup:
    """``lookup(model) -> ModelSpec`` for one client: its settings' catalog, then ``registry``'s workers.

    ``registry`` is a :class:`routing.registry.LiveRegistry` (None: local sources only).
    """

    def __init__(self, settings: Settings, registry: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.advertised = AdvertisedSpecs()

    def __call__(self, model: object) -> ModelSpec:
        registry = self.registry
        return resolve_spec(
            model,
            local_catalog(self.settings),
            None if registry is None else registry.workers,
            self.advertised,
            None if registry is None else registry.refresh_if_stale,
        )
