"""A real Flower for the integration tests: ``python -m tasks.ops.flower`` with basic auth."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.ops.launcher import free_port
from tests.integration.conftest import eventually

__all__ = ["HTTP_TIMEOUT", "HTTP_WAIT", "RESULT_WAIT", "Flower", "running_flower"]

HTTP_TIMEOUT = 15.0  # seconds, every request
RESULT_WAIT = 30  # seconds Flower waits for a result (its ?timeout= / "timeout"), below HTTP_WAIT
HTTP_WAIT = RESULT_WAIT + HTTP_TIMEOUT


class Flower:
    def __init__(self, port: int, auth: tuple[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.auth, self.log = auth, log

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        auth: bool = True,
        timeout: float = HTTP_TIMEOUT,
    ) -> tuple[int, str, str]:
        """(status, content type, body text) of one request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return (
                    response.status,
                    response.headers.get("Content-Type", ""),
                    response.read().decode(),
                )
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    def get(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        """(status, body) of a GET."""
        status, _, text = self.call("GET", path, auth=auth)
        return status, text.encode()

    def api(self, path: str) -> Any:
        """The JSON of a GET that must answer 200."""
        status, _, text = self.call("GET", path)
        assert status == 200, (path, status, text[:200])
        return json.loads(text)

    def post(self, endpoint: str, body: Any, timeout: float = HTTP_TIMEOUT) -> tuple[int, str, str]:
        return self.call("POST", f"/api/task/{endpoint}/tasks.infer", body, timeout=timeout)

    def result(self, task_id: str) -> tuple[str, dict[str, Any]]:
        """(body text, parsed) of ``/api/task/result/<id>``, waiting up to RESULT_WAIT for it."""
        status, _, text = self.call(
            "GET", f"/api/task/result/{task_id}?timeout={RESULT_WAIT}", timeout=HTTP_WAIT
        )
        assert status == 200, (status, text[:300])
        return text, json.loads(text)


@contextmanager
def running_flower(logdir: Path) -> Iterator[Flower]:
    """Start our Flower on a free port, wait until it answers, and stop it afterwards."""
    port = free_port()
    auth = ("operator", secrets.token_urlsafe(12))
    env = {**os.environ, "FLOWER_BASIC_AUTH": f"{auth[0]}:{auth[1]}"}
    log_path = logdir / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.ops.flower", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        f = Flower(port, auth, log_path)
        try:
            eventually(
                lambda: proc.poll() is None and _healthy(f),
                timeout=60,
                what=f"Flower answering /healthcheck; log: {log_path}",
            )
            yield f
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _healthy(f: Flower) -> bool:
    try:
        return f.call("GET", "/healthcheck", auth=False)[0] == 200
    except OSError:
        return False
