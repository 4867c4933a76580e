"""A real Prometheus evaluates every query of the Grafana dashboard, on real data.

Grafana itself is not installable here; Prometheus is (Debian's package,
``make prometheus-bin``).  This module starts a real batching worker (its own
metrics port), the real queue exporter (``python -m tasks.ops.exporter``) and
a client application that routes requests and exports its router's metrics
(tests/integration/routing_client.py), writes a prometheus.yml that scrapes
the three every second, and runs ``prometheus`` on it.  It sends real
requests: good ones through the router and straight to queues, bad ones, a
backlog the worker cannot take at once, requests that expire, batches.  Then
every panel's PromQL (deploy/grafana/dashboards/inference.json, Grafana's
variables at "All" and ``$__rate_interval`` at one minute), and the KEDA
scaler's query where deploy/kubernetes/ has one, goes through
``/api/v1/query``: each must return a sample with a finite value.  Last,
headless Chromium screenshots Prometheus' graph page for the key panels.

Without the ``prometheus`` binary the module skips and says why; with
``INFER_PROMETHEUS_REQUIRED=1`` (CI) it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.errors import DeadlineExceeded, NonFiniteInput, UnknownModel
from routing.queues import direct_queue
from tasks import app, infer
from tasks.diagnostics import sleep
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess, free_port
from tasks.wire.topology import remove_topology
from tests import dashboard as dash
from tests.integration.conftest import eventually, queue_depth
from tests.specs import spec_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
MODELS = ("mlp", "cnn")
SCRAPE_S = 1
QUERY_RANGE = "1m"  # what $__rate_interval (and $__interval, $__range) stand for in the checks
GRAPH_RANGE = "5s"  # ... in the screenshots, for finer detail over a short run
BACKLOG = 300  # requests queued behind a busy worker: the depth and drain panels see them
# Screenshot file (docs/img/) -> the panel and target it shows.
KEY_PANELS = {
    "prometheus-request-rate-by-outcome.png": ("Request rate by outcome", "A"),
    "prometheus-queue-depth.png": ("Queue depth", "A"),
    "prometheus-expected-drain.png": ("Expected drain time", "A"),
    "prometheus-queue-wait-p99.png": ("Queue wait", "B"),
}


def prometheus_binary() -> str:
    """The ``prometheus`` executable; skip (fail with INFER_PROMETHEUS_REQUIRED=1) without one."""
    path = shutil.which("prometheus")
    if path:
        return path
    reason = (
        "the prometheus binary is missing and `make prometheus-bin` could not install Debian's "
        "prometheus package (it needs root and apt)"
    )
    if os.environ.get("INFER_PROMETHEUS_REQUIRED") == "1":
        pytest.fail(f"INFER_PROMETHEUS_REQUIRED=1: {reason}", pytrace=False)
    pytest.skip(reason)


def scaler_queries() -> list[tuple[str, str]]:
    """(where, query) of every Prometheus trigger of a KEDA ScaledObject in deploy/kubernetes/."""
    out = []
    for path in sorted((ROOT / "deploy" / "kubernetes").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "ScaledObject":
                continue
            for trigger in doc["spec"].get("triggers", []):
                if trigger.get("type") == "prometheus":
                    where = f"{path.relative_to(ROOT)} {doc['metadata']['name']}"
                    out.append((where, trigger["metadata"]["query"]))
    return out


def named_queues(queries: list[tuple[str, str]]) -> set[str]:
    """The queues the scaler queries name with ``queue="..."`` (the exporter must report them)."""
    return {q for _, query in queries for q in re.findall(r'\bqueue\s*=\s*"([^"]+)"', query)}


class Background:
    """A subprocess in its own session, logging to a file; stopped with its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {line!r} within {timeout}s:\n{self.text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its session


class Prometheus(Background):
    """``prometheus`` scraping ``jobs`` (job -> targets) every second, and its HTTP API."""

    def __init__(self, binary: str, tmp: Path, jobs: dict[str, list[str]]) -> None:
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
        ]
        super().__init__("prometheus", argv, dict(os.environ), tmp)
        self.started = time.time()

    def get(self, path: str, **params: str) -> tuple[int, bytes, str]:
        """(status, body, Location) of one GET, redirects not followed."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(self.url + path + query, timeout=10) as response:
                return response.status, response.read(), ""
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Location", "")
        except OSError:
            return 0, b"", ""

    def api(self, path: str, **params: str) -> Any:
        status, body, _ = self.get(path, **params)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def wait_until_every_target_is_up(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.text()}")
            if self.get("/-/ready")[0] != 200:
                return False
            targets = self.api("/api/v1/targets")["activeTargets"]
            return bool(targets) and all(t["health"] == "up" for t in targets)

        eventually(up, timeout, what="every Prometheus target up")

    def graph_page(self) -> str:
        """The graph page's path: Debian builds serve the classic UI, which keeps the query."""
        _, _, location = self.get("/graph/")
        return "/classic/graph" if location.startswith("/classic/") else "/graph"


