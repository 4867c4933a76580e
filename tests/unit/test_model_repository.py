"""Model repositories: ``model.toml`` parsing and validation, scanning, sources and versions."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.catalog import discover
from models.errors import ConfigurationError, ShapeMismatch, UnknownModel, UnknownVersion
from models.repository import WEIGHTS_FILE, parse_model, scan
from models.spec import ModelSpec, TextSpec, parse_ref
from models.validation import check_input

# A model.toml as {section: {key: TOML literal}}; section "" holds the top-level keys.
Toml = dict[str, dict[str, str]]
# Changes to one: a key set to None is removed, a section set to None is removed.
Changes = dict[str, dict[str, str | None] | None]

TORCH: Toml = {
    "": {"kind": '"torch"'},
    "torch": {"builder": '"models.zoo.mlp:build"', "seed": "1001"},
    "inputs": {"dtype": '"float32"', "shape": "[64]"},
    "outputs": {"shape": "[10]"},
}
HF: Toml = {
    "": {"kind": '"huggingface"'},
    "inputs": {"type": '"text"', "max_tokens": "128"},
    "outputs": {"shape": "[384]"},
}

FULL_TORCH = """\
description = "sequence scorer"
kind = "torch"
default_version = 2
memory_mb = 300
half_precision_ok = false

[torch]
builder = "my_models.seq:build"
kwargs = { width = 8, act = "gelu", layers = [1, 2] }
seed = 42

[inputs]
dtype = ["uint8", "float32"]
accept = ["float16", "float64"]
shape = [-1, 4]

[outputs]
shape = [-1, 10]

[batching]
max_batch_size = 16
max_wait_ms = 2
"""

TOKENS = """\
kind = "torch"

[torch]
builder = "models.zoo.transformer:build"

[inputs]
dtype = "int64"
accept = ["int32"]
shape = [16]
value_range = [0, 1000]

[outputs]
shape = [8]
"""

FULL_HF = """\
description = "sentence encoder"
kind = "huggingface"
memory_mb = 256

[huggingface]
pooling = "cls"
normalize = true

[inputs]
type = "text"
max_tokens = 128
truncate = true
max_strings = 8

[outputs]
shape = [384]

[batching]
max_batch_size = 32
"""


def render(base: Toml, changes: Changes | None = None) -> str:
    """``base`` with ``changes`` applied, as TOML text (top-level keys first)."""
    sections: dict[str, dict[str, str]] = {k: dict(v) for k, v in base.items()}
    for section, keys in (changes or {}).items():
        if keys is None:
            sections.pop(section, None)
            continue
        target = sections.setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    lines = [f"{k} = {v}" for k, v in sections.pop("", {}).items()]
    for section, table in sections.items():
        lines += [f"[{section}]", *(f"{k} = {v}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def write_model(root: Path, name: str, text: str, versions: tuple[int, ...] = (1,)) -> Path:
    """``root/name/model.toml`` holding ``text`` and an empty folder per version; the toml's path."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        (folder / str(version)).mkdir(exist_ok=True)
    path = folder / "model.toml"
    path.write_text(text, encoding="utf-8")
    return path


def weights_of(path: Path, *versions: int) -> dict[int, Path]:
    return {v: path.parent / str(v) / WEIGHTS_FILE for v in versions}


# --- parsing valid models ---------------------------------------------------------------


