"""Create, save and load model weights as safetensors.  Nothing here unpickles.

``torch.load`` is never called: a ``.pt``/``.pth``/``.bin``/``.pkl`` file can run
arbitrary code when unpickled, so the loader only ever opens
``<name>.safetensors`` and parses it with the safetensors library, which reads
a JSON header and raw tensor bytes.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.errors import ModelLoadError, UnsafeWeightsFile
from models.registry import ModelSpec, get_spec, model_names

__all__ = [
    "PICKLE_SUFFIXES",
    "build_weights",
    "instantiate",
    "load_model",
    "seeded_state",
    "size_of",
]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# Byte signatures of pickle streams and of torch.save's zip container.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def instantiate(spec: ModelSpec) -> nn.Module:
    """Import the spec's builder and return a fresh, untrained module in eval mode."""
    module_name, _, func_name = spec.builder.partition(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    return cast(nn.Module, builder()).eval()


def seeded_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``spec``: the same seed gives the same bytes.

    BatchNorm running statistics are drawn too, so that the layers are not
    identities and a served forward pass really exercises them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = instantiate(spec)
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_weights(
    weights_dir: Path, names: list[str] | None = None, force: bool = False
) -> list[Path]:
    """Write ``<name>.safetensors`` for each model (all by default); return the files written."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or model_names():
        spec = get_spec(name)
        path = weights_dir / spec.weights_file
        if path.exists() and not force:
            continue
        tmp = path.with_suffix(".tmp")
        # One metadata key only: safetensors writes a multi-key map in hash order,
        # which would make two builds of the same weights differ byte-wise.
        save_file(seeded_state(spec), str(tmp), metadata={"model": f"{name}/seed={spec.seed}"})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        written.append(path)
    return written


def _refuse_unsafe(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise UnsafeWeightsFile(
            f"refusing {path.name}: pickle-based weights can execute code when loaded; "
            "convert it to safetensors (safetensors.torch.save_file) and load that instead"
        )
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise UnsafeWeightsFile(
            f"refusing {path}: it is a pickle/torch.save file named like safetensors; "
            "rebuild it with `python -m models build --force`"
        )


def load_model(
    spec: ModelSpec, weights_dir: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Build ``spec``'s module, load its safetensors weights strictly, place it on ``device``."""
    path = weights_dir / spec.weights_file
    if not path.is_file():
        raise ModelLoadError(
            f"weights for {spec.name!r} not found at {path}: run `python -m models build` "
            "(or set INFER_WEIGHTS_DIR to the folder that holds them)"
        )
    _refuse_unsafe(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot read {path} as safetensors ({e}); rebuild it with `python -m models build --force`"
        ) from e
    model = instantiate(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{path} does not match model {spec.name!r}: {e}; rebuild it with `python -m models build --force`"
        ) from e
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    log.info("loaded model %s from %s onto %s as %s", spec.name, path, device, dtype)
    return model.eval()


def size_of(model: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
