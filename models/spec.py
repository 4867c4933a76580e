"""What the deployment knows about one version of one model: :class:`ModelSpec`.

Pure data, no torch: the client and the router read specs to check a request
before anything is published; only :mod:`models.loader` imports builders.
A spec travels too: workers advertise the specs they serve
(:meth:`ModelSpec.to_wire`), so a client with no model repository of its own
still checks requests (:meth:`ModelSpec.from_wire`).

A model is named ``name`` (its default version) or ``name@version``
(:func:`parse_ref`); versions are whole numbers from 1, as in Triton's model
repository.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from models.errors import UnknownModel, echo

__all__ = [
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "KINDS",
    "NAME_PATTERN",
    "TEXT",
    "ModelSpec",
    "TextSpec",
    "parse_ref",
]

FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int32", "int64")
KINDS = ("torch", "huggingface")
TEXT = "text"  # the input dtype of a text model
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_REF = re.compile(r"(?P<name>[a-z0-9][a-z0-9_.-]{0,63})(?:@(?P<version>[1-9][0-9]{0,8}))?")


def parse_ref(model: object) -> tuple[str, int | None]:
    """``"resnet50"`` -> ``("resnet50", None)`` (the default version); ``"resnet50@2"`` -> ``(.., 2)``.

    Raises :class:`UnknownModel` for anything that cannot name a model.
    """
    found = _REF.fullmatch(model) if isinstance(model, str) else None
    if found is None:
        raise UnknownModel(
            f"{echo(model)} is not a model name: write 'name' (its default version) or "
            "'name@version' with a version from 1, e.g. 'resnet50' or 'resnet50@2' "
            "(python -m models list shows the models)"
        )
    version = found["version"]
    return found["name"], None if version is None else int(version)


@dataclass(frozen=True)
class TextSpec:
    """The limits of a text model's input: strings, tokenized in the worker."""

    max_tokens: int  # the model's longest input, in tokens (special tokens included)
    truncate: bool = False  # cut longer texts to max_tokens instead of refusing them
    max_strings: int = 64  # strings in one request


@dataclass(frozen=True)
class ModelSpec:
    """Everything the deployment needs to know about one version of one model.

    ``sample_shape`` is the shape of one input (``-1``: any length along that
    axis); a request carries one sample or a batch ``(N, *sample_shape)``.
    ``native_dtypes`` reach the model as they are (``resnet50`` takes uint8
    images and normalises them itself); the other ``accepted_dtypes`` are cast
    to ``input_dtype`` (ints are never accepted for a float model, nor floats
    for a token model).  A text model has ``text`` set and
    ``input_dtype == "text"``.
    """

    name: str
    sample_shape: tuple[int, ...] = ()
    input_dtype: str = "float32"
    accepted_dtypes: tuple[str, ...] = FLOAT_DTYPES
    output_shape: tuple[int, ...] = ()
    description: str = ""
    version: int = 1
    kind: str = "torch"
    builder: str = ""  # "module:function" returning an nn.Module, imported lazily (torch kind)
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None  # `python -m models build` can write seeded weights
    native_dtypes: tuple[str, ...] = ()  # () : input_dtype only
    output_dtype: str = "float32"
    # Device memory a worker needs free to load and run it at a typical batch
    # (declared, not measured): the router's min_free_memory_mb for the model.
    memory_mb: int = 64
    half_precision_ok: bool = True  # fp16/bf16 allowed on GPU
    # Dynamic batching limits for this model; None: the worker's defaults
    # (INFER_MAX_BATCH_SIZE, INFER_MAX_WAIT_MS).
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    value_range: tuple[int, int] | None = None  # [low, high) for integer inputs
    text: TextSpec | None = None
    pooling: str = "mean"  # huggingface: mean or cls over the last hidden state
    normalize: bool = False  # huggingface: L2-normalise the pooled embedding
    # Where the weights are: a safetensors file (torch) or a folder (huggingface).
    # None on a client that knows the model only from a worker's advertisement.
    weights: str | None = None
    source: str = ""  # where the spec came from, e.g. "repository /srv/models" or "zoo"

    @property
    def ref(self) -> str:
        """``name@version``: the model and the version this spec describes."""
        return f"{self.name}@{self.version}"

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def served_dtypes(self) -> tuple[str, ...]:
        """The dtypes that reach the model unchanged."""
        return self.native_dtypes or (self.input_dtype,)

    def input_summary(self) -> str:
        """One line for ``python -m models list`` and error messages."""
        if self.text is not None:
            trunc = ", truncated" if self.text.truncate else ""
            return f"text (<= {self.text.max_tokens} tokens{trunc}, <= {self.text.max_strings} strings)"
        shape = "x".join("N" if d == -1 else str(d) for d in self.sample_shape) or "scalar"
        return f"{'|'.join(self.served_dtypes)} [{shape}]"

    def to_wire(self) -> dict[str, Any]:
        """The spec as JSON (what a worker advertises); ``weights`` stays local."""
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "weights":
                continue
            value = getattr(self, f.name)
            if isinstance(value, TextSpec):
                value = {
                    "max_tokens": value.max_tokens,
                    "truncate": value.truncate,
                    "max_strings": value.max_strings,
                }
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            data[f.name] = value
        return data

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ModelSpec:
        """A spec a worker advertised (unknown keys from newer workers are ignored)."""
        known = {f.name for f in fields(cls)} - {"weights"}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("sample_shape", "accepted_dtypes", "output_shape", "native_dtypes"):
            if key in values:
                values[key] = tuple(values[key])
        if values.get("value_range") is not None:
            values["value_range"] = tuple(values["value_range"])
        if values.get("text") is not None:
            values["text"] = TextSpec(**values["text"])
        values["builder_kwargs"] = dict(values.get("builder_kwargs") or {})
        return cls(**values)
