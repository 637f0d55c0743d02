"""Storage faults on a running daemon: real faults, a real ``refresherd run`` process, a real
FakeIdP. While the database refuses writes, no refresh token may leave (the journal comes first);
the daemon pauses, says why (log, /readyz, metrics), probes, and resumes by itself; nothing is
lost. Disk full and an immutable file need root (a tmpfs mount, ``chattr``); the held lock does
not. Conditions are polled, never timed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
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
    wait_until,
    write_config,
)

from refresherd.store.sqlite import JOURNAL_SIZE_LIMIT
from refresherd.testing import FaultKind

PAUSED = "storage refuses writes: refreshes paused until a probe write succeeds"
RESUMED = "storage takes writes again: refreshes resume"
HELD = "cannot persist grant, holding it and retrying"
SETS = 4


def _root_only(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (a tmpfs mount or chattr); run the suite as root")


# --------------------------------------------------------------------------- the faults


class HeldLock:
    """Another process holds the write lock (``BEGIN IMMEDIATE``) far beyond the busy timeout."""

    reason = "locked"

    def __init__(self, db: Path) -> None:
        self.db = db
        self.conn: sqlite3.Connection | None = None

    def break_(self) -> None:
        self.conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        self.conn.execute("BEGIN IMMEDIATE")

    def repair(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


class DiskFull:
    """The file system holding the database has no free block left (a small tmpfs, filled)."""

    reason = "full"

    def __init__(self, db: Path) -> None:
        self.db = db
        self.filler = db.parent / "filler"

    def break_(self) -> None:
        # An empty WAL: the daemon's next commits must grow the file, and cannot.
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * chunk):
                        pass
        finally:
            os.close(fd)

    def repair(self) -> None:
        self.filler.unlink(missing_ok=True)


class Immutable:
    """The database and its WAL made immutable (``chattr +i``): every write to the open files
    fails with EPERM, as writes to a file system remounted read-only fail with EROFS."""

    reason = "io_error"

    def __init__(self, db: Path) -> None:
        # Not the -shm file: it is mapped into memory, and a write to it would be a SIGBUS.
        self.files = [db, Path(f"{db}-wal")]

    def break_(self) -> None:
        for path in self.files:
            subprocess.run(["chattr", "+i", str(path)], check=True)

    def repair(self) -> None:
        for path in self.files:
            subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (root only), lazily unmounted at the end."""
    _root_only("a full disk")
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _chattr_works(directory: Path) -> bool:
    probe = directory / "chattr-probe"
    probe.write_bytes(b"")
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, check=False)
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True, check=False)
    probe.unlink()
    return ok.returncode == 0


# --------------------------------------------------------------------------- helpers


def start_daemon(
    tmp_path: Path, db: Path, idp_factory: IdPFactory, daemons: Daemons, *, grace: float = 10
) -> tuple[IdPHandle, DaemonProcess]:
    idp = idp_factory(access_token_lifetime=6, grace_period=grace)
    config = write_config(
        tmp_path / "refresherd.toml", database=db, providers={"idp": idp.provider()}
    )
    import_tokens(config, idp.token_lines("idp", SETS))
    daemon = daemons(config)
    wait_until(lambda: idp.ledger.refreshes >= SETS, what="a first round of refreshes")
    return idp, daemon


def readyz(daemon: DaemonProcess) -> tuple[int, list[str]]:
    response = daemon.get("/readyz")
    return response.status_code, list(response.json()["problems"])


def storage_problem(daemon: DaemonProcess, reason: str) -> list[str] | None:
    status, problems = readyz(daemon)
    wanted = f"storage: the database refuses writes ({reason})"
    hits = [p for p in problems if p.startswith(wanted)]
    return hits if status == 503 and hits else None


def assert_nothing_lost(idp: IdPHandle, db: Path) -> None:
    rows = read_rows(db)
    assert len(rows) == SETS
    for token_set_id, row in rows.items():
        assert row["state"] == "active", (token_set_id, row["last_error"])
        assert idp.ledger.is_live(row["refresh_token"]), f"{token_set_id}: stored token is dead"
    assert idp.ledger.invalid_grants == 0, idp.ledger.snapshot()
    assert idp.ledger.reuses_outside_grace == 0, idp.ledger.snapshot()
    assert idp.ledger.concurrent_uses == 0, idp.ledger.snapshot()


