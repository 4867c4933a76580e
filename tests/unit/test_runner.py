from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import ConfigurationError, UnsupportedDtype
from models.runner import forward, resolve_device, resolve_dtype, supported_dtypes
from tests.specs import spec_of

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


def test_forward_matches_hand_computed_linear() -> None:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.fill_(0.5)
    out, ms = forward(layer, np.array([[1.0, 3.0], [4.0, 0.0]], np.float32), CPU, "fp32")
    assert out.dtype == np.float32
    assert out.tolist() == [[-0.5], [8.5]]  # 2*1-3+0.5, 2*4-0+0.5
    assert ms >= 0


def test_cpu_precisions() -> None:
    mlp = spec_of("mlp")
    assert supported_dtypes(CPU) == ("fp32", "bf16")
    assert resolve_dtype(None, mlp, CPU) == "fp32"
    assert resolve_dtype("auto", mlp, CPU) == "fp32"
    assert resolve_dtype("bf16", mlp, CPU) == "bf16"
    with pytest.raises(
        UnsupportedDtype,
        match=r"not supported on cpu \(supported: fp32, bf16\): ask for fp32 or auto",
    ):
        resolve_dtype("fp16", mlp, CPU)
    with pytest.raises(UnsupportedDtype, match="is not a precision: use fp32, fp16, bf16 or auto"):
        resolve_dtype("int8", mlp, CPU)


def test_devices() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigurationError, match="not a device"):
        resolve_device("banana")
    with pytest.raises(ConfigurationError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ConfigurationError, match="CUDA is not available"):
            resolve_device("cuda:0")


@needs_cuda
@pytest.mark.gpu
def test_half_precision_on_gpu_tracks_fp32(weights_dir: object) -> None:
    from models.loader import load_model

    device = torch.device("cuda:0")
    spec = spec_of("cnn")
    half = resolve_dtype(None, spec, device)
    assert half in ("bf16", "fp16")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    ref = forward(load_model(spec, device, torch.float32), x, device, "fp32")[0]
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    got = forward(load_model(spec, device, dtype), x, device, half)[0]
    assert np.allclose(got, ref, atol=5e-2, rtol=5e-2)
