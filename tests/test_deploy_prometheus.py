"""deploy/prometheus: the scrape config and the alert rules, checked and unit-tested by promtool,
and a real Prometheus server (Debian's package) scraping a real daemon through that scrape
config, with those rules loaded and the Grafana dashboard's queries run against it."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import (
    Daemons,
    IdPFactory,
    free_port,
    import_tokens,
    parse_metrics,
    wait_until,
    write_config,
)
from databases import Database
from deploy_support import (
    DEPLOY,
    PROMETHEUS_METRICS,
    dashboard_panels,
    dashboard_queries,
    exported_metric_names,
    load_dashboard,
    promql_metric_names,
    substitute,
    variable_queries,
)

from refresherd.daemon import GAUGE_INTERVAL
from refresherd.metrics import DATABASE_FIGURES

PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = sorted(PROMETHEUS_DIR.glob("*_test.yml"))
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (.ci/run installs Debian's prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    not PROMETHEUS.exists(),
    reason="/usr/bin/prometheus is not installed (.ci/run installs Debian's prometheus)",
)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_checks_the_scrape_config_and_the_rules() -> None:
    for args in (("check", "config", PROMETHEUS_YML.name), ("check", "rules", ALERTS.name)):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_promtool_unit_tests_of_the_alert_rules(test_file: Path) -> None:
    result = promtool("test", "rules", test_file.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_a_unit_test_and_stays_silent_in_another() -> None:
    assert RULE_TESTS, "deploy/prometheus has no *_test.yml"
    fires: set[str] = set()
    silent: set[str] = set()
    for test_file in RULE_TESTS:
        for case in yaml.safe_load(test_file.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names, "alerts.yml has no alerting rule"
    assert names - fires == set(), "alerts never seen firing in a unit test"
    assert names - silent == set(), "alerts never seen silent in a unit test"
    assert fires | silent <= names, "unit tests of alerts that do not exist"


def test_the_issue_s_alerts_exist_with_severity_and_text() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    wanted = {
        "failure ratio": "RefresherdRefreshFailureRatioHigh",
        "invalidations": "RefresherdTokenSetsInvalidated",
        "token sets past expiry": "RefresherdTokenSetsExpired",
        "absolute refresh-token expiry": "RefresherdRefreshTokensExpireSoon",
        "provider circuit open": "RefresherdProviderCircuitOpen",
        "daemon down": "RefresherdDown",
        "daemon not scraped": "RefresherdNotScraped",
    }
    assert set(wanted.values()) <= set(rules), set(wanted.values()) - set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


RUNBOOK = DEPLOY.parent / "docs" / "runbook.md"


def runbook_sections() -> dict[str, str]:
    """docs/runbook.md's "## " sections by their anchor (GitHub's: lower case, spaces to -)."""
    sections: dict[str, str] = {}
    name = None
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip().lower()
            name = re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-")
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def test_every_alert_has_a_runbook_that_says_what_it_means_how_to_confirm_and_what_to_do() -> None:
    sections = runbook_sections()
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md" and anchor == rule["alert"].lower(), (rule["alert"], url)
        text = sections.get(anchor)
        assert text, f"docs/runbook.md has no section #{anchor}"
        for part in ("**Means.**", "**Confirm.**", "**Do.**"):
            assert part in text, (rule["alert"], part)
    # And no runbook for an alert that does not exist.
    alerts = {rule["alert"].lower() for rule in alert_rules()}
    assert {name for name in sections if name.startswith("refresherd")} == alerts


def test_the_readme_s_alert_table_lists_every_rule_with_its_runbook() -> None:
    readme = (DEPLOY.parent / "README.md").read_text(encoding="utf-8")
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| \[`(Refresherd\w+)`\]\(([^)]*)\) \|", readme, re.MULTILINE)
    }
    assert set(rows) == {rule["alert"] for rule in alert_rules()}, set(rows)
    for name, link in rows.items():
        assert link == f"docs/runbook.md#{name.lower()}", (name, link)


def test_rules_use_only_metrics_refresherd_exports() -> None:
    exported = exported_metric_names()
    for rule in alert_rules():
        unknown = promql_metric_names(rule["expr"]) - exported - PROMETHEUS_METRICS
        assert not unknown, f"{rule['alert']} uses metrics refresherd does not export: {unknown}"


def test_the_scrape_job_is_the_one_the_rules_and_dashboard_select() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "refresherd"
    assert config["rule_files"] == [ALERTS.name]
    assert 'up{job="refresherd"}' in ALERTS.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- a real Prometheus


class PrometheusAPI:
    def __init__(self, base: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base = base
        self.process = process
        self.log = log

    def get(self, path: str, **params: str) -> dict[str, Any]:
        response = httpx.get(self.base + path, params=params, timeout=10)
        body: dict[str, Any] = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]  # type: ignore[no-any-return]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, config: dict[str, Any]) -> Iterator[PrometheusAPI]:
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = PrometheusAPI(f"http://127.0.0.1:{port}", process, log)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{api.tail()}")
            try:
                return httpx.get(api.base + "/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, what="Prometheus to be ready")
        yield api
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def shipped_prometheus_config(targets: list[str]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml as shipped, with ``targets`` (host:port), a 1 s pace,
    and alerts.yml loaded from the repository."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["scrape_timeout"] = "1s"
    job["static_configs"] = [{"targets": targets}]
    return config


# A hook command that takes the event on stdin and succeeds.
TAKE_EVENT = [sys.executable, "-c", "import sys; sys.stdin.read()"]


@needs_prometheus
def test_prometheus_scrapes_a_running_daemon(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    # 4-second access tokens: the daemon refreshes every few seconds, so the counter grows.
    idp = idp_factory(access_token_lifetime=4.0)
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        # An absolute refresh-token lifetime: the soonest expiry is exported and alerted on;
        # within the warning horizon, so the sets are announced (hooks) and counted as expiring.
        providers={"p": idp.provider(refresh_token_lifetime="30d")},
        schedule={"min_margin": "1s", "refresh_token_expiry_warning": "60d"},
        # A [hooks] command target: notifications are delivered (the hook panels have data).
        tables={"hooks": {"command": TAKE_EVENT}},
    )
    import_tokens(config, idp.token_lines("p", 3, with_access_token=False))
    imported_at = time.time()
    daemon = daemons(config)
    host, port = daemon.address or ("", 0)

    with running_prometheus(tmp_path, shipped_prometheus_config([f"{host}:{port}"])) as api:
        success = 'refresherd_refresh_success_total{job="refresherd", provider="p"}'
        first = wait_until(
            lambda: api.value(success), interval=0.5, what=f"a first sample of {success}"
        )
        wait_until(
            lambda: (api.value(success) or 0) > first,
            interval=0.5,
            what=f"{success} to grow past {first}",
        )
        assert api.value('up{job="refresherd"}') == 1
        soonest = wait_until(
            lambda: api.value(
                'refresherd_refresh_token_expires_soonest_timestamp_seconds{provider="p"}'
            ),
            interval=0.5,
            what="the soonest absolute refresh-token expiry",
        )
        assert imported_at + 30 * 86400 - 60 <= soonest <= time.time() + 30 * 86400

        # Every name Prometheus got from refresherd is one metrics.py makes (ALERTS* and scrape_*
        # are Prometheus's own: RefresherdNotScraped is pending until the first scrape).
        names = api.get("/api/v1/label/__name__/values", **{"match[]": '{job="refresherd"}'})
        scraped = {name for name in names if name.startswith("refresherd_")}
        assert set(names) - scraped <= {"up", "ALERTS", "ALERTS_FOR_STATE"} | {
            name for name in names if name.startswith("scrape_")
        }
        assert scraped and scraped <= exported_metric_names(), scraped - exported_metric_names()

        wait_until(
            lambda: api.value('refresherd_hook_deliveries_total{outcome="delivered"}') == 3,
            interval=0.5,
            what="the three expiry notifications delivered",
        )
        check_alert_rules_are_loaded_and_quiet(api)
        check_dashboard_queries(api)

    assert daemon.stop() == 0


def check_alert_rules_are_loaded_and_quiet(api: PrometheusAPI) -> None:
    """alerts.yml loaded and evaluated without error; a healthy daemon raises none of the alerts
    that say it is down, unscraped, unready or locked out."""

    def evaluated() -> list[dict[str, Any]] | None:
        groups = api.get("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = wait_until(evaluated, interval=0.5, what="every alert rule evaluated without error")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    states = {r["name"]: r["state"] for r in rules}
    for name in (
        "RefresherdDown",
        "RefresherdNotScraped",
        "RefresherdNotReady",
        "RefresherdProviderCircuitOpen",
        "RefresherdTokenSetsInvalidated",
    ):
        assert states[name] == "inactive", (name, states[name])


# Panels that may show nothing while every refresh succeeds.
QUIET_PANELS = {"Failure ratio by reason", "Config reloads"}


def check_dashboard_queries(api: PrometheusAPI) -> None:
    """Prometheus parses and runs every query of the Grafana dashboard; every panel but those
    that show failures has data from the healthy daemon; the variables find their values."""
    dashboard = load_dashboard()
    for panel in dashboard_panels(dashboard):
        results = [api.query(substitute(t["expr"])) for t in panel["targets"]]
        if panel["title"] not in QUIET_PANELS:
            assert any(results), f"panel {panel['title']!r} has no data"
    expected = {"job": "refresherd", "instance": None, "provider": "p"}
    for name, query in variable_queries(dashboard):
        inner = query.removeprefix("label_values(").removesuffix(")")
        selector, _, label = inner.rpartition(",")
        series = api.get("/api/v1/series", **{"match[]": substitute(selector.strip())})
        values = {s.get(label.strip()) for s in series}
        assert values - {None}, f"variable {name}: {query} finds no values"
        if expected[name] is not None:
            assert expected[name] in values, (name, values)


def test_the_live_metrics_names_are_the_ones_the_helpers_know(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    """The exported names the rule and dashboard checks rely on match a live /metrics."""
    idp = idp_factory()
    config = write_config(
        tmp_path / "c.toml", database=tmp_path / "tokens.db", providers={"p": idp.provider()}
    )
    daemon = daemons(config)
    live = {name for name, _ in parse_metrics(daemon.metrics()) if name.startswith("refresherd_")}
    assert live <= exported_metric_names(), live - exported_metric_names()
    assert daemon.stop() == 0


# ----------------------------------------------------------------- one database, two daemons


def database_wide_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and alert expression that reads a database-wide
    figure, as Prometheus runs them."""
    database_wide = {
        name for name in exported_metric_names() if name.removesuffix("_total") in DATABASE_FIGURES
    }
    found = [
        (title, substitute(expr))
        for title, expr in dashboard_queries(load_dashboard())
        if promql_metric_names(expr) & database_wide
    ]
    found += [
        (rule["alert"], rule["expr"])
        for rule in alert_rules()
        if promql_metric_names(rule["expr"]) & database_wide
    ]
    return found


