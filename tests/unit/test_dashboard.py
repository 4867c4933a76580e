"""The Grafana dashboard: well formed, and every query names metrics the project really serves.

The served names are not a hand-written list: they are read from a real
Prometheus exposition of the worker's metric objects and collectors
(``tasks.worker.metrics``, through prometheus-client), and from the queue
exporter's ``SERVED_METRICS``.  tests/integration/test_prometheus.py then runs
every query against a real Prometheus scraping real processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests import dashboard as dash

# What the dashboard is for (issue 17): each must be drawn by some panel.
REQUIRED = {
    "infer_requests_total": "request rate and outcomes",
    "infer_queue_wait_seconds_bucket": "p50/p99 queue wait per model",
    "infer_service_seconds_bucket": "p50/p99 service time per model",
    "infer_compute_seconds_bucket": "p50/p99 compute per model",
    "infer_batch_size_bucket": "batch size",
    "infer_router_sticky_hit_ratio": "sticky hit ratio",
    "infer_queue_messages": "queue depth",
    "infer_queue_expected_drain_seconds": "expected drain time",
    "infer_device_memory_bytes": "device memory",
}
SUFFIXES = {  # the sample names a family of each type is exposed as
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "untyped": ("",),
    "info": ("_info",),
}


class FakeCache:
    """The model cache as the worker's collector reads it (tasks.worker.device.CacheView)."""

    used_bytes = 1 << 20
    budget_bytes = 1 << 30

    def keys(self) -> list[tuple[str, str]]:
        return [("mlp@1", "fp32")]


