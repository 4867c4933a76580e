"""Device and precision choice, and the forward pass itself.

CUDA is touched only when these functions are called, never at import, so a
parent process that forks workers never initialises it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from models.errors import ConfigurationError, UnsupportedDtype, unknown_dtype, unsupported_dtype
from models.loader import load_model
from models.spec import ModelSpec

__all__ = [
    "DTYPES",
    "forward",
    "forward_text",
    "reference_forward",
    "resolve_device",
    "resolve_dtype",
    "supported_dtypes",
]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; otherwise parse ``name``."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigurationError(
            f"INFER_DEVICE={name!r} is not a device: use cpu, cuda:N or auto"
        ) from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"INFER_DEVICE={name!r} but CUDA is not available here: use cpu, or run on a GPU host"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"INFER_DEVICE={name!r} but only {torch.cuda.device_count()} GPU(s) are visible "
                "(check CUDA_VISIBLE_DEVICES)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigurationError(f"INFER_DEVICE={name!r}: only cpu and cuda devices are supported")
    return device


def supported_dtypes(device: torch.device) -> tuple[str, ...]:
    """Precisions this device runs well: fp32 everywhere, fp16 on CUDA, bf16 on sm80+ and CPU."""
    if device.type != "cuda":
        return ("fp32", "bf16")
    major, _ = torch.cuda.get_device_capability(device)
    return ("fp32", "fp16", "bf16") if major >= 8 else ("fp32", "fp16")


def resolve_dtype(requested: str | None, spec: ModelSpec, device: torch.device) -> str:
    """The compute precision for one request.

    ``None``/``auto`` picks bf16 (else fp16) on a GPU when the model allows half
    precision, and fp32 on CPU.  An explicit precision the device or model
    cannot run raises :class:`UnsupportedDtype`.
    """
    supported = supported_dtypes(device)
    if requested in (None, "auto"):
        if device.type == "cuda" and spec.half_precision_ok:
            return "bf16" if "bf16" in supported else "fp16"
        return "fp32"
    if requested not in DTYPES:
        raise unknown_dtype(requested)
    if requested != "fp32" and not spec.half_precision_ok:
        raise UnsupportedDtype(f"model {spec.name!r} runs only in fp32; drop dtype={requested!r}")
    if requested not in supported:
        raise unsupported_dtype(requested, str(device), supported)
    return requested


def forward(
    model: nn.Module, batch: np.ndarray, device: torch.device, dtype: str
) -> tuple[np.ndarray, float]:
    """Run one forward pass under ``torch.inference_mode()``.

    Returns float32 outputs on the host and the compute time in milliseconds
    (host-to-device copy, forward and device-to-host copy; CUDA is synchronised
    so the figure is real).
    """
    started = time.perf_counter()
    with torch.inference_mode():
        x = _model_input(batch, device)
        if x.is_floating_point():
            x = x.to(DTYPES[dtype])
        y = model(x).float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return y.numpy(), (time.perf_counter() - started) * 1000.0


def _model_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """``batch`` as a tensor on ``device`` that the model may write to without harm.

    A batch decoded straight from a message is a read-only view of the message's
    immutable ``bytes`` (``np.frombuffer``); ``torch.from_numpy`` warns on it,
    because a model that writes to its input in place (``x.relu_()``) would then
    write into a ``bytes`` object: the request's own arguments, or CPython's
    shared one-byte ``bytes`` singletons.  So the model never gets that memory:

    - writable (decoded with a dtype conversion, or stacked by the batcher): a
      view, as before, of memory made for this pass alone, no copy (a caller
      that hands ``forward`` an array of its own lends it to the model);
    - read-only, on CUDA: a DLPack view (no warning, no copy) that only feeds the
      host-to-device copy, which is the one copy, as before; the model gets the
      device tensor;
    - read-only, on the CPU: one host copy.  Measured on this project's zoo (CPU,
      one torch thread): 0.2 us over ``from_numpy`` for a 256 B MLP sample
      (forward 58 us), 28 us for the largest input here, 64 CIFAR images of
      768 KiB (forward 16.9 ms, 0.2%).  ``np.copy`` + ``from_numpy`` is the
      cheapest safe way (0.6 us; a DLPack view alone costs 1.2 us).
    """
    batch = np.ascontiguousarray(batch)
    if batch.flags.writeable:
        return torch.from_numpy(batch).to(device, non_blocking=True)
    if device.type == "cpu":
        return torch.from_numpy(batch.copy())
    return torch.from_dlpack(batch).to(device, non_blocking=True)


def forward_text(
    model: nn.Module, token_ids: list[list[int]], device: torch.device
) -> tuple[np.ndarray, float]:
    """One forward pass of a text encoder (:mod:`models.hf`) over tokenized texts; outputs and ms."""
    started = time.perf_counter()
    outputs = model.embed(token_ids, device)  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, (time.perf_counter() - started) * 1000.0


def reference_forward(spec: ModelSpec, inputs: object) -> np.ndarray:
    """The expected outputs of ``spec`` on ``inputs``: a fresh fp32 model on the CPU, in process.

    ``inputs`` is one sample or a batch (a string or strings for a text model);
    what a worker returns for the same inputs must match this (the demo and the
    serving tests check it).
    """
    cpu = torch.device("cpu")
    model = load_model(spec, cpu, torch.float32)
    if spec.text is not None:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)  # type: ignore[call-overload]
        return forward_text(model, model.tokenize(texts), cpu)[0]  # type: ignore[operator]
    array = np.asarray(inputs)
    if array.ndim == len(spec.sample_shape):
        array = array[None]
    dtype = array.dtype.name if array.dtype.name in spec.served_dtypes else spec.input_dtype
    return forward(model, array.astype(dtype), cpu, "fp32")[0]
