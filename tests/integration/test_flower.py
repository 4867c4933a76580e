"""A real Flower (``python -m tasks.ops.flower``) over real RabbitMQ, a real worker, a real browser."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks import infer
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess, free_port
from tests.integration.conftest import WorkerFactory, eventually
from tests.integration.flower_server import Flower, running_flower
from tests.specs import spec_of

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def http(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def worker(worker_factory: WorkerFactory, run_id: str) -> WorkerProcess:
    name = f"fl-{run_id}"
    return worker_factory(name, [f"cpu.direct.{name}", f"fl-shared-{run_id}"]).wait_ready()


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    with running_flower(tmp_path) as f:
        yield f


def test_flower_refuses_to_start_without_a_password() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    for value in (None, "admin:change-me", "admin"):
        if value is not None:
            env["FLOWER_BASIC_AUTH"] = value
        done = subprocess.run(
            [sys.executable, "-m", "tasks.ops.flower", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (value, done.stdout, done.stderr)
        assert "FLOWER_BASIC_AUTH" in done.stderr


def _finished_task(worker: WorkerProcess) -> str:
    x = sample_inputs(spec_of("mlp"), 2, seed=0)
    result = infer.apply_async(("mlp", x), queue=worker.own_queue)
    assert result.get(timeout=60)["worker"] == worker.hostname
    return str(result.id)


def seen_by_flower(flower: Flower, worker: WorkerProcess) -> dict[str, Any]:
    """A task that ran on ``worker`` as Flower's API shows it, once it shows SUCCESS."""
    task_id = ""

    def succeeded() -> dict[str, Any] | None:
        nonlocal task_id
        task_id = task_id or _finished_task(worker)  # once events are on, one task is enough
        task = flower.api("/api/tasks").get(task_id)
        if task is None:
            task_id = ""  # sent before Flower switched events on in the worker: send another
        return dict(task, uuid=task_id) if task and task["state"] == "SUCCESS" else None

    return eventually(succeeded, what="the finished task in /api/tasks")  # type: ignore[no-any-return]


def test_flower_api_lists_worker_and_task_and_requires_auth(
    flower: Flower, worker: WorkerProcess
) -> None:
    # Flower switches task events on in every worker it sees (its enable_events option).
    workers = eventually(
        lambda: (
            worker.hostname in flower.api("/api/workers?refresh=1") and flower.api("/api/workers")
        ),
        what=f"{worker.hostname} in /api/workers",
    )
    assert workers[worker.hostname]["stats"]["pool"]["max-concurrency"] == 1
    task = seen_by_flower(flower, worker)
    assert task["name"] == "tasks.infer"
    assert task["worker"] == worker.hostname
    # Arguments are readable and safe to show: a summary, never the tensor's bytes.
    assert task["args"].startswith("('mlp', <tensor float32[2, ")
    assert "\\x" not in task["args"]
    # No credentials, wrong credentials: 401 on the API and the dashboard.
    for path in ("/api/workers", "/api/tasks", "/"):
        assert flower.get(path, auth=False)[0] == 401, path
        assert http(flower.url + path, ("operator", "wrong-password"))[0] == 401, path
    # Prometheus metrics (open, as Flower serves them) count our worker's events.
    status, body = flower.get("/metrics", auth=False)
    assert status == 200
    text = body.decode()
    assert f'worker="{worker.hostname}"' in text
    assert "flower_events_total" in text


def test_dashboard_in_headless_chromium_shows_the_worker(
    flower: Flower, worker: WorkerProcess, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).is_file():
        reason = (
            f"{CHROMIUM} is missing and `make browser` could not install Debian's chromium "
            "(it needs root and apt)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    eventually(
        lambda: worker.hostname in flower.api("/api/workers?refresh=1"),
        what=f"{worker.hostname} in /api/workers",
    )
    shot = ROOT / "var" / "screenshots" / "flower-dashboard.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            # Without credentials Chromium gets Flower's Basic challenge and cannot answer it.
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                browser.new_page().goto(flower.url + "/")
            context = browser.new_context(
                http_credentials={"username": flower.auth[0], "password": flower.auth[1]},
                viewport={"width": 1400, "height": 700},
            )
            page = context.new_page()
            response = page.goto(flower.url + "/")
            assert response is not None and response.status == 200
            row = page.get_by_role("link", name=worker.hostname)
            row.wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            assert "Online" in page.inner_text("body")
            # The task list shows a finished task with readable, safe arguments.
            task_id = seen_by_flower(flower, worker)["uuid"]
            tasks_page = ROOT / "var" / "screenshots" / "flower-tasks.png"

            def task_listed() -> bool:
                page.goto(flower.url + "/tasks")
                return page.get_by_text(task_id).count() > 0

            eventually(task_listed, what=f"task {task_id} on Flower's /tasks page")
            assert "tasks.infer" in page.inner_text("body")
            page.goto(f"{flower.url}/task/{task_id}")  # the task's page shows its arguments
            page.get_by_text("<tensor float32[2, 64]").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tasks_page), full_page=True)
            assert "\\x" not in page.inner_text("body")
        finally:
            browser.close()
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    shutil.copy(shot, tmp_path / shot.name)
