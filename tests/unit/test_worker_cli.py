from __future__ import annotations

import subprocess
import sys

from tasks.worker.command import worker_argv


def test_gpu_worker_consumes_own_and_class_queue_with_one_prefork_child() -> None:
    argv = worker_argv("gpu0", "cuda:0")
    assert argv[:4] == ["celery", "-A", "tasks", "worker"]
    assert argv[argv.index("-n") + 1] == "gpu0@%h"
    assert argv[argv.index("-Q") + 1] == "gpu.direct.gpu0,gpu"
    assert argv[argv.index("-P") + 1] == "prefork" and argv[argv.index("-c") + 1] == "1"


def test_cpu_worker_and_explicit_queues() -> None:
    assert worker_argv("cpu1", "cpu")[7] == "cpu.direct.cpu1,cpu"
    assert worker_argv("cpu", "cpu")[7] == "cpu.direct.cpu,cpu"
    assert worker_argv("x", "cpu", queues=["q1", "q2"])[7] == "q1,q2"


def test_module_prints_the_celery_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasks.worker", "--name", "gpu1", "--device", "cuda:1", "--print"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == " ".join(worker_argv("gpu1", "cuda:1"))
