"""Model registry: name -> :class:`ModelSpec` (builder, input spec, weights file).

Pure data, no torch: the client and the router read it to check a request
before anything is published; only :mod:`models.loader` imports the builders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from models.errors import UnknownModel, echo

__all__ = ["SPECS", "ModelSpec", "get_spec", "model_names"]

FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the deployment needs to know about one model.

    ``sample_shape`` is the shape of one input; a request carries either one
    sample or a batch ``(N, *sample_shape)``.  ``input_dtype`` is the dtype the
    model consumes; ``accepted_dtypes`` are the wire dtypes cast to it
    losslessly enough to be accepted (ints are never accepted for a float
    model, nor floats for a token model).
    """

    name: str
    builder: str  # "module:function" returning an nn.Module, imported lazily
    sample_shape: tuple[int, ...]
    input_dtype: str
    accepted_dtypes: tuple[str, ...]
    output_shape: tuple[int, ...]
    seed: int
    description: str
    # Device memory a worker needs free to load and run it at a typical batch
    # (declared, not measured): the router's min_free_memory_mb for the model.
    memory_mb: int = 64
    half_precision_ok: bool = True  # fp16/bf16 allowed on GPU
    # Dynamic batching limits for this model; None: the worker's defaults
    # (INFER_MAX_BATCH_SIZE, INFER_MAX_WAIT_MS).
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    value_range: tuple[int, int] | None = None  # [low, high) for integer inputs

    @property
    def weights_file(self) -> str:
        """File name inside the weights directory (always safetensors)."""
        return f"{self.name}.safetensors"


SPECS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "mlp": ModelSpec(
            name="mlp",
            builder="models.zoo.mlp:build",
            sample_shape=(64,),
            input_dtype="float32",
            accepted_dtypes=FLOAT_DTYPES,
            output_shape=(10,),
            seed=1001,
            description="3-layer MLP on 64-d feature vectors -> 10 logits",
            memory_mb=32,
        ),
        "cnn": ModelSpec(
            name="cnn",
            builder="models.zoo.cnn:build",
            sample_shape=(3, 32, 32),
            input_dtype="float32",
            accepted_dtypes=FLOAT_DTYPES,
            output_shape=(10,),
            seed=2002,
            description="small CNN on 3x32x32 images -> 10 logits",
            memory_mb=128,
            max_batch_size=64,
        ),
        "transformer": ModelSpec(
            name="transformer",
            builder="models.zoo.transformer:build",
            sample_shape=(16,),
            input_dtype="int64",
            accepted_dtypes=INT_DTYPES,
            output_shape=(8,),
            seed=3003,
            description="2-layer transformer encoder on 16 token ids (vocab 1000) -> 8 logits",
            memory_mb=256,
            value_range=(0, 1000),
        ),
    }
)


def model_names() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(SPECS)


def get_spec(name: object) -> ModelSpec:
    """Return the spec for ``name`` or raise :class:`UnknownModel`."""
    if not isinstance(name, str) or name not in SPECS:
        raise UnknownModel(
            f"unknown model {echo(name)}: choose one of {', '.join(model_names())} "
            "(python -m models list shows them with their input shapes)"
        )
    return SPECS[name]
