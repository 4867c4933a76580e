"""Text inputs: the checks both ends make, and the length buckets batching groups by.

Pure Python (no tokenizer, no torch): the client checks a text request before
publishing (:func:`check_text`), and the worker's main process groups text
requests by an estimated padded-length bucket (:func:`estimated_bucket`)
without tokenizing.  The pool child tokenizes with the model's own tokenizer
(:mod:`models.hf`), refuses a text over ``max_tokens``
(:class:`~models.errors.TextTooLong`) unless the model truncates, and groups
each forward pass by the real bucket (:func:`token_bucket`), so one long
text does not pad a batch of short ones.
"""

from __future__ import annotations

from typing import Any

from models.errors import (
    EmptyText,
    InvalidUtf8,
    NonTextInput,
    PayloadTooLarge,
    TooManyTexts,
    echo,
)
from models.spec import ModelSpec

__all__ = ["MIN_BUCKET", "check_text", "estimated_bucket", "text_bytes", "token_bucket"]

MIN_BUCKET = 16  # the shortest padded length: shorter texts share one bucket
CHARS_PER_TOKEN = 4  # the main process's estimate (English WordPiece/BPE: about 4 bytes a token)


def token_bucket(tokens: int, max_tokens: int) -> int:
    """The padded length a text of ``tokens`` tokens is batched at: a power of two, capped."""
    bucket = MIN_BUCKET
    while bucket < tokens:
        bucket *= 2
    return min(bucket, max(max_tokens, MIN_BUCKET))


def estimated_bucket(texts: Any, max_tokens: int) -> int:
    """:func:`token_bucket` of the longest text, estimated from its length (no tokenizer)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list | tuple) or not texts:
        return MIN_BUCKET
    longest = max((len(t) for t in texts if isinstance(t, str | bytes)), default=0)
    return token_bucket(longest // CHARS_PER_TOKEN + 2, max_tokens)


def text_bytes(texts: Any) -> int:
    """UTF-8 size of a text request, for the payload limit (0 when it is not text)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list | tuple):
        return 0
    return sum(
        len(t) if isinstance(t, bytes) else len(t) * 4 for t in texts if isinstance(t, str | bytes)
    )


def check_text(spec: ModelSpec, inputs: Any, max_bytes: int) -> list[str]:
    """``inputs`` (a string or a list of strings) as a list of checked strings.

    Raises :class:`NonTextInput`, :class:`EmptyText`, :class:`InvalidUtf8`,
    :class:`TooManyTexts` or :class:`PayloadTooLarge`.  Token length is the
    worker's check (it has the tokenizer).
    """
    assert spec.text is not None
    limits = spec.text
    single = isinstance(inputs, str | bytes)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list | tuple):
        raise NonTextInput(
            f"model {spec.name!r} takes a string or a list of strings, got "
            f"{type(inputs).__name__} {echo(inputs)}"
        )
    if not texts:
        raise EmptyText(f"model {spec.name!r} got an empty list: send at least one string")
    if len(texts) > limits.max_strings:
        raise TooManyTexts(
            f"model {spec.name!r} takes at most {limits.max_strings} strings per request, got "
            f"{len(texts)}: split them over several requests (infer.map, or infer_many)"
        )
    checked: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        where = "the input" if single else f"inputs[{i}]"
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidUtf8(
                    f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                    "send text as a str, or bytes encoded as UTF-8"
                ) from e
        if not isinstance(text, str):
            raise NonTextInput(
                f"{where} is {type(text).__name__} {echo(text)}, not a string: model "
                f"{spec.name!r} takes a string or a list of strings"
            )
        try:
            size += len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InvalidUtf8(
                f"{where} holds a lone surrogate at character {e.start} ({echo(text[e.start])}), "
                "which is not valid UTF-8: decode your bytes with errors='replace' first"
            ) from e
        if not text.strip():
            raise EmptyText(
                f"{where} is empty or only whitespace: model {spec.name!r} needs some text"
            )
        checked.append(text)
    if size > max_bytes:
        raise PayloadTooLarge(
            f"text input is {size} bytes, over the {max_bytes}-byte limit (INFER_MAX_PAYLOAD_BYTES): "
            "split it over several requests"
        )
    return checked
