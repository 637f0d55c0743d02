"""Helpers for the tests of deploy/: which metric names refresherd exports, which ones a PromQL
expression (or a Grafana query) uses, and the queries of the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from refresherd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "refresherd.json"

# Series that Prometheus itself makes for every target.
PROMETHEUS_METRICS = frozenset({"up"})

# Grafana's variables, as the e2e test feeds the queries to Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1m",
    "$job": "refresherd",
    "$instance": ".*",
    "$provider": ".*",
}

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "start", "end", "inf", "nan"}
)
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported_metric_names() -> set[str]:
    """Every sample name refresherd's /metrics can carry (from the one place they are made)."""
    names: set[str] = set()
    metrics = Metrics()
    metrics.database.exporting = True  # the database-wide figures, as the exporter shows them
    for family in metrics.registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (also inside Grafana's label_values())."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"label_values\s*\((.*),\s*\w+\s*\)", r"(\1)", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+|[smhdwy]+)?\b", " ", text)  # numbers, durations
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of every query variable."""
    found: list[tuple[str, str]] = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((variable["name"], query["query"] if isinstance(query, dict) else query))
    return found


def substitute(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    # Longest names first: $__rate_interval before $__range, $instance before $in...
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr
