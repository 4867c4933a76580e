from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.errors import ModelLoadError, UnsafeWeightsFile
from models.loader import build_weights, load_model, seeded_state, size_of
from models.registry import get_spec, model_names

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


class _Canary:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.path, "pwned"))  # type: ignore[return-value]


def _plant_pickle(target: Path, canary: Path) -> None:
    target.write_bytes(pickle.dumps(_Canary(canary)))


def test_build_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    written = build_weights(a)
    build_weights(b)
    assert sorted(p.name for p in written) == [f"{n}.safetensors" for n in model_names()]
    for name in model_names():
        assert (a / f"{name}.safetensors").read_bytes() == (b / f"{name}.safetensors").read_bytes()
        state = load_file(str(a / f"{name}.safetensors"))
        expected = seeded_state(get_spec(name))
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    assert build_weights(a) == []  # present already: nothing rewritten without --force


def test_loaded_model_holds_the_stored_weights(tmp_path: Path) -> None:
    build_weights(tmp_path, ["cnn"])
    model = load_model(get_spec("cnn"), tmp_path, CPU, torch.float32)
    stored = load_file(str(tmp_path / "cnn.safetensors"))
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert not model.training
    assert size_of(model) == sum(t.numel() * t.element_size() for t in stored.values())


def test_pickle_named_as_safetensors_is_refused_and_never_run(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _plant_pickle(tmp_path / "mlp.safetensors", canary)
    with pytest.raises(UnsafeWeightsFile, match="pickle"):
        load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)
    assert not canary.exists()


def test_torch_save_zip_named_as_safetensors_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "mlp.safetensors")
    with pytest.raises(UnsafeWeightsFile):
        load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)


def test_planted_pt_file_beside_the_weights_is_never_opened(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    build_weights(tmp_path, ["mlp"])
    _plant_pickle(tmp_path / "mlp.pt", canary)
    _plant_pickle(tmp_path / "mlp.pth", canary)
    load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)
    assert not canary.exists()


def test_missing_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="python -m models build"):
        load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)
    (tmp_path / "mlp.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)
    build_weights(tmp_path, ["cnn"])
    (tmp_path / "cnn.safetensors").replace(tmp_path / "mlp.safetensors")
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(get_spec("mlp"), tmp_path, CPU, torch.float32)


def test_no_source_file_calls_torch_load() -> None:
    offenders = [
        p
        for pkg in ("tasks", "routing", "models", "benchmarks")
        for p in (ROOT / pkg).rglob("*.py")
        if "torch.load(" in p.read_text()
    ]
    assert offenders == []
