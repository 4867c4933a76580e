"""``forward()`` on a batch decoded from a message's immutable bytes: no warning, no aliasing.

A worker decodes a msgpack envelope with ``np.frombuffer`` over the message's
``bytes``, so the batch is read-only; ``torch.from_numpy`` on it warned
``The given NumPy array is not writable`` once in each pool child.  PyTorch
warns only once per process, so the no-warning check also runs in a fresh
interpreter, where an earlier test cannot have used up the one warning.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from models.runner import forward

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


def _linear() -> nn.Linear:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 0.5]]))
        layer.bias.fill_(0.25)
    return layer


class InPlace(nn.Module):
    """A model that writes to its input (legal, if rude): it must not reach the message's bytes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(-1.0)
        return x


def _read_only(array: np.ndarray) -> tuple[np.ndarray, bytes]:
    raw = bytes(array.tobytes())
    decoded = np.frombuffer(raw, dtype=array.dtype).reshape(array.shape)
    assert not decoded.flags.writeable
    return decoded, raw


def test_read_only_batch_gives_the_writable_result_without_a_warning() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    decoded, _ = _read_only(x)
    layer = _linear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = forward(layer, decoded, CPU, "fp32")
        expected, _ = forward(layer, x.copy(), CPU, "fp32")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, x @ layer.weight.detach().numpy().T + 0.25, rtol=1e-6)


def test_a_model_writing_to_its_input_leaves_the_message_bytes_alone() -> None:
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    decoded, raw = _read_only(x)
    before = bytes(raw)  # an equal copy, taken before the pass
    got, _ = forward(InPlace(), decoded, CPU, "fp32")
    np.testing.assert_array_equal(got, -x)
    assert raw == before
    np.testing.assert_array_equal(decoded, x)


def test_no_warning_in_a_fresh_process() -> None:
    # PyTorch warns once per process: a fresh interpreter shows whether forward() still would.
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from torch import nn
        from models.runner import forward
        x = np.frombuffer(bytes(np.ones((2, 4), np.float32).tobytes()), np.float32).reshape(2, 4)
        y = np.frombuffer(bytes(np.ones((2, 4), np.int64).tobytes()), np.int64).reshape(2, 4)
        forward(nn.Linear(4, 1), x, torch.device("cpu"), "fp32")
        forward(nn.Linear(4, 1).to(torch.bfloat16), x, torch.device("cpu"), "bf16")
        forward(nn.Identity(), y, torch.device("cpu"), "fp32")
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@needs_cuda
def test_read_only_batch_on_cuda() -> None:
    device = torch.device("cuda", 0)
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    decoded, raw = _read_only(x)
    before = bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = forward(_linear().to(device), decoded, device, "fp32")
        forward(InPlace().to(device), decoded, device, "fp32")
    expected, _ = forward(_linear(), x.copy(), CPU, "fp32")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert raw == before
