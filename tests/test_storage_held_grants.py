"""Grants held in memory while the database refuses them for longer than the persist deadline,
and across a shutdown: the slow cases of tests/test_storage_faults.py, in a file of their own so
that the test workers share them out (each waits out real lock and persist timeouts)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import Daemons, IdPFactory, metric, read_rows, wait_until
from test_storage_faults import (
    HELD,
    RESUMED,
    SETS,
    HeldLock,
    assert_nothing_lost,
    hold_a_grant,
    readyz,
    start_daemon,
)

from refresherd.refresh.grants import PERSIST_DEADLINE
from refresherd.storage_health import PROBE_INITIAL, probe_delay
from refresherd.store.sqlite import BUSY_TIMEOUT_MS
from refresherd.testing import FaultKind


@pytest.mark.slow
def test_a_grant_refused_for_longer_than_the_persist_deadline_is_held_until_stored(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """A grant arrives while another process holds the write lock, and keeps holding it for
    longer than PERSIST_DEADLINE: the rotated token exists only in the daemon's memory. The
    daemon holds it (and says so) until the database takes it, then carries on with it."""
    db = tmp_path / "tokens.db"
    idp, daemon = start_daemon(tmp_path, db, idp_factory, daemons, grace=10)
    lock = HeldLock(db)
    # The IdP rotates at once and answers 2 s later: the lock is taken while the answer is out.
    idp.faults.add(FaultKind.SLOW, delay=2.0, process_first=True)
    wait_until(
        lambda: idp.ledger.faults_injected.get("slow", 0) >= 1, what="the slow request to arrive"
    )
    try:
        lock.break_()
        daemon.wait_for_event(HELD)
        wait_until(
            lambda: metric(daemon.metrics(), "refresherd_unpersisted_grants") == 1,
            what="the held grant in the gauge",
        )
        status, problems = readyz(daemon)
        assert status == 503
        assert any("1 received grant(s) held in memory" in p for p in problems), problems
        # Outlast the deadline after which a process that does not hold grants gives up: the
        # fifth probe fails no sooner than its four predecessors' delays plus five busy
        # timeouts after the pause began (1 + 2 + 4 + 8 + 5 * 5 = 40 s).
        wait_until(
            lambda: (
                metric(daemon.metrics(), "refresherd_storage_probes_total", result="failed") >= 5
            ),
            timeout=PERSIST_DEADLINE * 4,
            what="the lock to outlast the persist deadline",
        )
        outlasted = PROBE_INITIAL + sum(probe_delay(n) for n in range(1, 4))
        assert outlasted + 5 * BUSY_TIMEOUT_MS / 1000 > PERSIST_DEADLINE
        dropped = [
            e for e in daemon.lines() if str(e.get("event")).startswith("grant not persisted")
        ]
        assert not dropped, dropped
        assert metric(daemon.metrics(), "refresherd_unpersisted_grants") == 1
    finally:
        lock.repair()
    daemon.wait_for_event(RESUMED)
    wait_until(
        lambda: metric(daemon.metrics(), "refresherd_unpersisted_grants") == 0,
        what="the held grant to be stored",
    )
    # The stored grant is the live chain: the next refreshes present it and are accepted.
    refreshed = idp.ledger.refreshes
    wait_until(lambda: idp.ledger.refreshes >= refreshed + SETS, what="refreshes to resume")
    assert daemon.stop() == 0
    assert_nothing_lost(idp, db)


@pytest.mark.slow
def test_a_held_grant_lost_at_shutdown_is_recovered_from_the_journal_inside_grace(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """Exhaustion: SIGTERM, and storage refuses the held grant for PERSIST_DEADLINE more. The
    grant is lost from memory (a critical line says so); the journal entry is not. The next
    start retries the old refresh token first, inside the IdP's grace window: it is accepted
    again and nothing is lost."""
    db = tmp_path / "tokens.db"
    idp, daemon = start_daemon(tmp_path, db, idp_factory, daemons, grace=300)
    lock = HeldLock(db)
    try:
        hold_a_grant(idp, daemon, lock)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=PERSIST_DEADLINE * 4) == 0
    finally:
        lock.repair()
    # The slow answer's grant, and any other refresh's whose answer came back while the lock
    # was held (on a busy machine, one of the other sets' may be in flight then too).
    lost = [e for e in daemon.lines() if str(e.get("event")).startswith("grant not persisted")]
    assert lost and all(e["level"] == "critical" for e in lost), lost
    assert len({e["token_set"] for e in lost}) == len(lost), lost  # each set's once
    journaled = {r["id"] for r in read_rows(db).values() if r["attempt_started_at"] is not None}
    assert journaled == {e["token_set"] for e in lost}
    reuses = idp.ledger.reuses_in_grace
    config = tmp_path / "refresherd.toml"
    again = daemons(config, "again")
    for token_set_id in sorted(journaled):
        again.wait_for_event("recovering unresolved attempt", token_set=token_set_id)
        again.wait_for_event("refresh", token_set=token_set_id, outcome="refreshed")
    assert idp.ledger.reuses_in_grace == reuses + len(journaled)
    assert again.stop() == 0
    assert_nothing_lost(idp, db)
