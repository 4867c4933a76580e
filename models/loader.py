"""Create, save and load model weights as safetensors.  Nothing here unpickles.

``torch.load`` is never called: a ``.pt``/``.pth``/``.bin``/``.pkl`` file can run
arbitrary code when unpickled, so the loader only ever opens a spec's
``model.safetensors`` and parses it with the safetensors library, which reads
a JSON header and raw tensor bytes.  A ``huggingface`` model is loaded by
:mod:`models.hf` (transformers, local files, safetensors only).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.errors import ModelLoadError, UnsafeWeightsFile
from models.spec import ModelSpec

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
    try:
        builder = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:  # a user's builder: a typed error, not a bare one
        raise ModelLoadError(
            f"cannot import the builder {spec.builder!r} of model {spec.ref} ({e}): install its "
            "package in the worker's environment or put its folder on the worker's PYTHONPATH, "
            "and check [torch] builder in its model.toml"
        ) from e
    try:
        module = builder(**dict(spec.builder_kwargs))
    except TypeError as e:  # e.g. a misspelt key under [torch] kwargs
        raise ModelLoadError(
            f"the builder {spec.builder!r} of model {spec.ref} refused its arguments "
            f"{dict(spec.builder_kwargs)} ({e}): fix [torch] kwargs in its model.toml"
        ) from e
    return cast(nn.Module, module).eval()


def seeded_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``spec``: the same seed gives the same bytes.

    BatchNorm running statistics are drawn too, so that the layers are not
    identities and a served forward pass really exercises them.
    """
    if spec.seed is None:
        raise ModelLoadError(f"model {spec.ref} has no seed ([torch] seed in its model.toml)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = instantiate(spec)
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_weights(specs: Iterable[ModelSpec], force: bool = False) -> list[Path]:
    """Write the seeded weights of each spec that has a seed; return the files written."""
    written = []
    for spec in specs:
        if spec.seed is None or spec.kind != "torch" or spec.weights is None:
            continue
        path = Path(spec.weights)
        if path.exists() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # One metadata key only: safetensors writes a multi-key map in hash order,
        # which would make two builds of the same weights differ byte-wise.
        save_file(seeded_state(spec), str(tmp), metadata={"model": f"{spec.ref}/seed={spec.seed}"})
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


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build ``spec``'s module, load its safetensors weights strictly, place it on ``device``."""
    if spec.weights is None:
        raise ModelLoadError(
            f"model {spec.ref} is known here only from a worker's advertisement: "
            "this process has no weights for it (set INFER_MODEL_REPOSITORY)"
        )
    if spec.kind == "huggingface":
        from models.hf import load_text_encoder

        model: nn.Module = load_text_encoder(spec)
    else:
        model = _load_torch(spec, Path(spec.weights))
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    log.info("loaded model %s from %s onto %s as %s", spec.ref, spec.weights, device, dtype)
    return model.eval()


def _load_torch(spec: ModelSpec, path: Path) -> nn.Module:
    if not path.is_file():
        pickled = [p for p in sorted(path.parent.glob("*")) if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            _refuse_unsafe(pickled[0])
        hint = (
            "run `python -m models build` (or set INFER_WEIGHTS_DIR to the folder that holds them)"
            if spec.seed is not None
            else f"put the model's safetensors weights at {path}"
        )
        raise ModelLoadError(f"weights for {spec.ref} not found at {path}: {hint}")
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
            f"{path} does not match model {spec.ref}: {e}; check the builder and its kwargs in "
            "model.toml, or rebuild seeded weights with `python -m models build --force`"
        ) from e
    return model


def size_of(model: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
