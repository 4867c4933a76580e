"""``celery -A tasks control load_model / unload_model`` against a real worker, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from routing.queues import direct_queue
from tests.integration.conftest import WorkerFactory

pytestmark = pytest.mark.integration


def _celery(*args: str, env: dict[str, str]) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", *args, "--json", "-t", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    replies = json.loads(out.stdout)
    if isinstance(replies, list):  # control replies come as [{host: reply}, ...]
        return {host: reply for item in replies for host, reply in item.items()}
    return replies


def _models(host: str, env: dict[str, str]) -> list[str]:
    record = _celery("inspect", "capabilities", "-d", host, env=env)[host]
    return list(record.get("models_loaded", []))


def _wait_models(host: str, env: dict[str, str], want: bool, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        models = _models(host, env)
        if ("mlp@1" in models) == want or time.monotonic() > deadline:
            return models
        time.sleep(0.5)


def test_load_and_unload_a_model_from_the_cli(worker_factory: WorkerFactory, run_id: str) -> None:
    namespace = f"ctl-{run_id}"
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace)
    name, shared = f"ctl-{run_id}", f"ctl-{run_id}"
    worker = worker_factory(name, [direct_queue(shared, name), shared], env=env).wait_ready()
    host = worker.hostname
    assert "mlp@1" not in _wait_models(host, env, want=False)

    reply = _celery("control", "load_model", "mlp", "fp32", "-d", host, env=env)
    assert "queued" in reply[host]["ok"] and reply[host]["task_id"]
    assert "mlp@1" in _wait_models(host, env, want=True)  # models_loaded names the version

    reply = _celery("control", "unload_model", "mlp", "-d", host, env=env)
    assert "queued" in reply[host]["ok"]
    assert "mlp@1" not in _wait_models(host, env, want=False)

    # bad requests get an error reply and change nothing
    reply = _celery("control", "load_model", "resnet9000", "-d", host, env=env)
    assert "unknown model" in reply[host]["error"].lower()
    reply = _celery("control", "load_model", "mlp", "fp8", "-d", host, env=env)
    assert "fp8" in reply[host]["error"]
    reply = _celery("control", "load_model", "mlp@7", "-d", host, env=env)
    assert "no version 7" in reply[host]["error"]
    reply = _celery("control", "set_default_version", "mlp", "3", "-d", host, env=env)
    assert "no version 3" in reply[host]["error"]
    assert worker.alive()


def test_route_command_prints_the_decision_ladder(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    namespace = f"rte-{run_id}"
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace)
    shared = f"rte-{run_id}"
    names = {"fp32": f"rte32-{run_id}", "bf16": f"rte16-{run_id}"}
    workers = {
        kind: worker_factory(
            name,
            [direct_queue(shared, name), shared],
            env={**env, "INFER_DTYPES": "fp32" if kind == "fp32" else "fp32,bf16"},
        )
        for kind, name in names.items()
    }
    for w in workers.values():
        w.wait_ready()
    command = [sys.executable, "-m", "celery", "-A", "tasks", "route", "--model", "cnn"]
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            [*command, "--dtype", "bf16"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        if "workers (2 live)" in out.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lines = out.stdout.splitlines()
    bf16, fp32 = workers["bf16"].hostname, workers["fp32"].hostname
    assert any(line.strip().startswith(f"- {fp32}: cannot serve: lacks dtype") for line in lines)
    assert any(line.strip().startswith(f"- {bf16}: capable") for line in lines)
    assert lines[-1] == f"3. decision: {bf16} -> queue {workers['bf16'].own_queue}"
    # a request nobody can serve is explained, and nothing is published
    out = subprocess.run(
        [*command, "--device", "cuda"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "decision: NoCapableWorker" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "route", "--model", "resnet9000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "unknown model" in bad.stderr.lower()
