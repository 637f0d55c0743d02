"""Is the database taking writes? Pure decisions about pausing refreshes while it does not.

The rule this serves: a refresh token leaves only after its journal entry is on disk, and a
received grant is kept until it is. When storage refuses writes (disk full, read-only, locked
by another writer for longer than the busy timeout, an I/O error), sending more refresh tokens
would only produce grants we cannot keep, so the daemon pauses: no new claims, no sends. It
probes with one harmless write at a backed-off pace and resumes by itself when a probe (or the
persisting of a held grant) succeeds. ``now`` is always an argument; nothing here does I/O.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from typing import Final

# Probes while paused: first after a second, doubling, at most every 15 s. A recovered disk is
# noticed within 15 s, and a broken one costs one small write per 15 s.
PROBE_INITIAL: Final = 1.0
PROBE_MAX: Final = 15.0


class StorageReason(enum.StrEnum):
    """Why a database operation failed: a bounded vocabulary (a metric label)."""

    FULL = "full"  # SQLITE_FULL: the disk (or the file-size limit) is full
    READONLY = "readonly"  # SQLITE_READONLY*, SQLITE_PERM, SQLITE_AUTH, SQLITE_CANTOPEN
    LOCKED = "locked"  # SQLITE_BUSY/SQLITE_LOCKED beyond the busy timeout: another writer
    IO_ERROR = "io_error"  # SQLITE_IOERR*: the OS refused a read or write (EIO, EROFS, EPERM)
    CORRUPT = "corrupt"  # SQLITE_CORRUPT, SQLITE_NOTADB
    # PostgreSQL only: the server cannot be reached, or dropped or refused our connection.
    UNAVAILABLE = "unavailable"
    OTHER = "other"


_BY_PRIMARY_CODE: Final[dict[int, StorageReason]] = {
    sqlite3.SQLITE_FULL: StorageReason.FULL,
    sqlite3.SQLITE_READONLY: StorageReason.READONLY,
    sqlite3.SQLITE_PERM: StorageReason.READONLY,
    sqlite3.SQLITE_AUTH: StorageReason.READONLY,
    sqlite3.SQLITE_CANTOPEN: StorageReason.READONLY,
    sqlite3.SQLITE_BUSY: StorageReason.LOCKED,
    sqlite3.SQLITE_LOCKED: StorageReason.LOCKED,
    sqlite3.SQLITE_IOERR: StorageReason.IO_ERROR,
    sqlite3.SQLITE_CORRUPT: StorageReason.CORRUPT,
    sqlite3.SQLITE_NOTADB: StorageReason.CORRUPT,
}


def classify(error: BaseException) -> StorageReason:
    """The reason for a sqlite3 error, from its (extended) result code; OTHER if it has none."""
    code = getattr(error, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return StorageReason.OTHER
    # Extended codes (SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED...) keep the primary code in
    # their low byte.
    return _BY_PRIMARY_CODE.get(code & 0xFF, StorageReason.OTHER)


# PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html): exact
# codes first, then their two-character class.
_BY_SQLSTATE: Final[dict[str, StorageReason]] = {
    "53100": StorageReason.FULL,  # disk_full
    "53300": StorageReason.UNAVAILABLE,  # too_many_connections
    "25006": StorageReason.READONLY,  # read_only_sql_transaction (a standby, or read-only)
    "42501": StorageReason.READONLY,  # insufficient_privilege
    "55P03": StorageReason.LOCKED,  # lock_not_available (lock_timeout)
    "40P01": StorageReason.LOCKED,  # deadlock_detected
    "57P01": StorageReason.UNAVAILABLE,  # admin_shutdown
    "57P02": StorageReason.UNAVAILABLE,  # crash_shutdown
    "57P03": StorageReason.UNAVAILABLE,  # cannot_connect_now (starting up, shutting down)
    "3D000": StorageReason.UNAVAILABLE,  # invalid_catalog_name: no such database
    "XX001": StorageReason.CORRUPT,  # data_corrupted
    "XX002": StorageReason.CORRUPT,  # index_corrupted
}
_BY_SQLSTATE_CLASS: Final[dict[str, StorageReason]] = {
    "08": StorageReason.UNAVAILABLE,  # connection_exception
    "28": StorageReason.READONLY,  # invalid_authorization_specification (as SQLITE_AUTH)
    "58": StorageReason.IO_ERROR,  # system_error (an I/O error on the server)
}


def classify_postgres(error: BaseException) -> StorageReason:
    """The reason for a PostgreSQL driver error, from its SQLSTATE (``sqlstate``, as asyncpg
    sets it); a failure to reach or keep the server (OSError, a timeout) is UNAVAILABLE."""
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str) and len(state) == 5:
        reason = _BY_SQLSTATE.get(state) or _BY_SQLSTATE_CLASS.get(state[:2])
        if reason is not None:
            return reason
        return StorageReason.OTHER
    if isinstance(error, OSError | TimeoutError):
        return StorageReason.UNAVAILABLE
    return StorageReason.OTHER


@dataclass(slots=True)
class StorageHealth:
    """Paused or not, why, since when, and when to probe next. Mutated only through ``note_*``.

    ``note_failure`` returns True when it starts a pause (log that once), ``note_recovered``
    True when it ends one.
    """

    paused_since: float | None = None
    reason: StorageReason | None = None
    detail: str | None = None
    next_probe_at: float = 0.0
    failed_probes: int = 0

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def note_failure(self, reason: StorageReason, detail: str, *, now: float) -> bool:
        started = self.paused_since is None
        if started:
            self.paused_since = now
            self.failed_probes = 0
            self.next_probe_at = now + PROBE_INITIAL
        # The latest reason wins: a disk that went from full to locked says "locked" now.
        self.reason = reason
        self.detail = detail
        return started

    def note_probe_failed(self, reason: StorageReason, detail: str, *, now: float) -> None:
        if self.paused_since is None:
            self.note_failure(reason, detail, now=now)
            return
        self.failed_probes += 1
        self.reason = reason
        self.detail = detail
        self.next_probe_at = now + probe_delay(self.failed_probes)

    def probe_due(self, now: float) -> bool:
        return self.paused_since is not None and now >= self.next_probe_at

    def note_recovered(self) -> bool:
        was_paused = self.paused_since is not None
        self.paused_since = None
        self.reason = None
        self.detail = None
        self.failed_probes = 0
        return was_paused


def probe_delay(failed_probes: int) -> float:
    """Seconds until the next probe after ``failed_probes`` failures in a row (>= 1)."""
    return min(PROBE_INITIAL * 2.0 ** max(failed_probes, 0), PROBE_MAX)
