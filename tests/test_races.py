"""Races between processes on one database: three daemons and `refresherd refresh ID` from the
CLI at once, and a daemon paused (SIGSTOP) past its lease, then resumed. The IdP's ledger is the
judge: no refresh token presented twice at the same time, none spent outside its grace window,
nothing invalidated, and the stored grant is always the newest."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
    write_config,
)

from refresherd.testing import FaultKind

LEASE = "3s"
GRACE = 5.0


def assert_ledger_clean(handle: IdPHandle) -> None:
    ledger = handle.ledger
    assert ledger.concurrent_uses == 0, ledger.snapshot()
    assert ledger.reuses_outside_grace == 0, ledger.snapshot()
    assert ledger.invalid_grants == 0, ledger.snapshot()


def assert_only_the_stored_token_is_live(handle: IdPHandle, db: Path) -> dict[str, Any]:
    """Once every grace window is over, each authorization has exactly one live refresh token,
    and it is the stored one: nothing lost, nothing spare, the stored grant is the newest."""
    rows = read_rows(db)
    for token_set_id, row in rows.items():
        assert row["state"] == "active", (token_set_id, row["invalid_reason"])
        assert handle.ledger.live_refresh_tokens(token_set_id) == {row["refresh_token"]}, (
            token_set_id
        )
    return rows


def owner_of(daemon: DaemonProcess) -> str:
    [started] = daemon.wait_for_event("refresherd started")
    owner = started.get("owner")
    assert isinstance(owner, str), started
    return owner


@pytest.mark.slow
def test_three_daemons_and_cli_refreshes_never_present_one_token_twice(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(access_token_lifetime=6, grace_period=GRACE)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"p": idp.provider()},
        daemon={"concurrency": 4, "poll_interval": "200ms", "lease_duration": LEASE},
    )
    import_tokens(config, idp.token_lines("p", 24))
    ids = sorted(read_rows(db))
    trio = [daemons(config, name) for name in ("a", "b", "c")]

    # Three CLI callers refresh random sets, as an operator or a cron job would, while the
    # daemons refresh the same sets on their own schedule (6 s tokens: every few seconds).
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            proc = run_cli(config, "refresh", rng.choice(ids))
            outcome = json.loads(proc.stdout)["outcome"] if proc.stdout.strip() else "none"
            with lock:
                outcomes[f"{proc.returncode}:{outcome}"] += 1

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for thread in callers:
        thread.start()
    seen: dict[str, int] = {}
    try:
        started = time.monotonic()
        while time.monotonic() - started < 30:
            for token_set_id, row in read_rows(db).items():
                # A stored grant is never replaced by an older one.
                assert row["version"] >= seen.get(token_set_id, 0), token_set_id
                seen[token_set_id] = row["version"]
            assert all(d.running() for d in trio)
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in callers:
            thread.join()
    for daemon in trio:
        assert daemon.stop() == 0
    stopped = time.monotonic()

    print("CLI outcomes:", dict(outcomes), "ledger:", idp.ledger.snapshot())
    # Every CLI call either refreshed the set or found it leased/adopted: nothing else.
    assert set(outcomes) <= {"0:refreshed", "0:adopted", "75:leased"}, outcomes
    assert outcomes["0:refreshed"] >= 5, outcomes
    assert all(refreshed_by(d) > 0 for d in trio), [refreshed_by(d) for d in trio]
    assert_ledger_clean(idp)
    assert idp.ledger.reuses_in_grace == 0
    rows = read_rows(db)
    # Every grant the IdP handed out was stored (none thrown away): versions count them all.
    assert sum(row["version"] - 1 for row in rows.values()) == idp.ledger.refreshes
    time.sleep(max(0.0, GRACE + 0.5 - (time.monotonic() - stopped)))
    assert_only_the_stored_token_is_live(idp, db)


def refreshed_by(daemon: DaemonProcess) -> int:
    return len(daemon.events("refresh", outcome="refreshed"))


def paused_setup(
    tmp_path: Path, idp_factory: IdPFactory, *, lease: str = LEASE
) -> tuple[IdPHandle, Path, Path, dict[str, object]]:
    # Hour-long access tokens: the only refresh is the one the test starts (imported without
    # an access token, the set is due at once).
    idp = idp_factory(access_token_lifetime=3600, grace_period=GRACE)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"p": idp.provider()},
        daemon={"poll_interval": "200ms", "lease_duration": lease},
    )
    [line] = idp.token_lines("p", 1, with_access_token=False)
    import_tokens(config, [line])
    return idp, db, config, line


@pytest.mark.slow
@pytest.mark.parametrize("lease", ["3s", "8s"])
def test_a_paused_daemons_processed_request_is_not_spent_again_by_others(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, lease: str
) -> None:
    """The IdP rotated the token and answered a daemon that is paused: that daemon holds the
    only copy of the new token. The others must not present the old one, neither inside the
    grace window (its lease lapses first: 3 s) nor after it (8 s: a reuse outside grace, the
    token set invalidated). On SIGCONT the paused daemon reads the answer that waited in its
    socket, although its request timeout has passed meanwhile, and stores it."""
    idp, db, config, line = paused_setup(tmp_path, idp_factory, lease=lease)
    # Rotated at once, answered 1 s later (within the attempt's timeout).
    idp.faults.add(FaultKind.SLOW, delay=1.0, process_first=True)
    paused = daemons(config, "paused")
    wait_until(lambda: idp.ledger.refreshes == 1, interval=0.02, what="the IdP to rotate")
    paused.send_signal(signal.SIGSTOP)
    try:
        others = [daemons(config, name) for name in ("b", "c")]
        # Past the lease (3 s) and the grace window (5 s from the send).
        time.sleep(GRACE * 2)
        assert idp.ledger.requests == 1, idp.ledger.snapshot()
        row = read_rows(db)["ts-0000"]
        assert row["version"] == 1 and row["attempt_owner"] == owner_of(paused)
        assert all(d.running() for d in others)
    finally:
        paused.send_signal(signal.SIGCONT)
    wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="the resumed daemon's grant")
    # A stale send, were there one, would follow at once; the old token's grace window ends.
    time.sleep(GRACE + 0.5)
    assert idp.ledger.requests == 1 and idp.ledger.refreshes == 1, idp.ledger.snapshot()
    assert_ledger_clean(idp)
    rows = assert_only_the_stored_token_is_live(idp, db)
    assert rows["ts-0000"]["refresh_token"] != line["refresh_token"]
    for daemon in (paused, *others):
        assert metric(daemon.metrics(), "refresherd_invalidations_total") == 0
        assert daemon.stop() == 0


@pytest.mark.slow
def test_a_daemon_paused_after_a_503_leaves_the_set_to_the_others(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """A 503 with Retry-After consumed nothing: the set is rescheduled as told and its lease
    released, so while its daemon is paused the others refresh it once the wait is over, and
    on SIGCONT the paused one sends nothing stale."""
    idp, db, config, line = paused_setup(tmp_path, idp_factory)
    idp.faults.add(FaultKind.RETRY_AFTER, retry_after=2.0)
    paused = daemons(config, "paused")
    wait_until(
        lambda: idp.ledger.faults_injected.get("retry_after") == 1,
        interval=0.02,
        what="the 503 with Retry-After",
    )
    paused.send_signal(signal.SIGSTOP)
    try:
        others = [daemons(config, name) for name in ("b", "c")]
        wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="the others' refresh")
    finally:
        paused.send_signal(signal.SIGCONT)
    time.sleep(GRACE + 0.5)
    assert idp.ledger.requests == 2 and idp.ledger.refreshes == 1, idp.ledger.snapshot()
    assert_ledger_clean(idp)
    rows = assert_only_the_stored_token_is_live(idp, db)
    assert rows["ts-0000"]["refresh_token"] != line["refresh_token"]
    for daemon in (paused, *others):
        assert metric(daemon.metrics(), "refresherd_invalidations_total") == 0
        assert daemon.stop() == 0


def test_a_daemon_paused_inside_a_grace_window_sends_nothing_after_it(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """The IdP rotated the token and the answer was lost; the daemon is paused while it waits
    to send again inside the window, and stays paused until the window has closed. The others
    keep away from the journaled token while the paused process lives; on SIGCONT, its next
    send is refused by the journal (a missed window, never a reuse outside grace): the set is
    invalidated as grace_window_missed, and nothing more is sent."""
    idp, db, config, _line = paused_setup(tmp_path, idp_factory)
    idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
    paused = daemons(config, "paused")
    wait_until(lambda: idp.ledger.requests == 1, interval=0.005, what="the lost answer")
    paused.send_signal(signal.SIGSTOP)
    try:
        others = [daemons(config, name) for name in ("b", "c")]
        time.sleep(GRACE * 2)
        assert idp.ledger.requests == 1, idp.ledger.snapshot()
    finally:
        paused.send_signal(signal.SIGCONT)
    wait_until(lambda: read_rows(db)["ts-0000"]["state"] == "invalidated", what="the missed window")
    time.sleep(1.0)
    row = read_rows(db)["ts-0000"]
    assert row["invalid_reason"] == "grace_window_missed", row
    ledger = idp.ledger
    assert ledger.requests == 1 and ledger.reuses_outside_grace == 0, ledger.snapshot()
    missed = [e for d in (paused, *others) for e in d.events("grace window missed")]
    assert len(missed) == 1 and missed[0]["sends"] == 1, missed
    for daemon in (paused, *others):
        assert daemon.stop() == 0