@dataclass
class Stack:
    prometheus: Prometheus
    worker: WorkerProcess
    class_queue: str


def hold(worker: WorkerProcess, seconds: float) -> Any:
    """Keep the pool child busy, so what is sent next waits (in the queue, or for a batch)."""
    held = sleep.apply_async((seconds,), queue=worker.own_queue)
    time.sleep(0.4)  # taken by the idle child at once
    return held


def send_bad_requests(worker: WorkerProcess) -> None:
    """Two errors the worker counts by outcome (send_task skips the client's checks)."""
    unknown = app.send_task("tasks.infer", args=("nope", [1.0]), queue=worker.own_queue)
    nan = app.send_task("tasks.infer", args=("mlp", [[float("nan")] * 64]), queue=worker.own_queue)
    for result, error in ((unknown, UnknownModel), (nan, NonFiniteInput)):
        with pytest.raises(error):
            result.get(timeout=60)


def send_traffic(worker: WorkerProcess, class_queue: str) -> None:
    """Requests of every kind, spread over several scrapes (the routing client sends its own)."""
    send_bad_requests(worker)
    mlp, cnn = spec_of("mlp"), spec_of("cnn")
    # Requests that expire behind a busy worker, and a backlog in the class queue meanwhile.
    held = hold(worker, 3.0)
    late = [
        infer.apply_async(("mlp", sample_inputs(mlp, 1, seed)), queue=worker.own_queue, expires=0.5)
        for seed in range(5)
    ]
    backlog = [
        infer.apply_async(("mlp", sample_inputs(mlp, 1, seed)), queue=class_queue)
        for seed in range(BACKLOG)
    ]
    sizes = [r.get(timeout=60)["forward_batch"] for r in backlog]
    for result in late:  # never computed: its deadline passed while the child was busy
        with pytest.raises(DeadlineExceeded):
            result.get(timeout=60)
    held.get(timeout=60)
    # A second round of expiring requests (the same series: rate() sees DeadlineExceeded grow,
    # not only appear), and requests that meet in one batch.
    held = hold(worker, 1.5)
    late = [
        infer.apply_async(("mlp", sample_inputs(mlp, 1, seed)), queue=worker.own_queue, expires=0.3)
        for seed in range(3)
    ]
    batch = [
        infer.apply_async(("cnn", sample_inputs(cnn, 1, seed)), queue=worker.own_queue)
        for seed in range(24)
    ]
    sizes += [r.get(timeout=60)["forward_batch"] for r in batch]
    for result in late:
        with pytest.raises(DeadlineExceeded):
            result.get(timeout=60)
    held.get(timeout=60)
    assert max(sizes) > 1, "no request was batched"
    send_bad_requests(worker)


@pytest.fixture(scope="module")
def stack(
    run_id: str, tmp_path_factory: pytest.TempPathFactory, weights_dir: Path
) -> Iterator[Stack]:
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    name = f"pm-{run_id}"
    class_queue = f"pm-{run_id}"
    # A fleet of its own: the router and the exporter see this worker only.
    env = dict(os.environ, INFER_REGISTRY_NAMESPACE=f"prom-{run_id}")
    worker_port, client_port, exporter_port = free_port(), free_port(), free_port()
    worker = WorkerProcess(
        name,
        "cpu",
        logdir=tmp,
        env={**env, "INFER_METRICS_PORT": str(worker_port)},
        queues=[direct_queue(class_queue, name), class_queue],
        preload=MODELS,
        batching=True,
    )
    # The class queues the KEDA scaler names, reported (as 0 while undeclared) beside ours.
    exporter_queues = [class_queue, *sorted(named_queues(scaler_queries()))]
    started: list[Background] = []
    prometheus: Prometheus | None = None
    try:
        worker.start()
        started.append(
            Background(
                "routing-client",
                [sys.executable, "-m", "tests.integration.routing_client",
                 "--port", str(client_port), "--worker", worker.hostname,
                 *[arg for model in MODELS for arg in ("--model", model)]],
                env,
                tmp,
            )
        )  # fmt: skip
        worker.wait_ready()
        started.append(
            Background(
                "exporter",
                [sys.executable, "-m", "tasks.ops.exporter", "--port", str(exporter_port),
                 "--interval", "0.5", *[arg for q in exporter_queues for arg in ("--queue", q)]],
                env,
                tmp,
            )
        )  # fmt: skip
        started[0].wait_for("ready")
        started[1].wait_for("queue exporter on")
        prometheus = Prometheus(
            binary,
            tmp,
            {
                "inference-workers": [f"127.0.0.1:{worker_port}"],
                "queue-exporter": [f"127.0.0.1:{exporter_port}"],
                "inference-clients": [f"127.0.0.1:{client_port}"],
            },
        )
        prometheus.wait_until_every_target_is_up()
        send_traffic(worker, class_queue)
        time.sleep(3 * SCRAPE_S)  # the last increments scraped
        yield Stack(prometheus, worker, class_queue)
    finally:
        for process in [*started, *([prometheus] if prometheus else [])]:
            process.stop()
        worker.stop()
        depths = {q: queue_depth(q) for q in worker.consumed_queues}
        leftovers = worker.session_pids()
        remove_topology(app, worker.consumed_queues)
    assert leftovers == [], f"stray worker processes: {leftovers}"
    assert all(d == 0 for d in depths.values()), f"messages left on queues: {depths}"


def finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in result if math.isfinite(float(s["value"][1]))]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    board = dash.load()
    queries = dash.queries(board)
    assert len(queries) > 20
    empty = {}
    for query in queries:
        expr = dash.substitute(query.expr, board, QUERY_RANGE)
        result = stack.prometheus.query(expr)
        if not finite(result):
            empty[query.where] = (expr, result)
    assert not empty, f"queries without a finite sample: {json.dumps(empty, indent=1)}"


def test_the_panels_show_what_was_sent(stack: Stack) -> None:
    """Not only some data: the outcomes, the backlog and the router's hits that really happened."""
    prom = stack.prometheus
    window = QUERY_RANGE
    outcomes = prom.query(f"sum by (outcome) (increase(infer_requests_total[{window}]))")
    seen = {s["metric"]["outcome"] for s in outcomes if float(s["value"][1]) > 0}
    assert {"success", "UnknownModel", "NonFiniteInput", "DeadlineExceeded"} <= seen, seen
    selector = f'{{queue="{stack.class_queue}", kind="class"}}'
    (depth,) = prom.query(f"max_over_time(infer_queue_messages{selector}[{window}])")
    assert float(depth["value"][1]) > 0  # the backlog, read by the exporter
    (drain,) = prom.query(f"max_over_time(infer_queue_expected_drain_seconds{selector}[{window}])")
    assert float(drain["value"][1]) > 0
    batch = prom.query(
        f"max(histogram_quantile(0.99, sum by (model, le) (rate(infer_batch_size_bucket[{window}]))))"
    )
    assert float(batch[0]["value"][1]) > 1  # requests met in batches
    ratios = [float(s["value"][1]) for s in prom.query("infer_router_sticky_hit_ratio")]
    assert ratios and all(0 < r <= 1 for r in ratios), ratios  # one worker: all but one hit


def test_the_keda_scaler_queries_return_data(stack: Stack) -> None:
    queries = scaler_queries()
    if not queries:
        pytest.skip("deploy/kubernetes/ has no KEDA ScaledObject with a Prometheus trigger")
    for where, query in queries:
        assert finite(stack.prometheus.query(query.strip())), f"{where}: no data for {query!r}"


def test_screenshots_of_the_key_panels_in_prometheus(stack: Stack, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        reason = (
            f"{CHROMIUM} is missing and `make browser` could not install Debian's chromium "
            "(it needs root and apt)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    board = dash.load()
    targets = {
        (panel["title"], target["refId"]): target
        for panel in dash.panels(board)
        for target in panel.get("targets", [])
    }
    # Written to var/screenshots/; INFER_DOCS_SCREENSHOTS=1 refreshes the docs' copies too.
    out = ROOT / "var" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    page_path = stack.prometheus.graph_page()
    shown = f"{math.ceil(time.time() - stack.prometheus.started) + 2}s"  # all it has recorded
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            for filename, key in KEY_PANELS.items():
                expr = dash.substitute(targets[key]["expr"], board, GRAPH_RANGE)
                params = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": shown}
                response = page.goto(
                    f"{stack.prometheus.url}{page_path}?{urllib.parse.urlencode(params)}"
                )
                assert response is not None and response.status == 200
                if page_path == "/classic/graph":
                    # Rickshaw draws one path per series once the range query has answered.
                    page.wait_for_selector(".rickshaw_graph svg path", state="attached")
                    assert "No datapoints found" not in page.inner_text("body"), key
                else:
                    page.wait_for_load_state("networkidle")
                page.screenshot(path=str(out / filename), full_page=True)
        finally:
            browser.close()
    for filename in KEY_PANELS:
        png = (out / filename).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, filename
        shutil.copy(out / filename, tmp_path / filename)
        if os.environ.get("INFER_DOCS_SCREENSHOTS") == "1":
            (ROOT / "docs" / "img").mkdir(exist_ok=True)
            shutil.copy(out / filename, ROOT / "docs" / "img" / filename)