# --------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("fault", ["locked", "full", "io_error"])
def test_storage_fault_pauses_refreshes_and_they_resume_with_nothing_lost(
    fault: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    breaker: Any
    if fault == "full":
        db = request.getfixturevalue("tmpfs") / "tokens.db"
    else:
        db = tmp_path / "tokens.db"
    if fault == "io_error":
        _root_only("an immutable database file")
        if not _chattr_works(tmp_path):
            pytest.skip("this file system does not support chattr +i")
    idp, daemon = start_daemon(tmp_path, db, idp_factory, daemons)
    breaker = {"locked": HeldLock, "full": DiskFull, "io_error": Immutable}[fault](db)
    try:
        breaker.break_()
        # Paused, and why: one log line, the reason as metric label, /readyz.
        (paused,) = daemon.wait_for_event(PAUSED)
        assert paused["reason"] == fault, paused
        assert paused["level"] == "error"
        wait_until(lambda: storage_problem(daemon, fault), what="/readyz to name the fault")
        text = daemon.metrics()
        assert metric(text, "refresherd_storage_writable") == 0
        assert metric(text, "refresherd_storage_pauses_total", reason=fault) == 1
        # From the pause on, no request reaches the IdP while probes keep failing.
        requests = idp.ledger.requests
        wait_until(
            lambda: (
                metric(daemon.metrics(), "refresherd_storage_probes_total", result="failed") >= 2
            ),
            what="two failed probes",
        )
        assert idp.ledger.requests == requests
        assert len(daemon.events(PAUSED)) == 1, "the pause is logged once"
    finally:
        breaker.repair()
    refreshed = idp.ledger.refreshes
    (resumed,) = daemon.wait_for_event(RESUMED)
    wait_until(lambda: readyz(daemon)[0] == 200, what="/readyz to be 200 again")
    text = daemon.metrics()
    assert metric(text, "refresherd_storage_writable") == 1
    # Whichever write the database took first ended the pause: a probe, or a held grant.
    assert resumed["via"] in ("probe", "grant"), resumed
    if resumed["via"] == "probe":
        assert metric(text, "refresherd_storage_probes_total", result="ok") >= 1
    wait_until(lambda: idp.ledger.refreshes >= refreshed + SETS, what="refreshes to resume")
    assert daemon.stop() == 0
    assert_nothing_lost(idp, db)


def test_a_long_lived_reader_lets_the_wal_grow_and_it_is_bounded_after(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """A reader that keeps one snapshot open blocks every checkpoint: the WAL grows. The daemon
    keeps refreshing meanwhile; once the reader goes, a checkpoint completes and the WAL file is
    truncated back to the journal size limit."""
    idp = idp_factory(access_token_lifetime=4, grace_period=5)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"idp": idp.provider()},
        schedule={"min_interval": "1s"},
    )
    import_tokens(config, idp.token_lines("idp", 60))
    daemon = daemons(config)
    wal = Path(f"{db}-wal")
    reader = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM token_sets").fetchone()
        wait_until(
            lambda: wal.stat().st_size > JOURNAL_SIZE_LIMIT,
            timeout=300,
            what="the WAL to grow past the journal size limit behind the reader",
        )
        # Still refreshing, still ready: a growing WAL is not a fault.
        refreshed = idp.ledger.refreshes
        wait_until(lambda: idp.ledger.refreshes > refreshed + 10, what="refreshes to go on")
        assert readyz(daemon)[0] == 200
        assert metric(daemon.metrics(), "refresherd_storage_writable") == 1
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    wait_until(
        lambda: wal.stat().st_size <= JOURNAL_SIZE_LIMIT,
        what="the WAL to be checkpointed and truncated",
    )
    wait_until(
        lambda: 0 < metric(daemon.metrics(), "refresherd_database_wal_bytes") <= JOURNAL_SIZE_LIMIT,
        what="the WAL size gauge to follow",
    )
    assert daemon.stop() == 0
    rows = read_rows(db)
    assert all(row["state"] == "active" for row in rows.values())
    assert idp.ledger.invalid_grants == 0


def test_a_daemon_started_on_an_unwritable_database_says_so_and_exits(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """Start-up is the one place a storage fault is fatal: the migrations must be able to run.
    The exit is clear and the rows are kept (systemd restarts the unit)."""
    _root_only("an immutable database file")
    if not _chattr_works(tmp_path):
        pytest.skip("this file system does not support chattr +i")
    idp = idp_factory(access_token_lifetime=6, grace_period=10)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml", database=db, providers={"idp": idp.provider()}
    )
    import_tokens(config, idp.token_lines("idp", SETS))
    before = read_rows(db)
    shutil.copy(db, tmp_path / "before.db")
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        daemon = daemons(config, start=False)
        daemon.start(wait_listening=False)
        assert daemon.wait_exit() == 1
        (line,) = daemon.events("cannot use the database")
        assert str(db) in line["error"]
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=False)
    assert read_rows(db) == before
    assert idp.ledger.requests == 0


def hold_a_grant(idp: IdPHandle, daemon: DaemonProcess, lock: HeldLock) -> None:
    """Take the write lock while the IdP's (rotating) answer is on its way: the daemon ends
    up holding a grant the database refuses."""
    idp.faults.add(FaultKind.SLOW, delay=2.0, process_first=True)
    wait_until(
        lambda: idp.ledger.faults_injected.get("slow", 0) >= 1, what="the slow request to arrive"
    )
    lock.break_()
    daemon.wait_for_event(HELD)


def test_sigterm_with_a_held_grant_waits_for_storage_and_stores_it(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    db = tmp_path / "tokens.db"
    idp, daemon = start_daemon(tmp_path, db, idp_factory, daemons)
    lock = HeldLock(db)
    try:
        hold_a_grant(idp, daemon, lock)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait_for_event("shutting down")
        assert daemon.running()  # the held grant keeps the process up
    finally:
        lock.repair()
    assert daemon.wait_exit() == 0
    assert not [e for e in daemon.lines() if str(e.get("event")).startswith("grant not persisted")]
    assert_nothing_lost(idp, db)
