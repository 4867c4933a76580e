"""Serve your own model, exactly as docs/serve-your-own-model.md tells a newcomer to.

The user's module, its ``model.toml`` and the script that saves its weights
are read from the page's code blocks, written into ``tmp_path`` and run as
they are; a real ``celery worker`` subprocess serves the repository
(``INFER_MODEL_REPOSITORY``, the module on its ``PYTHONPATH``).  This test
process is the thin client of the page: it has no model repository and cannot
import the module, so it learns the model's spec from what the worker
advertises, and the capability router (not a pinned queue) picks the worker.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from celery.signals import before_task_publish
from safetensors.torch import load_file

from models.errors import ModelLoadError, ShapeMismatch, UnknownModel
from routing.queues import direct_queue
from routing.router import CapabilityRouter
from tasks import app, infer
from tasks.client.results import outputs
from tasks.client.routes import build_router, wait_for_workers
from tasks.ops.launcher import WorkerProcess
from tasks.wire.catalog import local_catalog
from tasks.wire.topology import remove_topology
from tests.integration.conftest import queue_depth

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve-your-own-model.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def doc_file(path: str) -> str:
    """The page's code block whose first line is ``# <path>`` (how the page names its files)."""
    for _, body in BLOCK.findall(DOC.read_text()):
        if body.startswith(f"# {path}\n"):
            return str(body)
    raise AssertionError(f"{DOC.name} has no code block starting with '# {path}'")


@dataclass
class UserSetup:
    root: Path  # the user's folder: acme_models/, model-repo/, save_weights.py
    worker: WorkerProcess
    namespace: str

    @property
    def queues(self) -> list[str]:
        return self.worker.consumed_queues

    def reference(self, x: np.ndarray, version: int = 1) -> np.ndarray:
        """The user's module with the saved weights, run in this process."""
        loaded = importlib.util.spec_from_file_location(
            f"user_tiny_{version}", self.root / "acme_models" / "tiny.py"
        )
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        model = module.build(features=8, classes=3)
        weights = self.root / "model-repo" / "tiny" / str(version) / "model.safetensors"
        model.load_state_dict(load_file(str(weights)), strict=True)
        with torch.inference_mode():
            return np.asarray(model.eval()(torch.from_numpy(x).reshape(-1, 8)).numpy())

    def received(self) -> int:
        """How many ``tasks.infer`` messages the worker has taken off its queues."""
        return sum("Task tasks.infer[" in line and "received" in line for line in self.lines())

    def lines(self) -> list[str]:
        return self.worker.logfile.read_text(errors="replace").splitlines()