def test_a_full_torch_model(tmp_path: Path) -> None:
    path = write_model(tmp_path, "seq", FULL_TORCH, versions=(1, 2))
    entry = parse_model(path, weights_of(path, 1, 2), source="repository here")
    assert (entry.name, entry.source, entry.default_version) == ("seq", "repository here", 2)
    assert sorted(entry.versions) == [1, 2]
    spec = entry.default
    assert spec == entry.versions[2]
    assert spec.ref == "seq@2"
    assert spec.kind == "torch"
    assert spec.description == "sequence scorer"
    assert spec.builder == "my_models.seq:build"
    assert spec.builder_kwargs == {"width": 8, "act": "gelu", "layers": [1, 2]}
    assert spec.seed == 42
    assert spec.sample_shape == (-1, 4)
    assert spec.input_dtype == "uint8"
    assert spec.native_dtypes == ("uint8", "float32")
    assert spec.served_dtypes == ("uint8", "float32")
    assert spec.accepted_dtypes == ("uint8", "float32", "float16", "float64")
    assert spec.output_shape == (-1, 10)  # -1 is fine in outputs too (e.g. one row per token)
    assert spec.output_dtype == "float32"
    assert spec.max_batch_size == 16
    assert spec.max_wait_ms == 2.0
    assert isinstance(spec.max_wait_ms, float)
    assert spec.memory_mb == 300
    assert spec.half_precision_ok is False
    assert spec.value_range is None
    assert spec.text is None
    assert not spec.is_text
    assert spec.weights == str(path.parent / "2" / WEIGHTS_FILE)
    assert entry.versions[1].weights == str(path.parent / "1" / WEIGHTS_FILE)
    assert entry.versions[1].version == 1
    assert spec.input_summary() == "uint8|float32 [Nx4]"


def test_an_integer_model_with_a_value_range_and_the_defaults(tmp_path: Path) -> None:
    path = write_model(tmp_path, "tokens", TOKENS, versions=(1, 3))
    entry = parse_model(path, weights_of(path, 1, 3), source="s")
    assert entry.default_version == 3  # no default_version: the highest version
    spec = entry.default
    assert spec.input_dtype == "int64"
    assert spec.native_dtypes == ()
    assert spec.served_dtypes == ("int64",)
    assert spec.accepted_dtypes == ("int64", "int32")
    assert spec.value_range == (0, 1000)
    assert spec.seed is None
    assert spec.builder_kwargs == {}
    assert (spec.description, spec.memory_mb, spec.half_precision_ok) == ("", 64, True)
    assert (spec.max_batch_size, spec.max_wait_ms) == (None, None)


def test_a_huggingface_text_model(tmp_path: Path) -> None:
    write_model(tmp_path, "encoder", FULL_HF)
    entries, errors = scan(tmp_path, source="repository x")
    assert errors == []
    [entry] = entries
    spec = entry.default
    assert spec.kind == "huggingface"
    assert spec.weights == str(tmp_path / "encoder" / "1")  # the version folder, not a file
    assert spec.text == TextSpec(max_tokens=128, truncate=True, max_strings=8)
    assert spec.is_text
    assert (spec.pooling, spec.normalize) == ("cls", True)
    assert spec.input_dtype == "text"
    assert spec.accepted_dtypes == ("text",)
    assert spec.sample_shape == ()
    assert spec.output_shape == (384,)
    assert (spec.builder, spec.seed) == ("", None)
    assert (spec.description, spec.memory_mb, spec.max_batch_size) == ("sentence encoder", 256, 32)
    assert spec.input_summary() == "text (<= 128 tokens, truncated, <= 8 strings)"


def test_huggingface_defaults(tmp_path: Path) -> None:
    path = write_model(tmp_path, "enc", render(HF))
    spec = parse_model(path, {1: path.parent / "1"}, source="s").default
    assert spec.text == TextSpec(max_tokens=128, truncate=False, max_strings=64)
    assert (spec.pooling, spec.normalize) == ("mean", False)


def test_a_seeded_model_without_a_version_folder_gets_its_default_version(tmp_path: Path) -> None:
    repo, weights = tmp_path / "repo", tmp_path / "weights"
    write_model(repo, "mlp", render(TORCH, {"": {"default_version": "3"}}), versions=())
    entries, errors = scan(repo, source="zoo", weights_root=weights)
    assert errors == []
    [entry] = entries
    assert entry.default_version == 3
    assert entry.default.weights == str(weights / "mlp" / "3" / WEIGHTS_FILE)


def test_scan_reads_versions_from_the_weights_root(tmp_path: Path) -> None:
    repo, weights = tmp_path / "repo", tmp_path / "weights"
    write_model(repo, "mlp", render(TORCH), versions=())
    for folder in ("1", "2", "0", "latest"):  # 0 and latest are not versions
        (weights / "mlp" / folder).mkdir(parents=True)
    [entry], errors = scan(repo, source="zoo", weights_root=weights)
    assert errors == []
    assert sorted(entry.versions) == [1, 2]
    assert entry.versions[2].weights == str(weights / "mlp" / "2" / WEIGHTS_FILE)


