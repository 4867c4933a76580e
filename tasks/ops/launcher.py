"""Start and stop real ``celery worker`` subprocesses (demo, tests, benchmarks).

Each worker runs in its own process session, so stopping it (or killing it
with ``kill -9`` in a fault test) reaches the prefork children too and never
leaves a stray process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

from tasks.worker.command import worker_argv

__all__ = ["WorkerProcess", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a worker's metrics, a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """One ``celery -A tasks worker`` bound to ``device``, consuming its own queue.

    ``command`` replaces the ``celery ... worker`` argv (its first word is
    ignored: this interpreter's ``-m celery`` runs it).
    """

    def __init__(
        self,
        name: str,
        device: str = "cpu",
        *,
        logdir: Path,
        env: Mapping[str, str] | None = None,
        queues: list[str] | None = None,
        preload: tuple[str, ...] = (),
        command: list[str] | None = None,
        batching: bool = False,
        python: str = sys.executable,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.device = device
        self.logfile = logdir / f"worker-{name}.log"
        self.queues = queues
        # Another app's worker (the benchmark's vanilla Celery peer) may pass its own argv.
        self.command = command or worker_argv(name, device, queues)
        self.env = dict(os.environ if env is None else env)
        self.env["INFER_DEVICE"] = device
        self.env["INFER_PRELOAD"] = ",".join(preload)
        if batching:
            self.env["INFER_BATCHING"] = "true"
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.python = python  # another environment's interpreter may run a peer worker
        # Runs the worker under another command, which must exec it (``ip netns exec h1``).
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hostname(self) -> str:
        """The node name Celery reports, e.g. ``cpu0@myhost``."""
        return f"{self.name}@{os.uname().nodename}"

    @property
    def consumed_queues(self) -> list[str]:
        """The queues it consumes (its ``-Q`` list)."""
        return self.command[self.command.index("-Q") + 1].split(",")

    @property
    def own_queue(self) -> str:
        """The first queue it consumes: its own (direct) queue."""
        return self.consumed_queues[0]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def start(self) -> WorkerProcess:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.write_text("")
        cmd = [
            *self.prefix,
            self.python,
            "-m",
            "celery",
            *self.command[1:],
            "--logfile",
            str(self.logfile),
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        """Block until the worker logs ``ready.``; raise with its log tail if it dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if any("ready." in line and f"{self.name}@" in line for line in self._lines()):
                return self
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def _lines(self) -> list[str]:
        try:
            return self.logfile.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._lines()[-lines:])

    def session_pids(self) -> list[int]:
        """Every live process in this worker's session (the parent and its pool children)."""
        pids: list[int] = []
        if self.proc is None:
            return pids
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.proc.pid:
                    pids.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return pids

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the worker and its pool children at once, like a lost machine."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM: finish the current task), then SIGKILL if it hangs.

        The SIGTERM goes to the worker's main process only, as ``docker stop``
        or Kubernetes send it: Celery's warm shutdown lets each pool child
        finish its task, acks the message (``task_acks_late``), then ends the
        children.  Sent to the whole session, it killed the children at once
        (Celery gives them SIGTERM's default action): a task whose result was
        already stored, but whose message the main process had not yet acked,
        was counted lost and requeued (``task_reject_on_worker_lost``).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)  # any child that outlived its parent
        return self.proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> WorkerProcess:
        return self.start().wait_ready()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
