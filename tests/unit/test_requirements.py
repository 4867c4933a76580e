"""The ``requires`` header, parsed strictly: each bad value gets a typed error saying what to write.

Each case names the class it must raise and fragments its message must hold:
the key, an echo of the bad value, and the hint.  Cases go through
``TaskRequirements.merged`` (what the router calls), ``from_mapping`` and the
router itself (``headers={"requires": ...}``), so every path is held to the same answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from models.errors import (
    BadRequirements,
    ConfigurationError,
    InferenceError,
    RequestError,
    UnsupportedDtype,
    unknown_dtype,
)
from routing.capabilities import MAX_MEMORY_MB, TaskRequirements, WorkerCapabilities
from routing.router import CapabilityRouter

BASE = TaskRequirements(model="cnn", model_memory_mb=128, dtype="bf16")

MEMORY_HINT = "whole number of megabytes from 0"
CAPABILITY_HINT = "'8.0' or '8'"
DEVICE_HINT = "'any' (no constraint), 'cpu' or 'cuda'"
VALID_KEYS = "valid keys: device ("


def merged(requires: object) -> TaskRequirements:
    return BASE.merged(requires)


# --- values that parse ------------------------------------------------------------------------

GOOD: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {}),
    ({"device": "any"}, {"device": "any"}),
    ({"device": "cpu"}, {"device": "cpu"}),
    ({"device": "cuda"}, {"device": "cuda"}),
    ({"min_free_memory_mb": 0}, {"min_free_memory_mb": 0}),
    ({"min_free_memory_mb": 8000}, {"min_free_memory_mb": 8000}),
    ({"min_free_memory_mb": 8000.0}, {"min_free_memory_mb": 8000}),  # JSON from JavaScript
    ({"min_free_memory_mb": MAX_MEMORY_MB}, {"min_free_memory_mb": 2**40 - 1}),
    ({"min_compute_capability": "8.0"}, {"min_compute_capability": (8, 0)}),
    ({"min_compute_capability": "8.6"}, {"min_compute_capability": (8, 6)}),
    ({"min_compute_capability": "8"}, {"min_compute_capability": (8, 0)}),
    ({"min_compute_capability": [9, 0]}, {"min_compute_capability": (9, 0)}),
    ({"min_compute_capability": (7, 5)}, {"min_compute_capability": (7, 5)}),
    ({"min_compute_capability": "999.999"}, {"min_compute_capability": (999, 999)}),
    ({"min_compute_capability": None}, {"min_compute_capability": None}),
    ({"dtype": "fp16"}, {"dtype": "fp16"}),
    ({"dtype": "fp32"}, {"dtype": "fp32"}),
    # None / auto add no constraint: the call's own dtype (bf16 here) still applies
    ({"dtype": "auto"}, {"dtype": "bf16"}),
    ({"dtype": None}, {"dtype": "bf16"}),
]


@pytest.mark.parametrize(("requires", "expected"), GOOD, ids=[repr(g[0]) for g in GOOD])
def test_valid_requirements_parse(requires: dict[str, Any], expected: dict[str, Any]) -> None:
    req = merged(requires)
    for name, value in expected.items():
        assert getattr(req, name) == value
    assert (req.model, req.model_memory_mb) == ("cnn", 128)  # what the client set stays


def test_no_header_means_no_requirements() -> None:
    assert merged(None) is BASE
    assert TaskRequirements.from_mapping(None) == TaskRequirements()
    assert TaskRequirements.from_mapping({"device": "cuda"}) == TaskRequirements(device="cuda")


def test_auto_is_no_constraint_everywhere() -> None:
    assert TaskRequirements(dtype="auto") == TaskRequirements()
    assert TaskRequirements(dtype="auto").key == TaskRequirements().key
    assert TaskRequirements.from_mapping({"dtype": "auto"}).dtype is None


# --- values that are refused ------------------------------------------------------------------

BAD_TYPES: list[object] = ["lots", True, 1.5, [8000], {"mb": 8000}, None]

BAD: list[tuple[object, type[Exception], tuple[str, ...]]] = [
    # min_free_memory_mb: a non-negative whole number, bounded
    *(
        (
            {"min_free_memory_mb": v},
            BadRequirements,
            ("requires['min_free_memory_mb']", MEMORY_HINT),
        )
        for v in BAD_TYPES
    ),
    ({"min_free_memory_mb": False}, BadRequirements, ("= False", MEMORY_HINT)),
    ({"min_free_memory_mb": -1}, BadRequirements, ("= -1", MEMORY_HINT)),
    ({"min_free_memory_mb": 2**40}, BadRequirements, ("= 1099511627776", MEMORY_HINT)),
    ({"min_free_memory_mb": 10**400}, BadRequirements, ("characters, cut", MEMORY_HINT)),
    ({"min_free_memory_mb": float("nan")}, BadRequirements, ("= nan", MEMORY_HINT)),
    ({"min_free_memory_mb": float("inf")}, BadRequirements, ("= inf", MEMORY_HINT)),
    ({"min_free_memory_mb": -8000.0}, BadRequirements, ("= -8000.0", MEMORY_HINT)),
    ({"min_free_memory_mb": "8000"}, BadRequirements, ("= '8000'", MEMORY_HINT)),
    # device: one of any, cpu, cuda
    *(({"device": v}, BadRequirements, ("requires['device']", DEVICE_HINT)) for v in BAD_TYPES),
    ({"device": "tpu"}, BadRequirements, ("requires['device'] = 'tpu'", DEVICE_HINT)),
    ({"device": "CUDA"}, BadRequirements, ("= 'CUDA'", DEVICE_HINT)),
    ({"device": "gpu"}, BadRequirements, ("= 'gpu'", DEVICE_HINT)),
    ({"device": 0}, BadRequirements, ("= 0", DEVICE_HINT)),
    # min_compute_capability: "8.0", "8", [8, 0] or (8, 0), parts 0..999
    *(
        (
            {"min_compute_capability": v},
            BadRequirements,
            ("min_compute_capability", CAPABILITY_HINT),
        )
        for v in BAD_TYPES
        if v is not None  # None: no constraint
    ),
    ({"min_compute_capability": "eight"}, BadRequirements, ("= 'eight'", CAPABILITY_HINT)),
    ({"min_compute_capability": "8.0.1"}, BadRequirements, ("= '8.0.1'", CAPABILITY_HINT)),
    ({"min_compute_capability": "8."}, BadRequirements, ("= '8.'", CAPABILITY_HINT)),
    ({"min_compute_capability": " 8.0"}, BadRequirements, ("= ' 8.0'", CAPABILITY_HINT)),
    ({"min_compute_capability": "-8.0"}, BadRequirements, ("= '-8.0'", CAPABILITY_HINT)),
    ({"min_compute_capability": "1000.0"}, BadRequirements, ("= '1000.0'", "0 to 999")),
    ({"min_compute_capability": "8.1000"}, BadRequirements, ("= '8.1000'", "0 to 999")),
    (
        {"min_compute_capability": "\u0668.0"},
        BadRequirements,
        ("min_compute_capability", "0 to 999"),
    ),
    ({"min_compute_capability": 8}, BadRequirements, ("= 8 is", CAPABILITY_HINT)),
    ({"min_compute_capability": 8.0}, BadRequirements, ("= 8.0 is", CAPABILITY_HINT)),
    ({"min_compute_capability": [8]}, BadRequirements, ("= [8]", CAPABILITY_HINT)),
    ({"min_compute_capability": [8, 0, 0]}, BadRequirements, ("= [8, 0, 0]", CAPABILITY_HINT)),
    ({"min_compute_capability": [8, -1]}, BadRequirements, ("= [8, -1]", CAPABILITY_HINT)),
    ({"min_compute_capability": (1000, 0)}, BadRequirements, ("= (1000, 0)", "0 to 999")),
    ({"min_compute_capability": ["8", "0"]}, BadRequirements, ("= ['8', '0']", CAPABILITY_HINT)),
    ({"min_compute_capability": [True, 0]}, BadRequirements, ("= [True, 0]", CAPABILITY_HINT)),
    ({"min_compute_capability": [8.5, 0]}, BadRequirements, ("= [8.5, 0]", CAPABILITY_HINT)),
    ({"min_compute_capability": {"major": 8}}, BadRequirements, ("{'major': 8}", CAPABILITY_HINT)),
    # dtype: fp32, fp16, bf16 (auto/None: no constraint); anything else as the worker says it
    (
        {"dtype": "fp8"},
        UnsupportedDtype,
        ("dtype 'fp8' is not a precision", "fp32, fp16, bf16 or auto"),
    ),
    ({"dtype": "FP16"}, UnsupportedDtype, ("dtype 'FP16'", "fp32, fp16, bf16 or auto")),
    ({"dtype": "float16"}, UnsupportedDtype, ("dtype 'float16'", "fp32, fp16, bf16 or auto")),
    ({"dtype": 16}, UnsupportedDtype, ("dtype 16 is", "fp32, fp16, bf16 or auto")),
    ({"dtype": True}, UnsupportedDtype, ("dtype True is", "fp32, fp16, bf16 or auto")),
    ({"dtype": ["fp16"]}, UnsupportedDtype, ("dtype ['fp16']", "fp32, fp16, bf16 or auto")),
    ({"dtype": {"fp16": 1}}, UnsupportedDtype, ("dtype {'fp16': 1}", "fp32, fp16, bf16 or auto")),
    # unknown keys: named, with the valid ones
    (
        {"gpu": True},
        BadRequirements,
        ("unknown requirement 'gpu'", VALID_KEYS, "min_free_memory_mb ("),
    ),
    ({"Device": "cuda"}, BadRequirements, ("unknown requirement 'Device'", VALID_KEYS)),
    ({1: 2}, BadRequirements, ("unknown requirement 1 ", VALID_KEYS)),
    ({"a": 1, "b": 2, "device": "cuda"}, BadRequirements, ("'a', 'b'", VALID_KEYS)),
    ({f"k{i}": i for i in range(7)}, BadRequirements, ("and 2 more", VALID_KEYS)),
    ({"x" * 500: 1}, BadRequirements, ("characters, cut", VALID_KEYS)),
    # set by the client from the model's spec, never by callers
    (
        {"model": "mlp"},
        BadRequirements,
        ("requires['model'] cannot be set by a caller", "min_free_memory_mb"),
    ),
    (
        {"model_memory_mb": 0},
        BadRequirements,
        ("requires['model_memory_mb'] cannot be set", "model's spec"),
    ),
    # not a mapping at all
    ("cuda", BadRequirements, ("requires header is 'cuda' (str), not a mapping", VALID_KEYS)),
    (["device", "cuda"], BadRequirements, ("['device', 'cuda'] (list), not a mapping", VALID_KEYS)),
    (("device", "cuda"), BadRequirements, ("(tuple), not a mapping", "{'device': 'cuda'")),
    (8000, BadRequirements, ("8000 (int), not a mapping", VALID_KEYS)),
    (True, BadRequirements, ("True (bool), not a mapping", VALID_KEYS)),
    (0, BadRequirements, ("0 (int), not a mapping", VALID_KEYS)),
    ("", BadRequirements, ("'' (str), not a mapping", VALID_KEYS)),
    ([], BadRequirements, ("[] (list), not a mapping", VALID_KEYS)),
    ("c" * 300, BadRequirements, ("characters, cut", "(str), not a mapping")),
]


@pytest.mark.parametrize(
    ("requires", "error", "fragments"), BAD, ids=[repr(b[0])[:60] for b in BAD]
)
def test_bad_requirements_are_refused_with_a_typed_error_that_says_what_to_write(
    requires: object, error: type[Exception], fragments: tuple[str, ...]
) -> None:
    for parse in (merged, TaskRequirements.from_mapping):
        with pytest.raises(error) as caught:
            parse(requires)
        assert type(caught.value) is error  # exactly this class, not a cousin
        assert isinstance(caught.value, RequestError)  # never retried, never ConfigurationError
        message = str(caught.value)
        for fragment in fragments:
            assert fragment in message, (fragment, message)
        assert len(message) < 700  # a huge value is echoed cut short


def test_the_router_refuses_a_bad_header_before_choosing_a_worker() -> None:
    cpu = WorkerCapabilities(
        name="cpu0@h",
        queue="cpu.direct.cpu0",
        device_kind="cpu",
        device_name="cpu",
        device_index=None,
        total_memory_mb=4000,
        free_memory_mb=4000,
        compute_capability=None,
        dtypes=("fp32", "bf16"),
    )

    def reqs(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> TaskRequirements:
        return BASE

    router = CapabilityRouter(lambda: {cpu.name: cpu}, reqs)
    for requires, error, fragments in BAD:
        with pytest.raises(error) as caught:
            router("tasks.infer", ("cnn",), {}, {"headers": {"requires": requires}})
        assert fragments[0] in str(caught.value)
    assert len(router.stats.decision_us) == 0  # refused before any decision began
    no_requirements: list[dict[str, Any]] = [{"requires": None}, {"requires": {}}, {}]
    for headers in no_requirements:
        assert router("tasks.infer", ("cnn",), {}, {"headers": headers}) == {"queue": cpu.queue}
    assert router.stats.decisions == 3


def test_an_unknown_precision_is_the_workers_error_on_every_path() -> None:
    expected = str(unknown_dtype("fp8"))
    for make in (
        lambda: TaskRequirements(dtype="fp8"),
        lambda: TaskRequirements.from_mapping({"dtype": "fp8"}),
        lambda: BASE.merged({"dtype": "fp8"}),
    ):
        with pytest.raises(UnsupportedDtype) as caught:
            make()
        assert str(caught.value) == expected
        assert not isinstance(caught.value, ConfigurationError)


def test_the_constructor_keeps_configuration_errors_for_code() -> None:
    with pytest.raises(ConfigurationError, match="device 'tpu'"):
        TaskRequirements(device="tpu")
    with pytest.raises(ConfigurationError, match=">= 0"):
        TaskRequirements(model_memory_mb=-1)


def test_every_refusal_is_a_project_error() -> None:
    for requires, _, _ in BAD:
        with pytest.raises(InferenceError):
            merged(requires)
