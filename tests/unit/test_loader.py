from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.errors import ModelLoadError, UnsafeWeightsFile
from models.loader import build_weights, load_model, seeded_state, size_of
from models.spec import ModelSpec
from models.zoo import source

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


class _Canary:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.path, "pwned"))  # type: ignore[return-value]


def _plant_pickle(target: Path, canary: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pickle.dumps(_Canary(canary)))


def zoo(weights_dir: Path, names: tuple[str, ...] = ()) -> dict[str, ModelSpec]:
    """The built-in models' default specs, their weights under ``weights_dir``."""
    return {e.name: e.default for e in source(weights_dir) if not names or e.name in names}


def weights(weights_dir: Path, name: str) -> Path:
    return weights_dir / name / "1" / "model.safetensors"


def test_build_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    names = ("cnn", "mlp", "transformer")  # resnet50 too in the next test's build, once
    written = build_weights(zoo(a, names).values())
    build_weights(zoo(b, names).values())
    assert sorted(written) == [weights(a, n) for n in names]
    for name, spec in zoo(a, names).items():
        assert weights(a, name).read_bytes() == weights(b, name).read_bytes()
        state = load_file(str(weights(a, name)))
        expected = seeded_state(spec)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    assert build_weights(zoo(a, names).values()) == []  # present: nothing rewritten without --force


def test_loaded_model_holds_the_stored_weights(tmp_path: Path) -> None:
    build_weights(zoo(tmp_path, ("cnn",)).values())
    model = load_model(zoo(tmp_path)["cnn"], CPU, torch.float32)
    stored = load_file(str(weights(tmp_path, "cnn")))
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert not model.training
    assert size_of(model) == sum(t.numel() * t.element_size() for t in stored.values())


def test_pickle_named_as_safetensors_is_refused_and_never_run(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _plant_pickle(weights(tmp_path, "mlp"), canary)
    with pytest.raises(UnsafeWeightsFile, match="pickle"):
        load_model(zoo(tmp_path)["mlp"], CPU, torch.float32)
    assert not canary.exists()


def test_torch_save_zip_named_as_safetensors_is_refused(tmp_path: Path) -> None:
    weights(tmp_path, "mlp").parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, weights(tmp_path, "mlp"))
    with pytest.raises(UnsafeWeightsFile):
        load_model(zoo(tmp_path)["mlp"], CPU, torch.float32)


def test_a_version_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _plant_pickle(weights(tmp_path, "mlp").with_name("model.pt"), canary)
    with pytest.raises(UnsafeWeightsFile, match=r"refusing model\.pt"):
        load_model(zoo(tmp_path)["mlp"], CPU, torch.float32)
    assert not canary.exists()


def test_planted_pt_file_beside_the_weights_is_never_opened(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    build_weights(zoo(tmp_path, ("mlp",)).values())
    _plant_pickle(weights(tmp_path, "mlp").with_name("model.pt"), canary)
    _plant_pickle(weights(tmp_path, "mlp").with_name("model.pth"), canary)
    load_model(zoo(tmp_path)["mlp"], CPU, torch.float32)
    assert not canary.exists()


def test_missing_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    mlp = zoo(tmp_path)["mlp"]
    with pytest.raises(ModelLoadError, match="python -m models build"):
        load_model(mlp, CPU, torch.float32)
    weights(tmp_path, "mlp").parent.mkdir(parents=True)
    weights(tmp_path, "mlp").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(mlp, CPU, torch.float32)
    build_weights(zoo(tmp_path, ("cnn",)).values())
    weights(tmp_path, "cnn").replace(weights(tmp_path, "mlp"))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(mlp, CPU, torch.float32)


def test_no_source_file_calls_torch_load() -> None:
    offenders = [
        p
        for pkg in ("tasks", "routing", "models", "benchmarks")
        for p in (ROOT / pkg).rglob("*.py")
        if "torch.load(" in p.read_text()
    ]
    assert offenders == []
