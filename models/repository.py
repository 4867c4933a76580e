"""A model repository folder: ``<name>/model.toml`` and ``<name>/<version>/`` weights.

Layout (one folder per model, one subfolder per version, as in Triton)::

    repository/
      my-classifier/
        model.toml              what the model is (see docs/serve-your-own-model.md)
        1/model.safetensors     version 1 (torch kind)
        2/model.safetensors     version 2
      my-encoder/
        model.toml              kind = "huggingface"
        1/config.json  1/model.safetensors  1/tokenizer.json ...

``model.toml`` is validated strictly: an unknown key, a wrong type or a
missing field raises :class:`~models.errors.ConfigurationError` naming the
file, the field and what to write instead.  :func:`scan` keeps going past a
bad model, so one broken folder does not stop a worker serving the others.
Pure Python (``tomllib``), no torch.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ConfigurationError
from models.spec import (
    FLOAT_DTYPES,
    INT_DTYPES,
    KINDS,
    NAME_PATTERN,
    TEXT,
    ModelSpec,
    TextSpec,
)

__all__ = ["WEIGHTS_FILE", "ModelEntry", "parse_model", "scan"]

WEIGHTS_FILE = "model.safetensors"
NUMERIC_DTYPES = ("uint8", "int8", "int16", *INT_DTYPES, *FLOAT_DTYPES)

_TOP = {
    "description",
    "kind",
    "default_version",
    "memory_mb",
    "half_precision_ok",
    "torch",
    "huggingface",
    "inputs",
    "outputs",
    "batching",
}
_TABLES = {
    "torch": {"builder", "kwargs", "seed"},
    "huggingface": {"pooling", "normalize"},
    "inputs": {
        "type",
        "dtype",
        "accept",
        "shape",
        "value_range",
        "max_tokens",
        "truncate",
        "max_strings",
    },
    "outputs": {"shape", "dtype"},
    "batching": {"max_batch_size", "max_wait_ms"},
}


@dataclass(frozen=True)
class ModelEntry:
    """One model of a source: its versions' specs and its default version."""

    name: str
    source: str
    versions: Mapping[int, ModelSpec]
    default_version: int

    @property
    def default(self) -> ModelSpec:
        return self.versions[self.default_version]


