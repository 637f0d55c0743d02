"""The daemon end to end: the real ``refresherd run`` process, a real FakeIdP on loopback, real
SQLite files. Conditions are polled with generous deadlines; nothing here times performance."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DaemonProcess,
    Daemons,
    Database,
    IdPFactory,
    IdPHandle,
    free_port,
    import_tokens,
    metric,
    parse_metrics,
    read_rows,
    refresherd_argv,
    run_cli,
    wait_until,
    write_config,
)

from refresherd.policy import MAX_SENDS_IN_FLIGHT
from refresherd.testing import FaultKind


def refreshed_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return daemon.events("refresh", outcome="refreshed")


def wait_quiet_equal(read_ledger: Callable[[], int], read_metric: Callable[[], float]) -> int:
    """Wait for an instant at which the metric equals the ledger (ledger read before and after:
    a refresh the IdP has granted but the daemon not yet counted shows as metric < ledger)."""

    def equal() -> int | None:
        before = read_ledger()
        value = read_metric()
        after = read_ledger()
        return before if before == after == value else None

    return wait_until(equal, interval=0.05, what="refresh_success_total to equal the ledger")


def assert_ledger_clean(handle: IdPHandle) -> None:
    ledger = handle.ledger
    assert ledger.concurrent_uses == 0, ledger.snapshot()
    assert ledger.reuses_outside_grace == 0, ledger.snapshot()
    assert ledger.invalid_grants == 0, ledger.snapshot()


def assert_stored_tokens_are_the_live_ones(
    handle: IdPHandle, rows: dict[str, dict[str, Any]], *, users: list[str]
) -> None:
    """Once every grace window is over, each authorization has exactly one live refresh token,
    and it is the one in the database: nothing lost, nothing spare."""
    for user in users:
        stored = rows[user]["refresh_token"]
        assert handle.ledger.is_live(stored), f"{user}: stored refresh token is dead"
        assert handle.ledger.live_refresh_tokens(user) == {stored}, user


# --------------------------------------------------------------------------- signals


def test_sigterm_lets_in_flight_refreshes_finish_and_persist(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    # A long grace period: a slow send is kept open (hedged beside after a second, never
    # abandoned), and its answer, or its hedge's, is waited for through the drain.
    idp = idp_factory(grace_period=30)
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    lines = idp.token_lines("p", 6, with_access_token=False)  # due at once
    import_tokens(config, lines)
    original = {line["id"]: line["refresh_token"] for line in lines}
    # The IdP rotates each token at once, then takes 4 s to answer; so do the hedges.
    idp.faults.add(FaultKind.SLOW, times=12, delay=4.0)
    daemon = daemons(config)
    wait_until(lambda: idp.ledger.refreshes == 6, what="all six requests granted at the IdP")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0

    [shutting_down] = daemon.events("shutting down")
    assert shutting_down["in_flight"] >= 1
    assert not [line for line in daemon.lines() if "shutdown timeout" in str(line.get("event"))]
    rows = read_rows(db)
    for token_set_id, row in rows.items():
        assert row["version"] == 2, token_set_id
        assert row["refresh_token"] != original[token_set_id]
        assert idp.ledger.is_live(row["refresh_token"])
        assert row["attempt_started_at"] is None and row["lease_owner"] is None
    ledger = idp.ledger
    assert ledger.reuses_outside_grace == 0 and ledger.invalid_grants == 0, ledger.snapshot()
    # Waited for (the first sends and their hedges, at most MAX_SENDS_IN_FLIGHT out each),
    # never a burst of resends.
    assert 6 <= ledger.requests <= 6 * MAX_SENDS_IN_FLIGHT
    assert ledger.reuses_in_grace == ledger.requests - 6


def test_crash_after_rotation_is_recovered_through_the_grace_window(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory(grace_period=20)
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    [line] = idp.token_lines("p", 1, with_access_token=False)
    import_tokens(config, [line])
    # The IdP rotates the token, then holds the answer far longer than it takes us to kill (and
    # less than the attempt timeout, about half of the 20 s grace window).
    idp.faults.add(FaultKind.SLOW, delay=8.0, process_first=True)
    crashed = daemons(config, "crashed")
    wait_until(lambda: idp.ledger.refreshes == 1, what="the IdP to rotate the refresh token")
    crashed.kill()
    assert crashed.returncode == -signal.SIGKILL
    row = read_rows(db)["ts-0000"]
    assert row["version"] == 1 and row["attempt_started_at"] is not None  # journaled, unresolved

    successor = daemons(config, "successor")
    successor.wait_for_event("recovering unresolved attempt", token_set="ts-0000")
    wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="the recovered grant")
    ledger = idp.ledger
    assert ledger.reuses_in_grace >= 1
    assert ledger.reuses_outside_grace == 0
    assert ledger.invalid_grants == 0
    # (concurrent_uses is not asserted: the killed request's handler is still asleep in the
    # fake IdP, holding the same token "in flight", while the successor's retry arrives.)
    row = read_rows(db)["ts-0000"]
    assert row["state"] == "active" and row["invalid_reason"] is None
    assert row["refresh_token"] != line["refresh_token"]
    assert ledger.is_live(row["refresh_token"])
    assert ledger.family_has_live_token(ledger.family_of(row["refresh_token"]))
    assert metric(successor.metrics(), "refresherd_invalidations_total") == 0
    assert successor.stop() == 0


def test_sighup_reloads_a_valid_config_and_keeps_the_old_one_if_invalid(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory(access_token_lifetime=6, grace_period=5)
    path = tmp_path / "c.toml"

    def configure(**kw: Any) -> Path:
        return write_config(path, database=db, providers={"p": idp.provider()}, **kw)

    configure(log_level="info")
    import_tokens(path, idp.token_lines("p", 4, with_access_token=False))
    daemon = daemons(path)
    daemon.wait_for_event("refresh", outcome="refreshed", count=4)

    def lines_after(event: str, nth: int = 0) -> list[dict[str, Any]]:
        lines = daemon.lines()
        marks = [i for i, line in enumerate(lines) if line.get("event") == event]
        return lines[marks[nth] + 1 :]

    def refreshes_continue(by: int = 4) -> None:
        target = idp.ledger.refreshes + by
        wait_until(lambda: idp.ledger.refreshes >= target, what="refreshes to go on")

    # A valid change: the log level goes to warning. The reload is announced, then applied.
    configure(log_level="warning")
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_event("config reloaded")
    refreshes_continue()
    assert not [ln for ln in lines_after("config reloaded") if ln.get("level") == "info"]
    assert metric(daemon.metrics(), "refresherd_config_reloads_total", result="ok") == 1

    # An invalid one: the running config stays, the error names the file and the key.
    path.write_text(
        path.read_text().replace("[daemon]\n", '[daemon]\nconcurrency = "lots"\n', 1),
        encoding="utf-8",
    )
    daemon.send_signal(signal.SIGHUP)
    [failed] = daemon.wait_for_event("reload failed, keeping the running config")
    assert str(path) in failed["error"] and "daemon.concurrency" in failed["error"]
    refreshes_continue()
    assert daemon.running()
    assert not [
        ln
        for ln in lines_after("reload failed, keeping the running config")
        if ln.get("level") == "info"
    ]
    assert metric(daemon.metrics(), "refresherd_config_reloads_total", result="error") == 1

    # Back to info: refresh lines come back.
    configure(log_level="info")
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_event("config reloaded", count=2)
    wait_until(
        lambda: [ln for ln in lines_after("config reloaded", 1) if ln.get("event") == "refresh"],
        what="info-level refresh lines after the second reload",
    )
    assert_ledger_clean(idp)
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- HTTP


CONTRACT = {
    "refresherd_refresh_success_total": {"provider"},
    "refresherd_refresh_failures_total": {"provider", "reason"},
    "refresherd_invalidations_total": {"provider", "reason"},
    "refresherd_refresh_duration_seconds_bucket": {"provider", "le"},
    "refresherd_refresh_duration_seconds_sum": {"provider"},
    "refresherd_refresh_duration_seconds_count": {"provider"},
    "refresherd_token_sets": {"provider", "state"},
    "refresherd_token_sets_expired": {"provider"},
    "refresherd_singleflight_coalesced_total": set(),
    "refresherd_grace_retries_total": {"provider"},
}


def test_health_readiness_and_the_metrics_contract(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory()
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    lines = idp.token_lines("p", 3, with_access_token=False)
    import_tokens(config, lines)
    idp.idp.revoke(str(lines[0]["refresh_token"]))  # one failure and one invalidation, too
    daemon = daemons(config)
    wait_until(lambda: idp.ledger.refreshes == 2 and idp.ledger.invalid_grants == 1)

    health = daemon.get("/healthz")
    assert health.status_code == 200, health.text
    ready = daemon.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"

    response = daemon.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples = parse_metrics(text)
    for name, label_names in CONTRACT.items():
        found = [dict(labels) for sample, labels in samples if sample == name]
        assert found, f"{name} missing from /metrics"
        for labels in found:
            assert set(labels) == label_names, (name, labels)
    assert "# TYPE refresherd_refresh_duration_seconds histogram" in text
    ids = {str(line["id"]) for line in lines}
    for (name, labels), _ in samples.items():
        for key, value in labels:
            assert value not in ids, f"{name} has a token-set id as label {key}"
    wait_until(
        lambda: metric(daemon.metrics(), "refresherd_refresh_success_total", provider="p") == 2
    )
    assert metric(text, "refresherd_invalidations_total", provider="p", reason="invalid_grant") == 1

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (CI installs it): cannot lint /metrics")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- failure rows


def test_invalid_grant_invalidates_the_token_set_once(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory()
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    lines = idp.token_lines("p", 2, with_access_token=False)
    import_tokens(config, lines)
    idp.idp.revoke(str(lines[0]["refresh_token"]))  # e.g. the customer revoked our access
    daemon = daemons(config)
    wait_until(lambda: read_rows(db)["ts-0000"]["state"] == "invalidated")
    wait_until(lambda: read_rows(db)["ts-0001"]["version"] == 2)

    shown = run_cli(config, "tokens", "show", "ts-0000", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "invalidated"
    assert data["invalid_reason"] == "invalid_grant"
    assert "invalid_grant" in data["last_error"]
    text = daemon.metrics()
    assert metric(text, "refresherd_invalidations_total", provider="p", reason="invalid_grant") == 1
    assert metric(text, "refresherd_invalidations_total") == 1

    time.sleep(2.0)  # it is not retried
    assert idp.ledger.invalid_grants == 1
    about = [line for line in daemon.lines() if "ts-0000" in json.dumps(line)]
    assert len(about) == 1, about
    assert about[0]["level"] == "error" and about[0]["outcome"] == "invalidated"
    assert read_rows(db)["ts-0001"]["state"] == "active"
    assert daemon.stop() == 0


def test_invalid_client_opens_the_circuit_and_leaves_token_sets_alone(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory()
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers={"p": idp.provider()},
        schedule={"circuit_backoff_initial": "1s", "circuit_backoff_max": "2s"},
    )
    lines = idp.token_lines("p", 3, with_access_token=False)
    import_tokens(config, lines)
    before = read_rows(db)
    original_secret = idp.client_secret
    idp.rotate_client_secret()  # our configured secret is now wrong
    daemon = daemons(config)

    wait_until(
        lambda: metric(daemon.metrics(), "refresherd_provider_circuit_open", provider="p") == 1,
        what="the provider circuit to open",
    )
    assert idp.ledger.invalid_clients >= 1
    assert idp.ledger.refreshes == 0
    assert daemon.events("provider circuit open: the IdP refused our client credentials")
    time.sleep(2.0)
    after = read_rows(db)
    for token_set_id, row in before.items():
        untouched = ("state", "version", "refresh_token", "access_token", "failures")
        for column in (*untouched, "invalid_reason"):
            assert after[token_set_id][column] == row[column], (token_set_id, column)
        # Noting the provider's error on the row is allowed; nothing else changes.
        error = after[token_set_id]["last_error"]
        assert error is None or error.startswith("invalid_client"), error
    assert metric(daemon.metrics(), "refresherd_invalidations_total") == 0

    # The operator fixes the credentials at the IdP side: the next probe closes the circuit.
    idp.idp.set_client_secret(idp.client_id, original_secret)
    wait_until(lambda: all(r["version"] == 2 for r in read_rows(db).values()), what="recovery")
    assert metric(daemon.metrics(), "refresherd_provider_circuit_open", provider="p") == 0
    assert_ledger_clean(idp)
    assert daemon.stop() == 0


def test_idp_down_backs_off_then_recovers(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory(serve=False, port=free_port())  # nothing listens there yet
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers={"p": idp.provider()},
        schedule={"backoff_initial": "1s", "backoff_max": "3s"},
    )
    import_tokens(config, idp.token_lines("p", 2, with_access_token=False))
    daemon = daemons(config)

    def failures() -> list[dict[str, Any]]:
        return daemon.events("refresh", token_set="ts-0000", outcome="failed")

    wait_until(lambda: len(failures()) >= 3, what="three failed attempts")
    rows = read_rows(db)
    for row in rows.values():
        assert row["state"] == "failing" and row["version"] == 1
        assert row["failures"] >= 1 and row["last_error"]
    # Backoff, not a tight loop: attempts are at least half the initial backoff apart.
    stamps = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in failures()]
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(stamps)), stamps
    assert metric(daemon.metrics(), "refresherd_invalidations_total") == 0

    idp.start()  # the IdP is back on the same port
    wait_until(
        lambda: all(r["state"] == "active" and r["version"] == 2 for r in read_rows(db).values()),
        what="recovery after the IdP returned",
    )
    assert_ledger_clean(idp)
    assert daemon.stop() == 0


def test_expired_token_sets_gauge_counts_sets_past_expiry_until_refreshed(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory(serve=False, port=free_port())  # down: nothing gets refreshed yet
    other = idp_factory("other")
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers={"p": idp.provider(), "q": other.provider()},
        schedule={"backoff_initial": "1s", "backoff_max": "2s"},
    )
    lines = idp.token_lines("p", 3)
    for line in lines[:2]:  # two whose access token expired a minute ago; one still fresh
        del line["expires_in"]
        line["expires_at"] = time.time() - 60
    import_tokens(config, lines)
    daemon = daemons(config)

    def expired(provider: str) -> float:
        return metric(daemon.metrics(), "refresherd_token_sets_expired", provider=provider)

    wait_until(lambda: expired("p") == 2, what="two expired token sets in the gauge")
    text = daemon.metrics()
    assert 'refresherd_token_sets_expired{provider="q"} 0.0' in text
    # Set by the same periodic task, without anyone asking /readyz.
    assert metric(text, "refresherd_ready") == 1
    # Invalidation series exist from the start, so increase() (alerts) sees the first one.
    for reason in ("invalid_grant", "invalid_grant_after_unresolved_attempt"):
        assert f'refresherd_invalidations_total{{provider="q",reason="{reason}"}} 0.0' in text

    idp.start()
    wait_until(lambda: expired("p") == 0, what="the gauge to drop once they were refreshed")
    rows = read_rows(db)
    assert rows["ts-0000"]["version"] >= 2 and rows["ts-0001"]["version"] >= 2
    assert daemon.stop() == 0


def test_a_token_set_added_while_running_is_refreshed_promptly(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory()
    # A long poll interval: only the daemon noticing the new row can make this prompt.
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers={"p": idp.provider()},
        daemon={"poll_interval": "60s"},
    )
    import_tokens(config, idp.token_lines("p", 1, prefix="old"))
    daemon = daemons(config)
    daemon.wait_for_event("listening")
    time.sleep(1.0)  # the scheduler is asleep now

    response = dict(idp.idp.issue(user="new"))
    del response["access_token"], response["expires_in"]
    added = run_cli(config, "tokens", "add", "new", "--provider", "p", input=json.dumps(response))
    assert added.returncode == 0, added.stderr
    wait_until(lambda: read_rows(db)["new"]["version"] == 2, timeout=15, what="a prompt refresh")
    assert read_rows(db)["old-0000"]["version"] == 1
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- start-up errors


def test_bad_config_at_start_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{tmp_path / "t.db"}"\nconcurency = 4\n', encoding="utf-8"
    )
    proc = subprocess.run(
        refresherd_argv(config, "run"), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 78
    assert str(config) in proc.stderr
    assert "daemon.concurency" in proc.stderr
    assert '"concurrency"' in proc.stderr  # the suggestion
    assert not (tmp_path / "t.db").exists()


@pytest.mark.parametrize("kind", ["missing_directory", "a_directory", "not_a_database"])
def test_unusable_database_is_a_clear_error(
    tmp_path: Path, kind: str, idp_factory: IdPFactory
) -> None:
    idp = idp_factory(serve=False, port=free_port())
    if kind == "missing_directory":
        db = tmp_path / "nowhere" / "tokens.db"
    elif kind == "a_directory":
        db = tmp_path / "tokens.db"
        db.mkdir()
    else:
        db = tmp_path / "tokens.db"
        db.write_bytes(b"this is not an SQLite database\n" * 200)
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(config, log).start(wait_listening=False)
    code = daemon.wait_exit()
    assert code != 0
    errors = [line for line in daemon.lines() if line.get("level") == "error"]
    assert errors, daemon.log_text()
    assert any(str(db) in json.dumps(line) for line in errors), daemon.log_text()
    assert any("database" in str(line.get("event")) for line in errors), daemon.log_text()
