"""The built-in models: small real models with seeded weights, one more model source.

Each ``<name>.py`` exposes ``build() -> nn.Module``; each
``repository/<name>/model.toml`` describes it as any model repository would.
Their seeded weights are written under ``INFER_WEIGHTS_DIR`` by
``python -m models build`` (``make weights``), laid out as a repository:
``<weights_dir>/<name>/<version>/model.safetensors``.  Importing this package
imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from models.repository import ModelEntry, scan

__all__ = ["REPOSITORY", "source"]

REPOSITORY = Path(__file__).resolve().parent / "repository"


def source(weights_dir: Path) -> list[ModelEntry]:
    """The ``zoo`` entry point of ``infer.models``: the built-in models."""
    entries, errors = scan(REPOSITORY, source="zoo", weights_root=weights_dir)
    if errors:  # a broken built-in model is a bug of this project, not a user's mistake
        raise errors[0]
    return entries