def write_user_files(root: Path) -> None:
    """Steps 1-3 of the page: the module, model.toml and the weights, as the page writes them."""
    for path in ("acme_models/tiny.py", "model-repo/tiny/model.toml", "save_weights.py"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(doc_file(path))
    (root / "acme_models" / "__init__.py").write_text("")
    saved = subprocess.run(
        [sys.executable, "save_weights.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == "wrote model-repo/tiny/1/model.safetensors"
    # A second model whose builder the worker cannot import: a typed error, not a bare one.
    ghost = root / "model-repo" / "ghost"
    (ghost / "1").mkdir(parents=True)
    (ghost / "model.toml").write_text(
        doc_file("model-repo/tiny/model.toml").replace("acme_models.tiny:", "acme_models.gone:")
    )
    (ghost / "1" / "model.safetensors").write_bytes(
        (root / "model-repo" / "tiny" / "1" / "model.safetensors").read_bytes()
    )
    # A third whose model.toml is invalid: not served, and the others are.
    broken = root / "model-repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "model.toml").write_text(
        doc_file("model-repo/tiny/model.toml").replace("shape = [8]", "shape = [8, 0]")
    )


@pytest.fixture(scope="module")
def user(run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserSetup]:
    root = tmp_path_factory.mktemp("user-model")
    write_user_files(root)
    name, fleet, namespace = f"usr-{run_id}", f"usr-{run_id}", f"usr-{run_id}"
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    worker = WorkerProcess(
        name,
        "cpu",
        logdir=root,
        queues=[direct_queue(fleet, name), fleet],
        env=dict(
            os.environ,
            INFER_REGISTRY_NAMESPACE=namespace,
            INFER_MODEL_REPOSITORY=str(root / "model-repo"),
            PYTHONPATH=path,
        ),
    )
    setup = UserSetup(root, worker, namespace)
    try:
        worker.start().wait_ready()
        yield setup
    finally:
        worker.stop()
        stray = worker.session_pids()
        depths = {q: queue_depth(q) for q in setup.queues}
        remove_topology(app, setup.queues)
    assert stray == [], f"stray worker processes: {stray}"
    assert depths == {q: 0 for q in setup.queues}, f"messages left on queues: {depths}"


@pytest.fixture
def router(user: UserSetup, monkeypatch: pytest.MonkeyPatch) -> Iterator[CapabilityRouter]:
    """This client's router over the worker's registry namespace (as test_routing.py builds it)."""
    r = build_router(replace(app.infer_settings, registry_namespace=user.namespace))
    monkeypatch.setattr(app.route, "router", r)  # infer.apply_async routes and checks with it
    wait_for_workers(app.router, {user.worker.hostname})
    yield r
    r.registry.close()


@pytest.fixture
def published() -> Iterator[list[Any]]:
    """The ids of the tasks this process publishes meanwhile (Celery's own signal, no patch)."""
    seen: list[Any] = []

    def record(headers: Any = None, **_: Any) -> None:
        seen.append((headers or {}).get("id"))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def test_this_client_has_no_model_repository() -> None:
    """The thin client of the page: nothing of the user's model is known here before a worker says so."""
    assert app.infer_settings.model_repository == ()
    assert "tiny" not in local_catalog(app.infer_settings)
    assert importlib.util.find_spec("acme_models") is None


def test_a_user_model_is_served_through_the_router(
    user: UserSetup, router: CapabilityRouter
) -> None:
    x = np.random.default_rng(0).random((4, 8), dtype=np.float32)  # the page's batch
    one = np.random.default_rng(1).random(8, dtype=np.float32)  # and one sample
    decisions = router.stats.decisions
    batch = infer.apply_async(("tiny", x))  # stock Celery, no queue: routed
    single = infer.apply_async(("tiny@1", one))  # pinned to version 1
    reply = batch.get(timeout=30)
    assert reply["model"] == "tiny" and reply["version"] == 1
    assert reply["worker"] == user.worker.hostname and reply["batch_size"] == 4
    assert np.allclose(outputs(reply), user.reference(x), atol=1e-5)
    pinned = single.get(timeout=30)
    assert (pinned["model"], pinned["version"], pinned["batch_size"]) == ("tiny", 1, 1)
    assert np.allclose(outputs(pinned), user.reference(one), atol=1e-5)
    assert router.stats.decisions == decisions + 2  # the router chose, no queue was pinned
    # The spec came from the worker's advertisement: what the page's model.toml says.
    spec = app.route.spec("tiny")
    assert (spec.sample_shape, spec.output_shape, spec.weights) == ((8,), (3,), None)
    assert spec.builder == "acme_models.tiny:build" and spec.builder_kwargs == {
        "features": 8,
        "classes": 3,
    }


def test_a_bad_request_is_refused_before_publishing(
    user: UserSetup, router: CapabilityRouter, published: list[Any]
) -> None:
    received = user.received()
    with pytest.raises(ShapeMismatch, match=r"model 'tiny' takes one sample of shape \[8\]"):
        infer.apply_async(("tiny", np.zeros((2, 5), np.float32)))
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        infer.apply_async(("nope", np.zeros(8, np.float32)))
    assert published == []
    assert {q: queue_depth(q) for q in user.queues} == {q: 0 for q in user.queues}
    # Had either been published, the worker would take it before this one, from the same queue.
    good = infer.apply_async(("tiny", np.zeros(8, np.float32)))
    assert good.get(timeout=30)["model"] == "tiny"
    assert published == [good.id]
    assert user.received() == received + 1


def test_a_model_with_an_invalid_model_toml_is_not_served_and_the_others_are(
    user: UserSetup, router: CapabilityRouter
) -> None:
    log = user.worker.logfile.read_text(errors="replace")
    assert "model not served:" in log and "broken/model.toml: inputs.shape:" in log
    with pytest.raises(UnknownModel, match="unknown model 'broken'"):
        infer.apply_async(("broken", np.zeros(8, np.float32)))
    assert "broken" not in router.registry.workers()[user.worker.hostname].models
    assert infer.apply_async(("tiny", np.zeros(8, np.float32))).get(timeout=30)["model"] == "tiny"


def test_a_builder_the_worker_cannot_import_is_a_typed_error(
    user: UserSetup, router: CapabilityRouter
) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot import the builder 'acme_models.gone:build'"):
        infer.apply_async(("ghost", np.zeros(8, np.float32))).get(timeout=30)
    assert user.worker.alive()
    assert infer.apply_async(("tiny", np.zeros(8, np.float32))).get(timeout=30)["version"] == 1