def readings(api: PrometheusAPI, queries: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Each query's result, by its series' labels; a time left rounded to the hour (it moves)."""
    out: dict[str, dict[str, float]] = {}
    for where, expr in queries:
        result = {}
        for series in api.query(expr):
            value = float(series["value"][1])
            labels = ",".join(f"{k}={v}" for k, v in sorted(series.get("metric", {}).items()))
            result[labels] = round(value / 3600) if "time()" in expr else value
        out[f"{where}: {expr}"] = result
    return out


def scraped(api: PrometheusAPI, metric_name: str, instance: str) -> float | None:
    return api.value(f'{metric_name}{{job="refresherd", instance="{instance}"}}')


@needs_prometheus
def test_two_daemons_on_one_database_read_as_one_and_hand_the_exporter_over(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
    db: Database,
) -> None:
    """The dashboard's queries on database-wide figures and the alerts on them read the same
    with two daemons on one database as with one; when the exporting daemon is killed, the other
    one exports within a gauge interval or two, and the readings stay the same."""
    idp = idp_factory(access_token_lifetime=30.0)
    down = idp_factory("down", serve=False, port=free_port())  # its sets stay past expiry
    providers = {
        "p": idp.provider(refresh_token_lifetime="30d"),
        "down": down.provider(),
    }
    schedule = {"min_margin": "1s", "backoff_initial": "1s", "backoff_max": "2s"}
    first_port, second_port = free_port(), free_port()
    configs = [
        write_config(
            tmp_path / f"{name}.toml",
            database=db,
            providers=providers,
            schedule=schedule,
            listen=f"127.0.0.1:{port}",
        )
        for name, port in (("first", first_port), ("second", second_port))
    ]
    expired = down.token_lines("down", 2, prefix="down")
    for line in expired:
        del line["expires_in"]
        line["expires_at"] = time.time() - 60
    import_tokens(configs[0], idp.token_lines("p", 3, with_access_token=False) + expired)
    first = daemons(configs[0], "first")
    second = daemons(configs[1], "second", start=False)
    a, b = f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}"
    queries = database_wide_queries()
    assert any(where == "RefresherdTokenSetsExpired" for where, _ in queries)
    assert any(where == "Token sets by state" for where, _ in queries)
    expired_alert = (
        'ALERTS{alertname="RefresherdTokenSetsExpired", provider="down", alertstate="pending"}'
    )

    with running_prometheus(tmp_path, shipped_prometheus_config([a, b])) as api:
        # One daemon: the figures settle (p's sets refreshed, down's failing, past expiry).
        settled = 'refresherd_token_sets{provider="down", state="failing"}'
        wait_until(lambda: api.value(settled) == 2, interval=0.5, what=settled)
        wait_until(
            lambda: api.value('sum(refresherd_token_sets{provider="p", state="active"})') == 3,
            interval=0.5,
            what="p's three sets active",
        )
        wait_until(lambda: api.value(expired_alert) == 1, interval=0.5, what=expired_alert)
        one = readings(api, queries)
        assert one["Past expiry: " + substitute(expr_of("Past expiry"))] == {"": 2.0}
        assert one["RefresherdTokenSetsExpired: " + rule_expr("RefresherdTokenSetsExpired")] == {
            "job=refresherd,provider=down": 2.0
        }

        # Two daemons: the second is scraped, and is not the exporter; every reading the same.
        second.start()
        wait_until(
            lambda: (
                scraped(api, "refresherd_database_exporter", b) == 0
                and scraped(api, "refresherd_ready", b) == 1
            ),
            interval=0.5,
            what="the second daemon scraped, not exporting",
        )
        assert scraped(api, "refresherd_database_exporter", a) == 1
        assert scraped(api, "refresherd_token_sets", b) is None
        assert readings(api, queries) == one
        assert alert_value(api, "RefresherdTokenSetsExpired") == 2.0

        # The exporter is killed: the second one takes the role at its next gauge cycle.
        killed_at = time.monotonic()
        first.kill()  # SIGKILL: the lock goes with the process, nothing is released by hand
        wait_until(
            lambda: "refresherd_database_exporter 1.0" in second.metrics(),
            interval=0.1,
            what="the second daemon to take the exporter role",
        )
        handover = time.monotonic() - killed_at
        assert handover < 2 * GAUGE_INTERVAL + 5, handover
        print(f"exporter handover after SIGKILL: {handover:.1f} s")
        wait_until(
            lambda: (
                scraped(api, "up", a) == 0
                and scraped(api, "refresherd_database_exporter", b) == 1
                and scraped(api, "refresherd_token_sets", a) is None
            ),
            interval=0.5,
            what="Prometheus to see the first daemon gone and the second exporting",
        )
        wait_until(
            lambda: readings(api, queries) == one or None,
            interval=0.5,
            timeout=30,
            what=f"the readings after the handover to equal {one}",
        )
        # Its labels name no instance: the same alert, evaluated on the new exporter's figure.
        wait_until(
            lambda: alert_value(api, "RefresherdTokenSetsExpired") == 2.0 or None,
            interval=0.5,
            what="the expired-sets alert at 2 after the handover",
        )

    assert second.stop() == 0


def expr_of(title: str) -> str:
    (expr,) = [expr for t, expr in dashboard_queries(load_dashboard()) if t == title]
    return expr


def rule_expr(alert: str) -> str:
    (expr,) = [rule["expr"] for rule in alert_rules() if rule["alert"] == alert]
    return str(expr)


def alert_value(api: PrometheusAPI, alert: str) -> float | None:
    """The value of ``alert`` as Prometheus last evaluated it (pending or firing), if active."""
    found = [a for a in api.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == alert]
    assert len(found) <= 1, found
    return float(found[0]["value"]) if found else None
