"""deploy/grafana: the dashboard JSON and its provisioning files. (The e2e test in
test_deploy_prometheus.py runs every query of the dashboard against a real Prometheus.)"""

from __future__ import annotations

import re
from typing import Any

import yaml
from deploy_support import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_METRICS,
    dashboard_panels,
    dashboard_queries,
    exported_metric_names,
    load_dashboard,
    promql_metric_names,
    variable_queries,
)

from refresherd.metrics import DATABASE_FIGURES

GRAFANA = DEPLOY / "grafana"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
TIMESTAMP = "refresherd_refresh_token_expires_soonest_timestamp_seconds"


def load_yaml(name: str) -> Any:
    return yaml.safe_load((GRAFANA / name).read_text(encoding="utf-8"))


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "refresherd" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards carry no id"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_variables_are_defined_and_the_data_source_is_chosen_not_hard_coded() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used = set()
    texts = [expr for _, expr in dashboard_queries(dashboard)]
    texts += [query for _, query in variable_queries(dashboard)]
    for text in texts:
        used |= set(re.findall(r"\$\{?(\w+)", text))
    assert used - GRAFANA_BUILTINS <= set(variables), used - GRAFANA_BUILTINS - set(variables)
    for name in ("instance", "provider"):
        # "All" must be a regex for the =~ matchers the queries use.
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_queries_use_only_metrics_refresherd_exports() -> None:
    dashboard = load_dashboard()
    exported = exported_metric_names()
    queries = dashboard_queries(dashboard) + variable_queries(dashboard)
    for where, expr in queries:
        unknown = promql_metric_names(expr) - exported - PROMETHEUS_METRICS
        assert not unknown, f"{where}: {expr} uses metrics refresherd does not export: {unknown}"


def test_the_issue_s_panels_are_there() -> None:
    queries = dashboard_queries(load_dashboard())

    def panels_with(*needles: str) -> set[str]:
        return {title for title, expr in queries if all(n in expr for n in needles)}

    assert panels_with("rate(refresherd_refresh_success_total"), "refresh rate"
    assert panels_with("sum by (provider, reason)", "refresherd_refresh_failures_total", "/"), (
        "failure ratio by reason"
    )
    # Database-wide figures come from one daemon per database: summed, each database once.
    assert panels_with("sum by (provider, reason)", "refresherd_database_invalidations_total"), (
        "invalidations"
    )
    assert panels_with("sum by (provider, state)", "refresherd_token_sets{"), "token sets by state"
    assert panels_with("histogram_quantile", "refresherd_refresh_lateness_seconds_bucket"), (
        "lateness"
    )
    for q in ("0.5", "0.9", "0.99"):
        assert panels_with(f"histogram_quantile({q},", "refresherd_refresh_duration_seconds"), q
        assert panels_with(f"histogram_quantile({q},", "refresherd_refresh_lateness_seconds"), q
    for needle, what in (
        ("refresherd_storage_pauses_total", "storage pauses"),
        ("refresherd_storage_writable", "storage writable"),
        ("refresherd_unpersisted_grants", "grants held in memory"),
        ("refresherd_hook_deliveries_total", "hook deliveries"),
        ("refresherd_hook_queue", "hook queue"),
        ("refresherd_worker_restarts_total", "worker restarts"),
        ("refresherd_refresh_token_expires_soonest_timestamp_seconds", "soonest expiry"),
        ("refresherd_refresh_tokens_expiring", "expiring refresh tokens"),
        ("refresherd_database_exporter", "who exports"),
    ):
        assert panels_with(needle), what
    assert panels_with("sum by (target, outcome)", "refresherd_hook_deliveries_total"), (
        "hook deliveries by outcome"
    )


def test_database_wide_figures_are_summed_never_maxed() -> None:
    """Only the database's exporter exports them: a sum counts each database once, in a fleet on
    one database and across sidecars with their own; a max would undercount the sidecars. The
    soonest expiry is a time, whose earliest is wanted: min."""
    database_wide = {
        name for name in exported_metric_names() if name.removesuffix("_total") in DATABASE_FIGURES
    }
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    rules = [(r["alert"], r["expr"]) for g in alerts["groups"] for r in g["rules"]]
    checked = 0
    for where, expr in dashboard_queries(load_dashboard()) + rules:
        used = promql_metric_names(expr) & database_wide
        if not used:
            continue
        checked += 1
        aggregations = set(re.findall(r"\b(sum|min|max|avg|count|topk|bottomk)\b", expr))
        assert aggregations, f"{where}: {expr} does not aggregate across instances"
        allowed = {"min"} if used <= {TIMESTAMP} else {"sum"}
        assert aggregations <= allowed, f"{where}: {expr} aggregates {used} with {aggregations}"
    assert checked >= 10


def test_provisioning_files_load_the_dashboard_where_compose_mounts_it() -> None:
    providers = load_yaml("dashboards.yaml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    datasources = load_yaml("datasource.yaml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        host, container, mode = volume.split(":")
        assert mode == "ro", volume
        assert (DEPLOY / host).resolve().is_file(), volume
        mounts[(DEPLOY / host).resolve()] = container
    assert mounts[DASHBOARD.resolve()].startswith(path.rstrip("/") + "/")
    assert mounts[(GRAFANA / "dashboards.yaml").resolve()].startswith(
        "/etc/grafana/provisioning/dashboards/"
    )
    assert mounts[(GRAFANA / "datasource.yaml").resolve()].startswith(
        "/etc/grafana/provisioning/datasources/"
    )
    # The data source reaches the compose file's Prometheus service.
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