# --- every validation error -------------------------------------------------------------

_T, _H = TORCH, HF
ERRORS = [
    # top level
    pytest.param(_T, {"": {"colour": '"red"'}}, "colour", id="unknown-top-level-key"),
    pytest.param(_T, {"": {"kind": '"tensorflow"'}}, "kind", id="kind-unknown"),
    pytest.param(_T, {"": {"kind": None}}, "kind", id="kind-missing"),
    pytest.param(_T, {"": {"kind": "1"}}, "kind", id="kind-not-a-string"),
    pytest.param(_T, {"": {"description": "3"}}, "description", id="description-not-a-string"),
    pytest.param(_T, {"": {"memory_mb": "0"}}, "memory_mb", id="memory-zero"),
    pytest.param(_T, {"": {"memory_mb": "1.5"}}, "memory_mb", id="memory-float"),
    pytest.param(_T, {"": {"memory_mb": "true"}}, "memory_mb", id="memory-bool"),
    pytest.param(_T, {"": {"half_precision_ok": '"yes"'}}, "half_precision_ok", id="half-str"),
    pytest.param(_T, {"": {"default_version": "0"}}, "default_version", id="default-zero"),
    pytest.param(_T, {"": {"default_version": '"1"'}}, "default_version", id="default-str"),
    pytest.param(_T, {"": {"default_version": "true"}}, "default_version", id="default-bool"),
    pytest.param(_T, {"inputs": None, "": {"inputs": "3"}}, "inputs", id="inputs-not-a-table"),
    pytest.param(_T, {"": {"batching": '"x"'}}, "batching", id="batching-not-a-table"),
    # [torch]
    pytest.param(_T, {"torch": {"weights": '"m.pt"'}}, "torch.weights", id="torch-unknown-key"),
    pytest.param(_T, {"torch": None, "": {"torch": "3"}}, "torch", id="torch-not-a-table"),
    pytest.param(_T, {"torch": {"builder": None}}, "torch.builder", id="builder-missing"),
    pytest.param(_T, {"torch": {"builder": "3"}}, "torch.builder", id="builder-int"),
    pytest.param(_T, {"torch": {"builder": '"a.b"'}}, "torch.builder", id="builder-no-colon"),
    pytest.param(_T, {"torch": {"builder": '"a.b:"'}}, "torch.builder", id="builder-no-function"),
    pytest.param(_T, {"torch": {"builder": '":f"'}}, "torch.builder", id="builder-no-module"),
    pytest.param(_T, {"torch": {"builder": '"1a:f"'}}, "torch.builder", id="builder-bad-module"),
    pytest.param(_T, {"torch": {"builder": '"a-b:f"'}}, "torch.builder", id="builder-dash"),
    pytest.param(_T, {"torch": {"builder": '"a..b:f"'}}, "torch.builder", id="builder-empty-part"),
    pytest.param(_T, {"torch": {"kwargs": "3"}}, "torch.kwargs", id="kwargs-int"),
    pytest.param(_T, {"torch": {"kwargs": "[1, 2]"}}, "torch.kwargs", id="kwargs-list"),
    pytest.param(_T, {"torch": {"seed": '"x"'}}, "torch.seed", id="seed-str"),
    pytest.param(_T, {"torch": {"seed": "1.5"}}, "torch.seed", id="seed-float"),
    pytest.param(_T, {"torch": {"seed": "true"}}, "torch.seed", id="seed-bool"),
    # [huggingface]
    pytest.param(_H, {"huggingface": {"revision": '"main"'}}, "huggingface.revision", id="hf-key"),
    pytest.param(_H, {"": {"huggingface": "3"}}, "huggingface", id="hf-not-a-table"),
    pytest.param(_H, {"huggingface": {"pooling": '"max"'}}, "huggingface.pooling", id="pool-max"),
    pytest.param(_H, {"huggingface": {"pooling": "1"}}, "huggingface.pooling", id="pool-int"),
    pytest.param(_H, {"huggingface": {"normalize": '"y"'}}, "huggingface.normalize", id="norm-str"),
    # [inputs], text
    pytest.param(_H, {"inputs": {"type": '"tensor"'}}, "inputs.type", id="hf-tensor-inputs"),
    pytest.param(
        _T,
        {"inputs": {"type": '"text"', "max_tokens": "8", "dtype": None, "shape": None}},
        "inputs.type",
        id="torch-text-inputs",
    ),
    pytest.param(
        _T, {"huggingface": {"pooling": '"mean"'}}, "huggingface", id="torch-with-hf-table"
    ),
    pytest.param(_H, {"torch": {"builder": '"a.b:c"'}}, "torch", id="hf-with-torch-table"),
    pytest.param(_H, {"inputs": {"type": None}}, "inputs.type", id="hf-type-missing"),
    pytest.param(_H, {"inputs": {"type": '"image"'}}, "inputs.type", id="hf-type-unknown"),
    pytest.param(_H, {"inputs": {"dtype": '"float32"'}}, "inputs.dtype", id="text-with-dtype"),
    pytest.param(_H, {"inputs": {"shape": "[16]"}}, "inputs.shape", id="text-with-shape"),
    pytest.param(_H, {"inputs": {"accept": '["int32"]'}}, "inputs.accept", id="text-with-accept"),
    pytest.param(_H, {"inputs": {"value_range": "[0, 9]"}}, "inputs.value_range", id="text-range"),
    pytest.param(_H, {"inputs": {"max_tokens": None}}, "inputs.max_tokens", id="no-max-tokens"),
    pytest.param(_H, {"inputs": {"max_tokens": "0"}}, "inputs.max_tokens", id="max-tokens-zero"),
    pytest.param(_H, {"inputs": {"max_tokens": '"9"'}}, "inputs.max_tokens", id="max-tokens-str"),
    pytest.param(_H, {"inputs": {"max_tokens": "true"}}, "inputs.max_tokens", id="max-tokens-bool"),
    pytest.param(_H, {"inputs": {"truncate": '"yes"'}}, "inputs.truncate", id="truncate-str"),
    pytest.param(_H, {"inputs": {"truncate": "1"}}, "inputs.truncate", id="truncate-int"),
    pytest.param(_H, {"inputs": {"max_strings": "0"}}, "inputs.max_strings", id="max-strings-0"),
    # [inputs], tensor
    pytest.param(_T, {"inputs": {"names": '["x"]'}}, "inputs.names", id="inputs-unknown-key"),
    pytest.param(_T, {"inputs": {"type": '"image"'}}, "inputs.type", id="type-unknown"),
    pytest.param(_T, {"inputs": {"type": "1"}}, "inputs.type", id="type-int"),
    pytest.param(_T, {"inputs": {"max_tokens": "16"}}, "inputs.max_tokens", id="tensor-max-tokens"),
    pytest.param(_T, {"inputs": {"truncate": "true"}}, "inputs.truncate", id="tensor-truncate"),
    pytest.param(_T, {"inputs": {"max_strings": "2"}}, "inputs.max_strings", id="tensor-strings"),
    pytest.param(_T, {"inputs": {"shape": None}}, "inputs.shape", id="shape-missing"),
    pytest.param(_T, {"inputs": {"shape": "[]"}}, "inputs.shape", id="shape-empty"),
    pytest.param(_T, {"inputs": {"shape": "[0]"}}, "inputs.shape", id="shape-zero"),
    pytest.param(_T, {"inputs": {"shape": "[-2]"}}, "inputs.shape", id="shape-minus-two"),
    pytest.param(_T, {"inputs": {"shape": "[1.5]"}}, "inputs.shape", id="shape-float"),
    pytest.param(_T, {"inputs": {"shape": "[true]"}}, "inputs.shape", id="shape-bool"),
    pytest.param(_T, {"inputs": {"shape": "64"}}, "inputs.shape", id="shape-not-a-list"),
    pytest.param(_T, {"inputs": {"shape": "[[64]]"}}, "inputs.shape", id="shape-nested"),
    pytest.param(_T, {"inputs": {"dtype": None}}, "inputs.dtype", id="dtype-missing"),
    pytest.param(_T, {"inputs": {"dtype": '"float128"'}}, "inputs.dtype", id="dtype-unknown"),
    pytest.param(_T, {"inputs": {"dtype": '"text"'}}, "inputs.dtype", id="dtype-text"),
    pytest.param(_T, {"inputs": {"dtype": '"bool"'}}, "inputs.dtype", id="dtype-bool"),
    pytest.param(_T, {"inputs": {"dtype": "[]"}}, "inputs.dtype", id="dtype-empty"),
    pytest.param(_T, {"inputs": {"dtype": "32"}}, "inputs.dtype", id="dtype-int"),
    pytest.param(_T, {"inputs": {"dtype": '["float32", "bf16"]'}}, "inputs.dtype", id="dtype-2nd"),
    pytest.param(_T, {"inputs": {"accept": '["bfloat16"]'}}, "inputs.accept", id="accept-unknown"),
    pytest.param(_T, {"inputs": {"accept": "[]"}}, "inputs.accept", id="accept-empty"),
    pytest.param(_T, {"inputs": {"accept": "3"}}, "inputs.accept", id="accept-int"),
    pytest.param(
        _T,
        {"inputs": {"dtype": '"int64"', "accept": '["float32"]'}},
        "inputs.accept",
        id="accept-float-into-int-model",
    ),
    pytest.param(
        _T,
        {"inputs": {"dtype": '"float32"', "accept": '["int64"]'}},
        "inputs.accept",
        id="accept-int-into-float-model",
    ),
    pytest.param(
        _T,
        {"inputs": {"dtype": '"float32"', "accept": '["uint8"]'}},
        "inputs.accept",
        id="accept-uint8-into-float-model",
    ),
    *(
        pytest.param(
            _T,
            {"inputs": {"dtype": '"int64"', "value_range": bad}},
            "inputs.value_range",
            id=f"value-range-{i}",
        )
        for i, bad in enumerate(
            ["[0]", "[0, 1, 2]", "[5, 1]", "[1, 1]", "[0, 1.5]", "[true, 3]", '"0-10"', "3"]
        )
    ),
    # [outputs]
    pytest.param(_T, {"outputs": {"names": '["y"]'}}, "outputs.names", id="outputs-unknown-key"),
    pytest.param(_T, {"outputs": None}, "outputs.shape", id="outputs-missing"),
    pytest.param(_T, {"outputs": {"shape": None}}, "outputs.shape", id="outputs-shape-missing"),
    pytest.param(_T, {"outputs": {"shape": "[]"}}, "outputs.shape", id="outputs-shape-empty"),
    pytest.param(_T, {"outputs": {"shape": "[0]"}}, "outputs.shape", id="outputs-shape-zero"),
    pytest.param(_T, {"outputs": {"dtype": '"float16"'}}, "outputs.dtype", id="outputs-fp16"),
    pytest.param(_T, {"outputs": {"dtype": "32"}}, "outputs.dtype", id="outputs-dtype-int"),
    pytest.param(_H, {"outputs": {"dtype": '"int64"'}}, "outputs.dtype", id="hf-outputs-int64"),
    # [batching]
    pytest.param(_T, {"batching": {"size": "8"}}, "batching.size", id="batching-unknown-key"),
    *(
        pytest.param(
            _T, {"batching": {"max_batch_size": bad}}, "batching.max_batch_size", id=f"size-{i}"
        )
        for i, bad in enumerate(["0", "-1", '"8"', "1.5", "true"])
    ),
    *(
        pytest.param(_T, {"batching": {"max_wait_ms": bad}}, "batching.max_wait_ms", id=f"wait-{i}")
        for i, bad in enumerate(["-1", "-0.5", '"5"', "true", "[5]"])
    ),
]


@pytest.mark.parametrize(("base", "changes", "field"), ERRORS)
def test_each_invalid_model_toml_names_the_file_and_the_field(
    tmp_path: Path, base: Toml, changes: Changes, field: str
) -> None:
    path = write_model(tmp_path, "m", render(base, changes))
    with pytest.raises(ConfigurationError, match=re.escape(f"{path}: {field}: ")):
        parse_model(path, weights_of(path, 1), source="s")


def test_the_error_says_what_to_write(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", render(TORCH, {"inputs": {"shape": "[0]"}}))
    with pytest.raises(ConfigurationError, match=r"positive sizes, e\.g\. \[3, 224, 224\]"):
        parse_model(path, weights_of(path, 1), source="s")
    path = write_model(tmp_path, "m", render(TORCH, {"torch": {"weights": '"m.pt"'}}))
    with pytest.raises(ConfigurationError, match="takes builder, kwargs, seed"):
        parse_model(path, weights_of(path, 1), source="s")


def test_minus_one_is_a_valid_size_in_inputs_and_outputs(tmp_path: Path) -> None:
    changes: Changes = {"inputs": {"shape": "[-1, 8]"}, "outputs": {"shape": "[-1]"}}
    path = write_model(tmp_path, "m", render(TORCH, changes))
    spec = parse_model(path, weights_of(path, 1), source="s").default
    assert (spec.sample_shape, spec.output_shape) == ((-1, 8), (-1,))


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", 'kind = "torch"\n[inputs\nshape = [1]\n')
    with pytest.raises(ConfigurationError, match=rf"{re.escape(str(path))}: not valid TOML"):
        parse_model(path, weights_of(path, 1), source="s")


def test_a_model_toml_that_is_not_utf8(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", "")
    path.write_bytes(b'description = "\xff"\n')
    with pytest.raises(ConfigurationError, match=rf"{re.escape(str(path))}: cannot read it"):
        parse_model(path, weights_of(path, 1), source="s")


@pytest.mark.parametrize("name", ["My-Model", "-dash", "has space", "x" * 65, "é"])
def test_a_folder_name_that_is_not_a_model_name(tmp_path: Path, name: str) -> None:
    path = write_model(tmp_path, name, render(TORCH))
    with pytest.raises(
        ConfigurationError, match=rf"{re.escape(str(path.parent))}: the folder name"
    ):
        parse_model(path, weights_of(path, 1), source="s")


def test_default_version_without_its_folder(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", render(TORCH, {"": {"default_version": "2"}}))
    expected = f"{path}: default_version: 2 has no folder (versions: 1)"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_model(path, weights_of(path, 1), source="s")


@pytest.mark.parametrize(
    ("text", "hint"),
    [(render(TORCH, {"torch": {"seed": None}}), ""), (render(HF), "a Hugging Face folder")],
)
def test_no_version_folder_and_no_seed(tmp_path: Path, text: str, hint: str) -> None:
    path = write_model(tmp_path, "m", text, versions=())
    folder = path.parent
    expected = f"{folder}: no version folder: put the weights in {folder}/1/{WEIGHTS_FILE}"
    with pytest.raises(ConfigurationError, match=re.escape(expected) + f".*{hint}"):
        parse_model(path, {}, source="s")


# --- scan ---------------------------------------------------------------------------------


def test_one_bad_model_does_not_stop_the_others(tmp_path: Path) -> None:
    write_model(tmp_path, "a", render(TORCH))
    bad = write_model(tmp_path, "b", render(TORCH, {"inputs": {"shape": "[0]"}}))
    write_model(tmp_path, "c", render(TORCH, {"torch": {"seed": None}}), versions=())
    write_model(tmp_path, "d", FULL_HF)
    (tmp_path / "notes").mkdir()  # no model.toml: not a model
    (tmp_path / "README.md").write_text("models here\n")
    entries, errors = scan(tmp_path, source="repository t")
    assert [e.name for e in entries] == ["a", "d"]
    assert all(e.source == "repository t" for e in entries)
    assert len(errors) == 2
    assert f"{bad}: inputs.shape: " in str(errors[0])
    assert f"{tmp_path / 'c'}: no version folder" in str(errors[1])


def test_scanning_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    entries, [error] = scan(missing, source="repository nowhere")
    assert entries == []
    assert isinstance(error, ConfigurationError)
    assert f"model repository {missing} is not a folder" in str(error)
    assert "INFER_MODEL_REPOSITORY" in str(error)


# --- versions -----------------------------------------------------------------------------


def two_versions(root: Path) -> Path:
    """A repository with model ``m``, versions 1 and 2, default 1."""
    write_model(root, "m", render(TORCH, {"": {"default_version": "1"}}), versions=(1, 2))
    return root


def test_version_resolution(tmp_path: Path) -> None:
    catalog = discover([two_versions(tmp_path / "repo")], tmp_path / "w", use_entry_points=False)
    assert catalog.names() == ["m"]
    assert catalog.resolve("m").version == 1
    assert catalog.resolve("m@1").version == 1
    assert catalog.resolve("m@2").version == 2
    assert catalog.resolve("m@2").weights == str(tmp_path / "repo" / "m" / "2" / WEIGHTS_FILE)
    with pytest.raises(UnknownVersion, match=r"no version 3 here \(versions: 1, 2; default 1\)"):
        catalog.resolve("m@3")
    assert issubclass(UnknownVersion, UnknownModel)


def test_an_unknown_name_is_not_an_unknown_version(tmp_path: Path) -> None:
    catalog = discover([two_versions(tmp_path / "repo")], tmp_path / "w", use_entry_points=False)
    with pytest.raises(UnknownModel, match="Known here: m ") as info:
        catalog.resolve("n@1")
    assert info.type is UnknownModel


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("m", ("m", None)),
        ("m@2", ("m", 2)),
        ("resnet50@12", ("resnet50", 12)),
        ("a.b-c_d", ("a.b-c_d", None)),
    ],
)
def test_parse_ref(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["m@0", "m@x", "m@01", "m@-1", "m@", "@1", "", None, "M", "m@1@2", " m", 3, b"m"]
)
def test_parse_ref_refuses_what_cannot_name_a_model(tmp_path: Path, ref: object) -> None:
    with pytest.raises(UnknownModel, match="is not a model name"):
        parse_ref(ref)
    catalog = discover([two_versions(tmp_path / "repo")], tmp_path / "w", use_entry_points=False)
    with pytest.raises(UnknownModel, match="is not a model name"):
        catalog.resolve(ref)


def test_set_default(tmp_path: Path) -> None:
    catalog = discover([two_versions(tmp_path / "repo")], tmp_path / "w", use_entry_points=False)
    assert catalog.set_default("m", 2).version == 2
    assert catalog.resolve("m").version == 2
    assert catalog.entry("m").default_version == 2
    with pytest.raises(UnknownVersion, match="versions: 1, 2"):
        catalog.set_default("m", 3)
    assert catalog.resolve("m").version == 2  # unchanged
    with pytest.raises(UnknownModel):
        catalog.set_default("n", 1)


def test_merge_adds_a_new_version_and_keeps_a_moved_default(tmp_path: Path) -> None:
    repo, weights = two_versions(tmp_path / "repo"), tmp_path / "w"
    catalog = discover([repo], weights, use_entry_points=False)
    catalog.set_default("m", 2)
    (repo / "m" / "3").mkdir()
    write_model(repo, "n", render(TORCH))
    other = two_versions(tmp_path / "other")  # another source's m: not merged into this one
    (other / "m" / "5").mkdir()

    catalog.merge(discover([repo], weights, use_entry_points=False))
    catalog.merge(discover([other], weights, use_entry_points=False))

    assert catalog.resolve("m@3").weights == str(repo / "m" / "3" / WEIGHTS_FILE)
    assert catalog.resolve("m").version == 2  # the moved default stays moved
    assert sorted(catalog.entry("m").versions) == [1, 2, 3]
    assert catalog.entry("m").source == f"repository {repo}"
    assert catalog.names() == ["m", "n"]
    with pytest.raises(UnknownVersion):
        catalog.resolve("m@5")


# --- sources and their precedence ---------------------------------------------------------


def test_the_first_repository_wins_a_duplicate(tmp_path: Path) -> None:
    repo_a, repo_b = tmp_path / "a", tmp_path / "b"
    write_model(repo_a, "mlp", render(TORCH, {"": {"description": '"from a"'}}))
    write_model(repo_b, "mlp", render(TORCH, {"": {"description": '"from b"'}}))
    catalog = discover([repo_a, repo_b], tmp_path / "weights", use_entry_points=True)
    mlp = catalog.resolve("mlp")
    assert (mlp.description, mlp.source) == ("from a", f"repository {repo_a}")
    assert mlp.weights == str(repo_a / "mlp" / "1" / WEIGHTS_FILE)
    assert f"mlp from repository {repo_b} (shadowed by repository {repo_a})" in catalog.shadowed
    assert catalog.errors == []


def test_a_user_repository_shadows_the_zoo(tmp_path: Path) -> None:
    repo, weights = tmp_path / "repo", tmp_path / "weights"
    write_model(repo, "mlp", render(TORCH, {"": {"description": '"mine"'}}))
    catalog = discover([repo], weights, use_entry_points=True)
    mlp = catalog.resolve("mlp")
    assert mlp.source.startswith("repository")
    assert mlp.description == "mine"
    assert catalog.shadowed == [f"mlp from zoo (shadowed by repository {repo})"]
    cnn = catalog.resolve("cnn")
    assert cnn.source == "zoo"
    assert cnn.weights == str(weights / "cnn" / "1" / WEIGHTS_FILE)
    assert {"cnn", "mlp", "resnet50", "transformer"} <= set(catalog.names())
    assert catalog.errors == []


def test_a_missing_repository_is_an_error_and_the_zoo_still_serves(tmp_path: Path) -> None:
    catalog = discover([tmp_path / "nowhere"], tmp_path / "weights", use_entry_points=True)
    assert [str(tmp_path / "nowhere") in str(e) for e in catalog.errors] == [True]
    assert catalog.resolve("mlp").source == "zoo"


# --- the wire form ------------------------------------------------------------------------


def _round_trip(spec: ModelSpec) -> ModelSpec:
    wire = json.loads(json.dumps(spec.to_wire()))  # what really travels: JSON
    assert "weights" not in wire
    return ModelSpec.from_wire({**wire, "from_a_newer_worker": 1})


def test_a_tensor_spec_round_trips_without_its_weights(tmp_path: Path) -> None:
    for text in (FULL_TORCH, TOKENS):
        path = write_model(tmp_path, "m", text, versions=(1, 2))
        spec = parse_model(path, weights_of(path, 1, 2), source="repository r").default
        assert spec.weights is not None
        back = _round_trip(spec)
        assert back == replace(spec, weights=None)
        assert back.weights is None
        assert isinstance(back.sample_shape, tuple)
        assert isinstance(back.accepted_dtypes, tuple)


def test_a_text_spec_round_trips_without_its_weights(tmp_path: Path) -> None:
    path = write_model(tmp_path, "enc", FULL_HF)
    spec = parse_model(path, {1: path.parent / "1"}, source="package x").default
    back = _round_trip(spec)
    assert back == replace(spec, weights=None)
    assert back.text == TextSpec(max_tokens=128, truncate=True, max_strings=8)


# --- inputs with a dimension of any size --------------------------------------------------

SEQ = ModelSpec(name="seq", sample_shape=(-1, 4))


def test_minus_one_takes_any_length() -> None:
    one = check_input(SEQ, np.zeros((5, 4), np.float32), 1 << 20)
    assert one.shape == (1, 5, 4)
    batch = check_input(SEQ, np.zeros((2, 5, 4), np.float64), 1 << 20)
    assert (batch.shape, batch.dtype) == ((2, 5, 4), np.float32)


@pytest.mark.parametrize("shape", [(5, 3), (0, 4), (4,), (2, 5, 3), (0, 5, 4), (1, 2, 5, 4)])
def test_minus_one_checks_the_other_dimensions(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeMismatch, match=re.escape("[any, 4] or a batch [N, any, 4]")):
        check_input(SEQ, np.zeros(shape, np.float32), 1 << 20)