class _Toml:
    """Typed reads from one parsed ``model.toml``; every error names the file and the field."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, message: str) -> ConfigurationError:
        return ConfigurationError(f"{self.path}: {key}: {message}")

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a table ([{name}]), not {type(value).__name__}")
        unknown = sorted(set(value) - _TABLES[name])
        if unknown:
            raise self.fail(
                f"{name}.{unknown[0]}",
                f"unknown key; [{name}] takes {', '.join(sorted(_TABLES[name]))}",
            )
        return value

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        where: str,
        hint: str,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass: `true` is no number, unless a bool is what is asked for
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise self.fail(where, f"{value!r} is not valid: {hint}")
        return value

    def whole(
        self, table: Mapping[str, Any], key: str, default: Any, where: str, minimum: int = 1
    ) -> Any:
        value = self.get(table, key, int, default, where, f"write a whole number >= {minimum}")
        if value is not None and value < minimum:
            raise self.fail(where, f"{value} is too small: write a whole number >= {minimum}")
        return value

    def shape(
        self, table: Mapping[str, Any], key: str, where: str, variable: bool
    ) -> tuple[int, ...]:
        value = table.get(key)
        hint = "write a list of positive sizes, e.g. [3, 224, 224]" + (
            " (-1 for a dimension of any size)" if variable else ""
        )
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"{value!r} is not a shape: {hint}")
        for d in value:
            if (
                isinstance(d, bool)
                or not isinstance(d, int)
                or not (d > 0 or (variable and d == -1))
            ):
                raise self.fail(where, f"{value!r} is not a shape: {hint}")
        return tuple(value)

    def dtypes(
        self, table: Mapping[str, Any], key: str, where: str, required: bool
    ) -> tuple[str, ...]:
        value = table.get(key)
        if value is None and not required:
            return ()
        names = [value] if isinstance(value, str) else value
        hint = f"write one of {', '.join(NUMERIC_DTYPES)} (or a list of them)"
        if not isinstance(names, list) or not names:
            raise self.fail(where, f"{value!r} is not a dtype: {hint}")
        for name in names:
            if name not in NUMERIC_DTYPES:
                raise self.fail(where, f"{name!r} is not a dtype: {hint}")
        return tuple(names)


def parse_model(
    path: Path, versions: Mapping[int, Path], source: str, weights_folder: Path | None = None
) -> ModelEntry:
    """Parse ``path`` (a ``model.toml``) into one spec per version.

    ``versions`` maps each version to where its weights are: the
    ``model.safetensors`` file (torch) or the folder (huggingface).  A model
    with a seed and no version yet gets its default version, whose seeded
    weights ``python -m models build`` writes under ``weights_folder``
    (default: the ``model.toml``'s folder).
    """
    name = path.parent.name
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"{path.parent}: the folder name {name!r} is not a model name: use lower-case letters, "
            "digits, '.', '_' and '-' (at most 64), starting with a letter or digit"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"{path}: cannot read it ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{path}: not valid TOML ({e}): fix the syntax") from e
    toml = _Toml(path, data)
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise toml.fail(unknown[0], f"unknown key; model.toml takes {', '.join(sorted(_TOP))}")

    kind = data.get("kind")
    if kind not in KINDS:
        raise toml.fail("kind", f'{kind!r}: write kind = "torch" or kind = "huggingface"')
    other = "huggingface" if kind == "torch" else "torch"
    if other in data:
        raise toml.fail(other, f"a {kind} model has no [{other}] table: remove it, or set kind")
    common = _common(toml)
    if kind == "torch":
        common.update(_torch(toml))
    else:
        hf = toml.table("huggingface")
        pooling = toml.get(
            hf, "pooling", str, "mean", "huggingface.pooling", 'write "mean" or "cls"'
        )
        if pooling not in ("mean", "cls"):
            raise toml.fail("huggingface.pooling", f'{pooling!r}: write "mean" or "cls"')
        common["pooling"] = pooling
        common["normalize"] = toml.get(
            hf, "normalize", bool, False, "huggingface.normalize", "write true or false"
        )
    common.update(_inputs(toml, kind))
    common.update(_outputs(toml))

    if not versions and common.get("seed") is None:
        raise ConfigurationError(
            f"{path.parent}: no version folder: put the weights in {path.parent}/1/{WEIGHTS_FILE}"
            + (
                " (a Hugging Face folder: config.json, model.safetensors, tokenizer files)"
                if kind == "huggingface"
                else ""
            )
        )
    default = toml.whole(data, "default_version", None, "default_version")
    if default is None:
        default = max(versions) if versions else 1
    if versions and default not in versions:
        raise toml.fail(
            "default_version",
            f"{default} has no folder (versions: {', '.join(map(str, sorted(versions)))}): "
            f"set it to one of them, or create {path.parent}/{default}/",
        )
    if not versions:  # seeded weights, not built yet: `python -m models build` writes them
        versions = {default: (weights_folder or path.parent) / str(default) / WEIGHTS_FILE}
    specs = {
        v: ModelSpec(name=name, version=v, kind=kind, weights=str(w), source=source, **common)
        for v, w in sorted(versions.items())
    }
    return ModelEntry(name, source, specs, default)


def _common(toml: _Toml) -> dict[str, Any]:
    data = toml.data
    batching = toml.table("batching")
    wait = toml.get(
        batching,
        "max_wait_ms",
        (int, float),
        None,
        "batching.max_wait_ms",
        "write a number of milliseconds >= 0, e.g. 5",
    )
    if wait is not None and wait < 0:
        raise toml.fail("batching.max_wait_ms", f"{wait} is negative: write a number >= 0")
    return {
        "description": toml.get(data, "description", str, "", "description", "write a string"),
        "memory_mb": toml.whole(data, "memory_mb", 64, "memory_mb"),
        "half_precision_ok": toml.get(
            data, "half_precision_ok", bool, True, "half_precision_ok", "write true or false"
        ),
        "max_batch_size": toml.whole(batching, "max_batch_size", None, "batching.max_batch_size"),
        "max_wait_ms": None if wait is None else float(wait),
    }


def _torch(toml: _Toml) -> dict[str, Any]:
    table = toml.table("torch")
    builder = table.get("builder")
    module, _, func = builder.partition(":") if isinstance(builder, str) else ("", "", "")
    if not (module and func and all(p.isidentifier() for p in [*module.split("."), func])):
        raise toml.fail(
            "torch.builder",
            f'{builder!r}: write "package.module:function", an importable function that '
            "returns the torch.nn.Module (its weights come from model.safetensors)",
        )
    kwargs = toml.get(
        table,
        "kwargs",
        dict,
        {},
        "torch.kwargs",
        "write a table of the builder's keyword arguments",
    )
    seed = toml.get(table, "seed", int, None, "torch.seed", "write a whole number")
    return {"builder": builder, "builder_kwargs": dict(kwargs), "seed": seed}


def _inputs(toml: _Toml, kind: str) -> dict[str, Any]:
    table = toml.table("inputs")
    kind_of = toml.get(table, "type", str, "tensor", "inputs.type", 'write "tensor" or "text"')
    if kind_of not in ("tensor", "text"):
        raise toml.fail("inputs.type", f'{kind_of!r}: write "tensor" or "text"')
    if kind == "huggingface" and kind_of != "text":
        raise toml.fail(
            "inputs.type",
            'a huggingface model takes text here: write type = "text" and max_tokens',
        )
    if kind == "torch" and kind_of == "text":
        raise toml.fail(
            "inputs.type",
            "a torch model takes tensors (token ids, for a text model of your own); text with a "
            'tokenizer is a huggingface model: write kind = "huggingface"',
        )
    if kind_of == "text":
        stray = sorted({"dtype", "accept", "shape", "value_range"} & set(table))
        if stray:
            raise toml.fail(f"inputs.{stray[0]}", "a text input has no dtype or shape: remove it")
        max_tokens = toml.whole(table, "max_tokens", None, "inputs.max_tokens")
        if max_tokens is None:
            raise toml.fail(
                "inputs.max_tokens", "missing: write the model's longest input in tokens, e.g. 256"
            )
        text = TextSpec(
            max_tokens=max_tokens,
            truncate=toml.get(
                table,
                "truncate",
                bool,
                False,
                "inputs.truncate",
                "write true (cut to max_tokens) or false (refuse)",
            ),
            max_strings=toml.whole(table, "max_strings", 64, "inputs.max_strings"),
        )
        return {"text": text, "input_dtype": TEXT, "accepted_dtypes": (TEXT,), "sample_shape": ()}
    stray = sorted({"max_tokens", "truncate", "max_strings"} & set(table))
    if stray:
        raise toml.fail(f"inputs.{stray[0]}", 'only a text input has it: write type = "text"')
    native = toml.dtypes(table, "dtype", "inputs.dtype", required=True)
    accept = toml.dtypes(table, "accept", "inputs.accept", required=False)
    if any(d in FLOAT_DTYPES for d in accept) and not any(d in FLOAT_DTYPES for d in native):
        raise toml.fail("inputs.accept", "casts to a float dtype need a float in inputs.dtype")
    if any(d not in FLOAT_DTYPES for d in accept) and all(d in FLOAT_DTYPES for d in native):
        raise toml.fail(
            "inputs.accept", "casts to an integer dtype need an integer in inputs.dtype"
        )
    value_range = table.get("value_range")
    if value_range is not None:
        ok = (
            isinstance(value_range, list)
            and len(value_range) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value_range)
            and value_range[0] < value_range[1]
        )
        if not ok:
            raise toml.fail(
                "inputs.value_range", f"{value_range!r}: write [low, high), e.g. [0, 1000]"
            )
        value_range = tuple(value_range)
    return {
        "sample_shape": toml.shape(table, "shape", "inputs.shape", variable=True),
        "input_dtype": native[0],
        "native_dtypes": native if len(native) > 1 else (),
        "accepted_dtypes": tuple(dict.fromkeys([*native, *accept])),
        "value_range": value_range,
    }


def _outputs(toml: _Toml) -> dict[str, Any]:
    table = toml.table("outputs")
    if "shape" not in table:
        raise toml.fail("outputs.shape", "missing: write the shape of one output, e.g. [10]")
    dtype = toml.get(table, "dtype", str, "float32", "outputs.dtype", 'write "float32"')
    if dtype != "float32":
        raise toml.fail("outputs.dtype", f"{dtype!r}: outputs are returned as float32")
    return {"output_shape": toml.shape(table, "shape", "outputs.shape", variable=True)}


def _versions(folder: Path, kind: str) -> dict[int, Path]:
    """Version subfolders (whole numbers from 1) and where their weights are."""
    found: dict[int, Path] = {}
    for child in folder.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0:
            found[int(child.name)] = child if kind == "huggingface" else child / WEIGHTS_FILE
    return found


def scan(
    folder: Path, source: str, weights_root: Path | None = None
) -> tuple[list[ModelEntry], list[ConfigurationError]]:
    """Every model under ``folder``, and an error for each model that could not be read.

    ``weights_root`` (default: ``folder``) holds the version folders; the
    built-in zoo keeps its ``model.toml`` files in the package and its
    seeded weights under ``INFER_WEIGHTS_DIR``.
    """
    if not folder.is_dir():
        return [], [
            ConfigurationError(
                f"model repository {folder} is not a folder: create it, "
                "or fix INFER_MODEL_REPOSITORY"
            )
        ]
    entries: list[ModelEntry] = []
    errors: list[ConfigurationError] = []
    for toml_path in sorted(folder.glob("*/model.toml")):
        try:
            kind = _peek_kind(toml_path)
            weights = (weights_root or folder) / toml_path.parent.name
            versions = _versions(weights, kind) if weights.is_dir() else {}
            entries.append(parse_model(toml_path, versions, source, weights))
        except ConfigurationError as e:
            errors.append(e)
    return entries, errors


def _peek_kind(path: Path) -> str:
    try:
        kind = tomllib.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "torch"  # parse_model reports it properly
    return kind if isinstance(kind, str) else "torch"
