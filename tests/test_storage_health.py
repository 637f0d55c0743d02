"""storage_health: the pure pause/probe decisions, the classification of real SQLite errors, and
the store's probe write, checkpoint and error reasons against real SQLite files."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from refresherd.storage_health import (
    PROBE_INITIAL,
    PROBE_MAX,
    StorageHealth,
    StorageReason,
    classify,
    classify_postgres,
    probe_delay,
)
from refresherd.store import StoreError
from refresherd.store.sqlite import JOURNAL_SIZE_LIMIT, SqliteStore

# --------------------------------------------------------------------------- classify


def _error_of(action: object) -> sqlite3.Error:
    assert callable(action)
    with pytest.raises(sqlite3.Error) as info:
        action()
    return info.value


def test_a_full_database_is_full(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.execute("PRAGMA max_page_count = 3")
    error = _error_of(lambda: conn.execute("INSERT INTO t VALUES (randomblob(100000))"))
    assert classify(error) is StorageReason.FULL


def test_a_read_only_connection_is_readonly(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    error = _error_of(lambda: conn.execute("INSERT INTO t VALUES (1)"))
    assert classify(error) is StorageReason.READONLY


def test_a_write_lock_held_elsewhere_is_locked(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    error = _error_of(lambda: other.execute("INSERT INTO t VALUES (1)"))
    assert classify(error) is StorageReason.LOCKED
    holder.execute("ROLLBACK")


def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    db.write_bytes(os.urandom(8192))
    conn = sqlite3.connect(db)
    error = _error_of(lambda: conn.execute("SELECT * FROM sqlite_master"))
    assert classify(error) is StorageReason.CORRUPT


def test_errors_without_a_storage_cause_are_other(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    error = _error_of(lambda: conn.execute("SELECT * FROM no_such_table"))
    assert classify(error) is StorageReason.OTHER
    assert classify(ValueError("not from sqlite")) is StorageReason.OTHER


# --------------------------------------------------------------------------- the state


def test_a_failure_starts_one_pause_and_the_first_probe_is_soon() -> None:
    health = StorageHealth()
    assert not health.paused and not health.probe_due(0.0)
    assert health.note_failure(StorageReason.FULL, "disk full", now=100.0) is True
    assert health.paused and health.paused_since == 100.0
    assert health.reason is StorageReason.FULL
    # More failures during the pause do not start another one (it is logged once); the
    # latest reason is what /readyz shows.
    assert health.note_failure(StorageReason.LOCKED, "locked", now=101.0) is False
    assert health.paused_since == 100.0 and health.reason is StorageReason.LOCKED
    assert not health.probe_due(100.0 + PROBE_INITIAL - 0.01)
    assert health.probe_due(100.0 + PROBE_INITIAL)


def test_failed_probes_back_off_to_the_cap() -> None:
    health = StorageHealth()
    health.note_failure(StorageReason.IO_ERROR, "eio", now=0.0)
    now = 0.0
    delays = []
    for _ in range(8):
        now = health.next_probe_at
        health.note_probe_failed(StorageReason.IO_ERROR, "eio", now=now)
        delays.append(health.next_probe_at - now)
    assert delays == [probe_delay(n) for n in range(1, 9)]
    assert delays[0] == 2 * PROBE_INITIAL
    assert max(delays) == PROBE_MAX and delays == sorted(delays)
    assert health.failed_probes == 8


def test_recovery_ends_the_pause_once() -> None:
    health = StorageHealth()
    assert health.note_recovered() is False
    health.note_failure(StorageReason.FULL, "full", now=5.0)
    health.note_probe_failed(StorageReason.FULL, "full", now=6.0)
    assert health.note_recovered() is True
    assert not health.paused and health.reason is None and health.failed_probes == 0
    assert health.note_recovered() is False
    # A new failure starts a new pause, with the first probe soon again.
    assert health.note_failure(StorageReason.FULL, "full", now=50.0) is True
    assert health.next_probe_at == 50.0 + PROBE_INITIAL


def test_a_failed_probe_while_not_paused_starts_a_pause() -> None:
    health = StorageHealth()
    health.note_probe_failed(StorageReason.READONLY, "ro", now=3.0)
    assert health.paused and health.reason is StorageReason.READONLY


# --------------------------------------------------------------------------- the store


@pytest.mark.anyio
async def test_probe_write_writes_one_row_and_fails_with_the_reason_when_locked(
    tmp_path: Path,
) -> None:
    db = tmp_path / "tokens.db"
    store = await SqliteStore.open(db)
    try:
        await store.probe_write(owner="me", now=1.0)
        await store.probe_write(owner="me", now=2.0)
        with sqlite3.connect(db) as plain:
            assert plain.execute("SELECT id, probed_at, owner FROM storage_probe").fetchall() == [
                (1, 2.0, "me")
            ]
        holder = sqlite3.connect(db, isolation_level=None, timeout=30)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError) as info:
                await store.probe_write(owner="me", now=3.0)  # waits out the busy timeout
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert info.value.reason is StorageReason.LOCKED
        assert "database is locked" in str(info.value)
        await store.probe_write(owner="me", now=4.0)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_store_errors_carry_the_reason_of_a_full_database(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = await SqliteStore.open(db)
    try:
        # max_page_count binds the connection that sets it: the store's own.
        pages = await store._fetch_value("PRAGMA page_count")
        await store._fetch_value(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError) as info:
            await store._write(
                "INSERT INTO storage_probe (id, probed_at, owner) VALUES (1, 0, :o)",
                {"o": "x" * 100_000},
            )
        assert info.value.reason is StorageReason.FULL
    finally:
        await store.close()


@pytest.mark.anyio
async def test_journal_size_limit_and_passive_checkpoint(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = await SqliteStore.open(db)
    try:
        assert await store._fetch_value("PRAGMA journal_size_limit") == JOURNAL_SIZE_LIMIT
        await store.probe_write(owner="me", now=1.0)
        assert store.wal_bytes() > 0
        frames, done = await store.checkpoint()
        assert frames > 0 and done == frames
    finally:
        await store.close()
    assert store.wal_bytes() == 0  # the last connection removed the WAL at close


# ---- PostgreSQL: by SQLSTATE (the driver's own exception classes carry it) ----------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (asyncpg.exceptions.DiskFullError("no space"), StorageReason.FULL),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("ro"), StorageReason.READONLY),
        (asyncpg.exceptions.InsufficientPrivilegeError("denied"), StorageReason.READONLY),
        (asyncpg.exceptions.InvalidPasswordError("auth"), StorageReason.READONLY),
        (asyncpg.exceptions.LockNotAvailableError("lock"), StorageReason.LOCKED),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), StorageReason.LOCKED),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), StorageReason.UNAVAILABLE),
        (asyncpg.exceptions.ConnectionFailureError("gone"), StorageReason.UNAVAILABLE),
        (asyncpg.exceptions.AdminShutdownError("terminated"), StorageReason.UNAVAILABLE),
        (asyncpg.exceptions.CannotConnectNowError("starting"), StorageReason.UNAVAILABLE),
        (asyncpg.exceptions.TooManyConnectionsError("full"), StorageReason.UNAVAILABLE),
        (ConnectionRefusedError(111, "refused"), StorageReason.UNAVAILABLE),
        (TimeoutError(), StorageReason.UNAVAILABLE),
        (asyncpg.exceptions.PostgresIOError("eio"), StorageReason.IO_ERROR),
        (asyncpg.exceptions.DataCorruptedError("bad page"), StorageReason.CORRUPT),
        (asyncpg.exceptions.IndexCorruptedError("bad index"), StorageReason.CORRUPT),
        (asyncpg.exceptions.UniqueViolationError("dup"), StorageReason.OTHER),
        (asyncpg.exceptions.RaiseError("a trigger said no"), StorageReason.OTHER),
        (ValueError("not a database error"), StorageReason.OTHER),
    ],
)
def test_postgres_errors_by_sqlstate(error: BaseException, reason: StorageReason) -> None:
    assert classify_postgres(error) is reason
