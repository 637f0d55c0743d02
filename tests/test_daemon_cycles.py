"""The daemon over many refresh cycles, once per backend: the real ``refresherd run`` process (or
two on one database), a real FakeIdP on loopback. A file of its own so that these minute-long
runs go to another test worker than the rest of tests/test_daemon.py."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    Daemons,
    Database,
    IdPFactory,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    write_config,
)
from test_daemon import (
    assert_ledger_clean,
    assert_stored_tokens_are_the_live_ones,
    refreshed_events,
    wait_quiet_equal,
)

# --------------------------------------------------------------------------- many cycles


@pytest.mark.slow
def test_keeps_200_token_sets_fresh_over_several_cycles(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    fast = idp_factory("fast", access_token_lifetime=20, grace_period=5)
    slow = idp_factory("slow", access_token_lifetime=30, grace_period=5)
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"fast": fast.provider(), "slow": slow.provider()},
    )
    import_tokens(
        config,
        fast.token_lines("fast", 100, prefix="fast") + slow.token_lines("slow", 100, prefix="slow"),
    )
    daemon = daemons(config)

    run_for = 60.0
    started = time.monotonic()
    checks = 0
    while time.monotonic() - started < run_for:
        rows = read_rows(db)
        now = time.time()
        assert len(rows) == 200
        for token_set_id, row in rows.items():
            assert row["state"] == "active", (token_set_id, row["last_error"])
            assert row["expires_at"] > now, (
                f"{token_set_id} expired {now - row['expires_at']:.1f}s ago"
            )
        checks += 1
        assert daemon.running(), daemon.tail()
        time.sleep(1.0)
    assert checks >= 10

    rows = read_rows(db)
    versions = Counter(row["version"] for row in rows.values())
    # version 1 is the imported grant; each refresh adds one.
    assert min(versions) >= 3, f"some token set was refreshed fewer than twice: {versions}"

    text = daemon.metrics()
    ledger_total = lambda: fast.ledger.refreshes + slow.ledger.refreshes  # noqa: E731
    counted = wait_quiet_equal(
        ledger_total, lambda: metric(daemon.metrics(), "refresherd_refresh_success_total")
    )
    assert counted >= 200 * 2
    assert metric(text, "refresherd_token_sets", state="active") == 200
    assert metric(text, "refresherd_token_sets", provider="fast", state="active") == 100
    assert metric(text, "refresherd_token_sets", provider="slow", state="active") == 100
    assert metric(text, "refresherd_token_sets", state="invalidated") == 0

    assert daemon.stop() == 0
    stopped = time.monotonic()
    rows = read_rows(db)
    for handle in (fast, slow):
        assert_ledger_clean(handle)
    assert len(refreshed_events(daemon)) == ledger_total()

    listed = json.loads(run_cli(config, "tokens", "list", "--json").stdout)
    assert len(listed) == 200
    assert {item["state"] for item in listed} == {"active"}
    assert all(item["expires_at"].endswith("Z") for item in listed)

    # Let the last grace windows close, then each family must hold exactly the stored token.
    time.sleep(max(0.0, 5.5 - (time.monotonic() - stopped)))
    assert_stored_tokens_are_the_live_ones(fast, rows, users=[u for u in rows if u < "g"])
    assert_stored_tokens_are_the_live_ones(slow, rows, users=[u for u in rows if u > "g"])


@pytest.mark.slow
def test_two_daemons_on_one_database(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    idp = idp_factory(access_token_lifetime=10, grace_period=5)
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"p": idp.provider()},
        daemon={"concurrency": 8, "poll_interval": "500ms"},
    )
    import_tokens(config, idp.token_lines("p", 100))
    first = daemons(config, "first")
    second = daemons(config, "second")

    started = time.monotonic()
    while time.monotonic() - started < 30:
        assert first.running(), first.tail()
        assert second.running(), second.tail()
        rows = read_rows(db)
        assert {row["state"] for row in rows.values()} == {"active"}
        time.sleep(1.0)

    assert first.stop() == 0
    assert second.stop() == 0
    stopped = time.monotonic()
    rows = read_rows(db)
    assert_ledger_clean(idp)
    assert {row["state"] for row in rows.values()} == {"active"}
    assert min(row["version"] for row in rows.values()) >= 3
    by_first, by_second = len(refreshed_events(first)), len(refreshed_events(second))
    assert by_first > 0 and by_second > 0, (by_first, by_second)
    # One IdP request per refresh, but for a second send of the same token: a hedge beside a
    # send answered late (a loaded machine) or a send again after a timeout; each is a line.
    again = sum(
        len(d.events(e)) for d in (first, second) for e in ("refresh hedge", "refresh retry")
    )
    assert by_first + by_second + again == idp.ledger.refreshes, again
    assert again <= 0.05 * idp.ledger.refreshes, again
    time.sleep(max(0.0, 5.5 - (time.monotonic() - stopped)))
    assert_stored_tokens_are_the_live_ones(idp, rows, users=sorted(rows))
