"""The Kubernetes worker's probes and shutdown, run against a real worker.

deploy/kubernetes/ is never applied here (no cluster): tests/unit/test_kubernetes.py
checks it statically.  This test takes the CPU worker's probes from its
manifest and runs them as the kubelet would, against a real ``celery worker``
on RabbitMQ and Redis: the readiness probe's exact command (a shell, with
``POD_NAME`` set) and the liveness probe's HTTP GET.  Then it sends SIGTERM to
the worker's main process only, as Kubernetes signals a container's PID 1, and
checks the warm shutdown: the worker exits within its grace period, withdraws
its record (readiness fails, saying why) and stops serving /metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from routing.queues import direct_queue
from tasks.ops.launcher import free_port
from tests.integration.conftest import WorkerFactory, eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def cpu_worker_container() -> tuple[dict[str, Any], int]:
    """The CPU worker's container and its pod's grace period, from the manifest."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "worker-cpu.yaml").read_text())
    (sts,) = (d for d in docs if d and d["kind"] == "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container, int(spec["terminationGracePeriodSeconds"])


def test_manifest_probes_and_sigterm_against_a_real_worker(
    worker_factory: WorkerFactory, run_id: str
) -> None:
    container, grace = cpu_worker_container()
    pod = f"worker-cpu-{run_id}"  # what $(POD_NAME) is in a pod
    shared = f"k8s-shared-{run_id}"
    port = free_port()
    env = dict(os.environ, INFER_METRICS_PORT=str(port), INFER_METRICS_ADDR="127.0.0.1")
    worker = worker_factory(pod, [direct_queue(shared, pod), shared], env=env).wait_ready()

    readiness = container["readinessProbe"]
    probe_env = dict(
        os.environ, POD_NAME=pod, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )

    def ready() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            readiness["exec"]["command"],
            env=probe_env,
            capture_output=True,
            text=True,
            timeout=readiness["timeoutSeconds"],
            check=False,
        )

    out = eventually(lambda: (r := ready()).returncode == 0 and r, 30, "the readiness probe passes")
    assert out.stdout.startswith(f"{pod}@{os.uname().nodename} ready"), out.stdout

    live = container["livenessProbe"]["httpGet"]
    url = f"http://127.0.0.1:{port}{live['path']}"
    with urllib.request.urlopen(url, timeout=container["livenessProbe"]["timeoutSeconds"]) as r:
        assert r.status == 200 and b"infer_" in r.read()

    # Kubernetes sends SIGTERM to the container's PID 1 only: celery's main process.
    assert worker.proc is not None
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.proc.wait(timeout=grace) == 0
    after = ready()
    assert after.returncode == 1 and "not in the registry" in after.stderr, after.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
