"""The Grafana dashboard (deploy/grafana/dashboards/inference.json) as tests read it.

Its panels, their PromQL, Grafana's variables replaced by concrete values, and
the metric names an expression selects.  Shared by tests/unit/test_dashboard.py
(every name is one the project serves) and tests/integration/test_prometheus.py
(a real Prometheus returns data for every query).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "inference.json"

# Grafana's built-in interval variables, in both spellings ($__x and ${__x}).
INTERVAL_VARIABLES = ("__rate_interval", "__interval", "__range")

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
     "group_right", "inf", "nan"}
)  # fmt: skip
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard: a panel's target, or a variable's query."""

    where: str  # "panel 'Queue wait' A", "variable model"
    expr: str


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every panel target's ``expr`` and every query variable's query, as PromQL.

    ``label_values(metric, label)`` (Grafana's, not PromQL) becomes
    ``count by (label) (metric)``: what Prometheus needs to have for it.
    """
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append(Query(f"panel {panel['title']!r} {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
        expr = f"count by ({match.group(2)}) ({match.group(1)})" if match else text
        out.append(Query(f"variable {variable['name']}", expr))
    return out


def variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Each dashboard variable and the regex that selects all its values (``allValue``)."""
    out = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        assert variable.get("includeAll") and variable.get("allValue"), variable["name"]
        out[variable["name"]] = variable["allValue"]
    return out


def substitute(expr: str, dashboard: dict[str, Any], interval: str) -> str:
    """``expr`` as Grafana sends it with every variable at "All" and ranges of ``interval``.

    Raises ``KeyError`` for a variable the dashboard does not define.
    """
    values = variables(dashboard) | dict.fromkeys(INTERVAL_VARIABLES, interval)

    def value(match: re.Match[str]) -> str:
        return values[match.group(1) or match.group(2)]

    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names that PromQL ``expr`` selects.

    String literals, label matchers, range and subquery brackets and grouping
    clauses are removed first; what is left is names, numbers, durations,
    operators, keywords and functions (a word followed by ``(``).  Grafana
    variables are replaced by ``$`` placeholders beforehand so that they never
    read as names.
    """
    names = {m[1:-1] for m in _NAME_MATCHER.findall(_VARIABLE.sub("0", expr))}
    text = _STRING.sub('""', _VARIABLE.sub("0", expr))
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", text)))
    for match in _WORD.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 5m, 1e3, 0.5: a number or a duration
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def calls(expr: str, function: str) -> list[str]:
    """The argument text of every call of ``function`` in ``expr`` (parentheses balanced)."""
    out = []
    for match in re.finditer(rf"\b{function}\s*\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                out.append(expr[start:i])
                break
    return out