def exposition_types(text: str) -> dict[str, str]:
    """Sample name -> metric type, for every family of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            out[family.name + suffix] = family.type
    return out


@pytest.fixture(scope="module")
def served() -> dict[str, str]:
    """Every sample name a worker, a routing process or the queue exporter serves -> its type."""
    import torch
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    from routing.router import RouterStats
    from tasks.ops.exporter import SERVED_METRICS
    from tasks.worker import metrics

    # What serve() registers beside the module's metric objects (in REGISTRY since import).
    registry = CollectorRegistry()
    registry.register(
        metrics.RuntimeCollector(SimpleNamespace(device=torch.device("cpu"), cache=FakeCache()))
    )
    app = SimpleNamespace(built_router=SimpleNamespace(stats=RouterStats()))
    registry.register(metrics.RouterCollector(cast(Any, app)))
    text = generate_latest(REGISTRY).decode() + generate_latest(registry).decode()
    out = exposition_types(text)
    assert {"infer_requests_total", "infer_device_memory_bytes"} <= set(out)  # read it right
    for name in SERVED_METRICS:
        out.setdefault(name, "counter" if name.endswith("_total") else "gauge")
    return out


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dash.load()


def graph_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in dash.panels(board) if p["type"] != "row")


def test_the_dashboard_is_grafana_11_json_with_a_stable_uid(board: dict[str, Any]) -> None:
    assert board["schemaVersion"] == 41  # Grafana 11.6 (compose pins grafana/grafana:11.6.x)
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"])  # links to it survive re-provisioning
    assert board["title"] and board["editable"] is False  # the repository's JSON is the source
    ids = [p["id"] for p in dash.panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_has_a_title_a_prometheus_datasource_and_targets(
    board: dict[str, Any],
) -> None:
    for panel in dash.panels(board):
        assert panel.get("title"), panel
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel.get("description"), panel["title"]  # what it tells an operator
        targets = panel.get("targets")
        assert targets, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], (panel["title"], target["refId"])
            assert target.get("expr", "").strip(), (panel["title"], target["refId"])
            assert target.get("legendFormat"), (panel["title"], target["refId"])
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_panels_tile_the_grid_without_overlapping(board: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]


def test_every_metric_in_every_query_is_served(
    board: dict[str, Any], served: dict[str, str]
) -> None:
    used: set[str] = set()
    for query in dash.queries(board):
        names = dash.metric_names(query.expr)
        assert names, f"{query.where}: no metric in {query.expr!r}"
        unknown = names - set(served)
        assert not unknown, f"{query.where}: {sorted(unknown)} not served by any process"
        used |= names
    missing = {name: why for name, why in REQUIRED.items() if name not in used}
    assert not missing, f"no panel shows {missing}"


def test_rates_are_over_counters_and_quantiles_over_buckets(
    board: dict[str, Any], served: dict[str, str]
) -> None:
    for query in dash.queries(board):
        for function in ("rate", "irate", "increase"):
            for argument in dash.calls(query.expr, function):
                for name in dash.metric_names(argument):
                    counter = served[name] == "counter" or name.endswith(("_sum", "_count"))
                    assert counter or name.endswith("_bucket"), (
                        f"{query.where}: {function}() over {name}, a {served[name]}"
                    )
        for argument in dash.calls(query.expr, "histogram_quantile"):
            names = dash.metric_names(argument)
            assert names and all(n.endswith("_bucket") for n in names), query.where
            assert re.search(r"\bby\s*\([^)]*\ble\b", argument), f"{query.where}: not by le"
        for name in dash.metric_names(query.expr):
            if name.endswith("_bucket"):
                assert "histogram_quantile" in query.expr, f"{query.where}: raw buckets"


def test_every_variable_is_defined_and_selects_all_by_default(board: dict[str, Any]) -> None:
    for query in dash.queries(board):
        expr = dash.substitute(query.expr, board, "1m")  # KeyError: an undefined variable
        assert "$" not in expr, query.where
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "prometheus"
        assert variable["current"]["value"] == ["$__all"], variable["name"]


def test_latency_panels_show_p50_and_p99_per_model(board: dict[str, Any]) -> None:
    for metric in ("infer_queue_wait_seconds", "infer_service_seconds", "infer_compute_seconds"):
        (panel,) = [
            p
            for p in graph_panels(board)
            if any(f"{metric}_bucket" in t["expr"] for t in p["targets"])
        ]
        quantiles = set()
        for target in panel["targets"]:
            (argument,) = dash.calls(target["expr"], "histogram_quantile")
            quantiles.add(argument.split(",")[0].strip())
            assert re.search(r"\bby\s*\(\s*model\b", argument), panel["title"]
            assert "{{model}}" in target["legendFormat"], panel["title"]
        assert quantiles == {"0.5", "0.99"}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_outcomes_panel_splits_by_outcome_and_colours_deadline_exceeded(
    board: dict[str, Any],
) -> None:
    (panel,) = [p for p in graph_panels(board) if p["title"] == "Request rate by outcome"]
    (target,) = panel["targets"]
    assert re.search(r"sum by \(outcome\) \(rate\(infer_requests_total\b", target["expr"])
    overrides = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
    assert "DeadlineExceeded" in overrides
    assert "Overloaded" not in target["expr"]  # raised in the caller: no worker counts it


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{m=~"$model", x="}"}'
            "[$__rate_interval])))",
            {"a_bucket"},
        ),
        ("sum(rate(b_total[5m] offset 1m)) / on (instance) group_left (x) c", {"b_total", "c"}),
        (
            "(sum(rate(d_total{o='x y'}[1m])) or vector(0)) / sum(e) by (f) > bool 1e3",
            {"d_total", "e"},
        ),
        ("max_over_time(g[10m:1m]) and time() - h:recorded", {"g", "h:recorded"}),
        ('{__name__="i", job="j"} unless k', {"i", "k"}),
    ],
)
def test_metric_names_are_parsed_out_of_promql(expr: str, names: set[str]) -> None:
    assert dash.metric_names(expr) == names


def test_the_docs_list_every_panel_with_its_queries(board: dict[str, Any]) -> None:
    page = (dash.ROOT / "docs" / "dashboards.md").read_text()
    for panel in dash.panels(board):
        if panel["type"] == "row":
            assert f"### {panel['title']}\n" in page, panel["title"]
            continue
        assert f"**{panel['title']}**" in page, panel["title"]
        for target in panel["targets"]:
            assert f"\n{target['expr']}\n" in page, (panel["title"], target["refId"])
