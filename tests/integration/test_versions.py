"""Model versions end to end: routing by name@version, and a hot reload under load.

Real RabbitMQ, Redis and worker subprocesses.  The model repositories are
written here (``vmod``: the zoo's MLP builder with weights seeded per
version, so each version's outputs differ); this test process has no
repository of its own, so it checks and routes ``vmod`` from what the
workers advertise.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import save_file

from models.catalog import discover
from models.errors import UnknownModel, UnknownVersion
from models.loader import seeded_state
from models.runner import reference_forward
from routing.queues import direct_queue
from routing.router import CapabilityRouter
from tasks.app import app
from tasks.client.results import outputs
from tasks.client.routes import build_router, wait_for_workers
from tasks.inference import infer
from tests.integration.conftest import WorkerFactory, queue_depth

pytestmark = pytest.mark.integration

TOML = """\
description = "the zoo's MLP, one seed per version"
kind = "torch"
default_version = {default}

[torch]
builder = "models.zoo.mlp:build"

[inputs]
dtype = "float32"
shape = [64]

[outputs]
shape = [10]
"""


def repository(root: Path, versions: tuple[int, ...], default: int) -> Path:
    """A repository holding ``vmod`` at ``versions`` (weights seeded 100 + version)."""
    folder = root / "vmod"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(TOML.format(default=default))
    template = discover([], root / "unused", use_entry_points=True).resolve("mlp")
    for v in versions:
        (folder / str(v)).mkdir()
        state = seeded_state(replace(template, seed=100 + v))
        save_file(state, str(folder / str(v) / "model.safetensors"))
    return root


def expected(repo: Path, ref: str, x: np.ndarray) -> np.ndarray:
    return reference_forward(
        discover([repo], repo / "unused", use_entry_points=False).resolve(ref), x
    )


@pytest.fixture
def router_for(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    built: list[CapabilityRouter] = []

    def make(namespace: str, hosts: set[str]) -> CapabilityRouter:
        r = build_router(replace(app.infer_settings, registry_namespace=namespace))
        monkeypatch.setattr(app.route, "router", r)
        wait_for_workers(r, hosts)
        built.append(r)
        return r

    yield make
    for r in built:
        r.registry.close()


def sample(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(64, dtype=np.float32)


def test_two_workers_with_different_versions_serve_by_version(
    worker_factory: WorkerFactory, run_id: str, tmp_path: Path, router_for: Any
) -> None:
    assert not app.infer_settings.model_repository  # this client has no repository
    namespace, shared = f"ver-{run_id}", f"ver-{run_id}"
    repos = {1: repository(tmp_path / "r1", (1,), 1), 2: repository(tmp_path / "r2", (2,), 2)}
    workers = {
        v: worker_factory(
            f"ver{v}-{run_id}",
            [direct_queue(shared, f"ver{v}-{run_id}"), shared],
            env=dict(
                os.environ, INFER_REGISTRY_NAMESPACE=namespace, INFER_MODEL_REPOSITORY=str(repo)
            ),
        )
        for v, repo in repos.items()
    }
    for w in workers.values():
        w.wait_ready()
    router_for(namespace, {w.hostname for w in workers.values()})

    replies = {v: [infer.apply_async((f"vmod@{v}", sample(i))) for i in range(4)] for v in (1, 2)}
    for v, results in replies.items():
        for i, result in enumerate(results):
            reply = result.get(timeout=60)
            assert (reply["model"], reply["version"]) == ("vmod", v)
            assert reply["worker"] == workers[v].hostname  # routed by version
            assert np.allclose(
                outputs(reply), expected(repos[v], f"vmod@{v}", sample(i)), atol=1e-5
            )
    assert not np.allclose(
        expected(repos[1], "vmod@1", sample(0)), expected(repos[2], "vmod@2", sample(0))
    )

    before = {q: queue_depth(q) for q in (shared, *(w.own_queue for w in workers.values()))}
    with pytest.raises(UnknownVersion, match="versions: 1, 2"):
        infer.apply_async(("vmod@3", sample(0)))
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        infer.apply_async(("nope", sample(0)))
    assert {q: queue_depth(q) for q in before} == before  # refused before publishing


def _control(command: str, host: str, **arguments: Any) -> dict[str, Any]:
    replies = app.control.broadcast(
        command, arguments=arguments, destination=[host], reply=True, timeout=10
    )
    reply = {k: v for item in replies for k, v in item.items()}[host]
    assert "error" not in reply, reply
    return dict(reply)


def test_switching_versions_under_load_loses_nothing(
    worker_factory: WorkerFactory, run_id: str, tmp_path: Path, router_for: Any
) -> None:
    namespace, shared = f"swap-{run_id}", f"swap-{run_id}"
    repo = repository(tmp_path / "repo", (1, 2), default=1)
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace, INFER_MODEL_REPOSITORY=str(repo))
    name = f"swap-{run_id}"
    worker = worker_factory(name, [direct_queue(shared, name), shared], env=env).wait_ready()
    router_for(namespace, {worker.hostname})

    sent: list[tuple[int, Any]] = []
    stop = threading.Event()

    def load() -> None:  # unpinned requests, steadily, while the versions change
        i = 0
        while not stop.is_set() and i < 400:
            sent.append((i, infer.apply_async(("vmod", sample(i)))))
            i += 1
            time.sleep(0.005)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(0.5)
        _control("load_model", worker.hostname, model="vmod@2")  # warms v2 while v1 serves
        deadline = time.monotonic() + 30
        while "vmod@2" not in app.router.registry.workers()[worker.hostname].models_loaded:
            assert time.monotonic() < deadline, "vmod@2 never advertised as loaded"
            time.sleep(0.1)
        _control("set_default_version", worker.hostname, model="vmod", version=2)
        time.sleep(0.5)
        _control("unload_model", worker.hostname, model="vmod@1")
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()

    versions = []
    for i, result in sent:
        reply = result.get(timeout=60)  # 0 lost: every request answered
        v = reply["version"]
        assert np.allclose(outputs(reply), expected(repo, f"vmod@{v}", sample(i)), atol=1e-5)
        versions.append(v)
    assert versions[0] == 1 and versions[-1] == 2, versions
    assert versions == sorted(versions)  # one worker, in order: the switch happens once
    assert len(sent) >= 50

    # The old version still answers when pinned: it loads again on demand.
    reply = infer.apply_async(("vmod@1", sample(0))).get(timeout=60)
    assert reply["version"] == 1
    assert np.allclose(outputs(reply), expected(repo, "vmod@1", sample(0)), atol=1e-5)
