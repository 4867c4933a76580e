"""Large inputs by reference (claim check): the blob in Redis, the reference in the message.

An input whose raw tensor bytes (``array.nbytes``, whatever the serializer)
are over ``INFER_CLAIM_CHECK_BYTES`` is stored in Redis under
``infer:blob:<uuid4 hex>`` with a TTL of ``INFER_CLAIM_CHECK_TTL_S``, and the
message carries its **reference** instead of the tensor::

    {"ref": "infer:blob:9f0c...", "nbytes": 1048645, "sha256": "3a7b..."}

The marker is the key ``ref``: a tensor envelope has exactly the keys
``dtype``, ``shape``, ``data``, so a dict with ``ref`` is a reference and
never a tensor (:func:`is_reference`).  ``nbytes`` and ``sha256`` are the
length and SHA-256 of the whole stored blob.  A reference must name a key
under ``infer:blob:``, so a message can never make a worker read or delete
any other key.

A blob is never pickled.  It is::

    b"infer-blob/1\\n"  4-byte big-endian header length  JSON {"dtype", "shape"}  raw bytes

the raw bytes little-endian, as in an envelope; the worker decodes it with
:func:`tasks.wire.codec.decode`, so a blob gets the same dtype, shape, byte
count and size checks as an inline envelope.

The client (:func:`writer_for`, :class:`BlobWriter`, :func:`put`) writes
every blob of one call in one pipeline before publishing.  The worker
(:func:`fetch_many`: one pipeline for many references, each checked on its
own) refuses a missing blob with :class:`~models.errors.InputExpired` and a
wrong length or hash with :class:`~models.errors.MalformedPayload`, and
deletes the blobs (:func:`delete_many`) once the outcome is stored.  Blobs
live in the result backend's Redis, or in ``INFER_BLOB_URL`` when set
(:func:`blob_client`); without a Redis (the embedded broker's file backend)
claim checks are off and inputs travel inline, up to
``INFER_MAX_PAYLOAD_BYTES``.  ``INFER_CLAIM_CHECK_BYTES=0`` turns them off too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import struct
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from celery import Celery
from celery.backends.redis import RedisBackend
from kombu.utils.url import maybe_sanitize_url

from models.errors import ConfigurationError, InputExpired, MalformedPayload, RequestError, echo
from models.validation import check_size
from tasks.settings import Settings
from tasks.wire.backend import reconnect_retry
from tasks.wire.codec import NO_LIMIT, decode, encode, to_array

__all__ = [
    "HEADER_LIMIT",
    "KEY_PREFIX",
    "MAGIC",
    "REFERENCE_KEYS",
    "BlobWriter",
    "blob_client",
    "checked_reference",
    "delete_many",
    "fetch",
    "fetch_many",
    "is_reference",
    "over_threshold",
    "pack",
    "put",
    "release",
    "resolve",
    "unpack",
    "writer_for",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "infer:blob:"
MAGIC = b"infer-blob/1\n"
HEADER_LIMIT = 4096  # the JSON header's largest length, bytes
REFERENCE_KEYS = frozenset({"ref", "nbytes", "sha256"})
_LENGTH = struct.Struct(">I")
_PREFIX_MAX = len(MAGIC) + _LENGTH.size + HEADER_LIMIT  # a blob's most bytes before its data
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(re.escape(KEY_PREFIX) + r"[0-9a-f]{32}")


def over_threshold(nbytes: int, threshold: int) -> bool:
    """Whether an input of ``nbytes`` raw bytes goes by reference; ``threshold`` 0 means never."""
    return threshold > 0 and nbytes > threshold


def is_reference(obj: object) -> bool:
    """Whether ``obj`` is a claim-check reference (a dict with ``ref``), not a tensor."""
    return isinstance(obj, dict) and "ref" in obj


def pack(value: Any) -> bytes:
    """The blob for ``value`` (an array, a torch tensor or an envelope): header, then raw bytes."""
    array = to_array(value)
    envelope = encode(decode(value, NO_LIMIT) if array is None else array, binary=True)
    header = json.dumps({"dtype": envelope["dtype"], "shape": envelope["shape"]}).encode()
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, envelope["data"]))


def unpack(blob: bytes, max_bytes: int = NO_LIMIT) -> np.ndarray:
    """The array in ``blob``; :class:`MalformedPayload` (or the codec's error) if it is not one."""
    start = len(MAGIC) + _LENGTH.size
    if not blob.startswith(MAGIC) or len(blob) < start:
        raise MalformedPayload(
            f"input blob does not start with {MAGIC!r}: it was not written by a client of this "
            "project; submit the input with infer.apply_async, infer.map or infer_many"
        )
    (size,) = _LENGTH.unpack_from(blob, len(MAGIC))
    if size > HEADER_LIMIT or start + size > len(blob):
        raise MalformedPayload(
            f"input blob header of {size} bytes does not fit the blob ({len(blob)} bytes)"
        )
    try:
        header = json.loads(blob[start : start + size])
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedPayload(f"input blob header is not JSON: {e}") from e
    if not isinstance(header, dict) or set(header) != {"dtype", "shape"}:
        raise MalformedPayload(
            f"input blob header must have exactly the keys dtype, shape; got {echo(header)}"
        )
    data = memoryview(blob)[start + size :]
    return decode({"dtype": header["dtype"], "shape": header["shape"], "data": data}, max_bytes)


class BlobWriter:
    """Blobs for one call: :meth:`add` returns each reference at once, :meth:`write` stores all.

    ``write`` is one pipeline (``SET key blob EX ttl_s`` per blob), and no
    round trip when nothing was added.  ``threshold`` is what :meth:`wants`
    compares against (``INFER_CLAIM_CHECK_BYTES``).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, threshold: int = 0) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.threshold = threshold
        self.pending: list[tuple[str, bytes]] = []

    def wants(self, nbytes: int) -> bool:
        """Whether an input of ``nbytes`` raw bytes goes by reference."""
        return over_threshold(nbytes, self.threshold)

    def add(self, value: Any) -> dict[str, Any]:
        """Pack ``value`` (an array, a tensor or an envelope) for :meth:`write`; its reference."""
        blob = pack(value)
        key = f"{KEY_PREFIX}{uuid.uuid4().hex}"
        self.pending.append((key, blob))
        return {"ref": key, "nbytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    def write(self) -> None:
        """Store every added blob with its TTL, in one pipeline."""
        if not self.pending:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, blob in self.pending:
            pipe.set(key, blob, ex=self.ttl_s)
        pipe.execute()
        self.pending.clear()

    def __len__(self) -> int:
        return len(self.pending)


def put(client: redis.Redis, value: Any, ttl_s: int) -> dict[str, Any]:
    """Store ``value`` (an array, a tensor or an envelope) for ``ttl_s`` seconds; its reference."""
    writer = BlobWriter(client, ttl_s)
    ref = writer.add(value)
    writer.write()
    return ref


def checked_reference(ref: object) -> tuple[str, int, str]:
    """``(key, nbytes, sha256)`` of a well-formed reference, else :class:`MalformedPayload`."""
    if not isinstance(ref, dict) or set(ref) != REFERENCE_KEYS:
        raise MalformedPayload(
            "a claim-check reference has exactly the keys nbytes, ref, sha256; got "
            f"{echo(sorted(map(str, ref)) if isinstance(ref, dict) else ref)}"
        )
    key, nbytes, digest = ref["ref"], ref["nbytes"], ref["sha256"]
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise MalformedPayload(
            f"claim-check reference {echo(key)} is not a key {KEY_PREFIX}<32 hex digits>"
        )
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise MalformedPayload(f"claim-check nbytes {echo(nbytes)} is not a byte count")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise MalformedPayload(f"claim-check sha256 {echo(digest)} is not 64 lowercase hex digits")
    return key, nbytes, digest


def fetch_many(
    client: redis.Redis, refs: Sequence[object], *, max_bytes: int = NO_LIMIT
) -> list[np.ndarray | RequestError]:
    """The array of each reference, in order, or the :class:`RequestError` for that one alone.

    One pipeline GETs every well-formed reference.  Per item: a malformed
    reference or a wrong length or hash is :class:`MalformedPayload`, a
    missing blob :class:`InputExpired`, a blob whose tensor is over
    ``max_bytes`` :class:`PayloadTooLarge` (not fetched when its ``nbytes``
    already says so); a blob that does not decode, the codec's error.  A
    Redis that cannot be reached raises (for the whole call).
    """
    results: list[np.ndarray | RequestError | None] = [None] * len(refs)
    wanted: list[tuple[int, str, int, str]] = []
    for index, ref in enumerate(refs):
        try:
            key, nbytes, digest = checked_reference(ref)
            check_size(nbytes - _PREFIX_MAX, max_bytes, estimated=True)
        except RequestError as e:
            results[index] = e
            continue
        wanted.append((index, key, nbytes, digest))
    if wanted:
        pipe = client.pipeline(transaction=False)
        for _, key, _, _ in wanted:
            pipe.get(key)
        blobs = pipe.execute(raise_on_error=False)
        for (index, key, nbytes, digest), blob in zip(wanted, blobs, strict=True):
            try:
                results[index] = _checked_blob(key, blob, nbytes, digest, max_bytes)
            except RequestError as e:
                results[index] = e
    return [r for r in results if r is not None]


def _checked_blob(key: str, blob: object, nbytes: int, digest: str, max_bytes: int) -> np.ndarray:
    if blob is None:
        raise InputExpired(
            f"input blob {key} is gone from Redis: it expired before a worker took the request "
            "(INFER_CLAIM_CHECK_TTL_S on the client), or the request already ran and its blob was "
            "deleted: resubmit the request, and raise INFER_CLAIM_CHECK_TTL_S if requests wait "
            "in the queue that long"
        )
    if not isinstance(blob, bytes):
        raise MalformedPayload(f"{key} is not an input blob ({type(blob).__name__}: {blob})")
    if len(blob) != nbytes:
        raise MalformedPayload(
            f"input blob {key} has {len(blob)} bytes but its reference says {nbytes}: it changed "
            "after it was stored; resubmit the request"
        )
    if hashlib.sha256(blob).hexdigest() != digest:
        raise MalformedPayload(
            f"input blob {key} does not match the sha256 of its reference: it changed after it "
            "was stored; resubmit the request"
        )
    return unpack(blob, max_bytes)


def fetch(client: redis.Redis, ref: object, *, max_bytes: int = NO_LIMIT) -> np.ndarray:
    """The array of one reference; raises its :class:`RequestError` (see :func:`fetch_many`)."""
    (item,) = fetch_many(client, [ref], max_bytes=max_bytes)
    if isinstance(item, RequestError):
        raise item
    return item


def delete_many(client: redis.Redis, refs: Sequence[object]) -> int:
    """Delete the blobs of ``refs`` (one UNLINK, one round trip); how many existed.

    Only keys under ``infer:blob:`` are deleted; a malformed reference is skipped.
    """
    keys = []
    for ref in refs:
        try:
            keys.append(checked_reference(ref)[0])
        except MalformedPayload:
            continue
    return int(client.unlink(*keys)) if keys else 0


@functools.lru_cache(maxsize=4)
def _url_client(url: str, reconnect_s: float) -> redis.Redis:
    """One client (one connection pool) per ``INFER_BLOB_URL`` in this process."""
    return redis.Redis.from_url(url, retry=reconnect_retry(reconnect_s))


def blob_client(app: Celery) -> redis.Redis:
    """The Redis that holds ``app``'s blobs: ``INFER_BLOB_URL``, else the result backend's.

    Raises :class:`ConfigurationError` when neither is Redis (the embedded
    broker's file backend): claim checks are then off.
    """
    settings: Settings = app.infer_settings
    if settings.blob_url:
        return _url_client(settings.blob_url, settings.backend_reconnect_s)
    backend = app.backend
    if isinstance(backend, RedisBackend):
        client: redis.Redis = backend.client
        return client
    raise ConfigurationError(
        f"claim checks need Redis, and the result backend is {maybe_sanitize_url(settings.backend)}: "
        "set INFER_BLOB_URL=redis://host:6379/0 (or a redis:// CELERY_RESULT_BACKEND), or "
        "INFER_CLAIM_CHECK_BYTES=0 to send every input inline"
    )


def writer_for(app: Celery) -> BlobWriter | None:
    """A :class:`BlobWriter` for one call, or None when claim checks are off.

    Off: ``INFER_CLAIM_CHECK_BYTES=0``, or no Redis to hold blobs (inputs then
    travel inline, refused over ``INFER_MAX_PAYLOAD_BYTES`` as ever).
    """
    settings: Settings = app.infer_settings
    if settings.claim_check_bytes == 0:
        return None
    try:
        client = blob_client(app)
    except ConfigurationError:
        return None
    return BlobWriter(client, settings.claim_check_ttl_s, settings.claim_check_bytes)


def resolve(app: Celery, inputs: Any, max_bytes: int) -> Any:
    """In the worker: the array behind ``inputs`` if it is a reference, else ``inputs`` as is."""
    if not is_reference(inputs):
        return inputs
    return fetch(blob_client(app), inputs, max_bytes=max_bytes)


def release(app: Celery, inputs: Any) -> None:
    """In the worker, once the outcome is stored: delete the blob if ``inputs`` is a reference.

    A Redis error is logged, not raised: the blob then expires with its TTL.
    """
    if not is_reference(inputs):
        return
    try:
        delete_many(blob_client(app), [inputs])
    except (redis.RedisError, ConfigurationError) as e:
        log.warning("input blob %s not deleted (%s): it expires with its TTL", inputs.get("ref"), e)
