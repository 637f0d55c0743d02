"""Who holds a lease, and is it still alive? File locks next to the database.

Every process that takes leases (a daemon, or ``refresherd refresh``) holds an exclusive
``flock`` on ``<database>.owners/<owner>.lock`` for as long as it lives. The kernel drops the
lock when the process dies, however it dies, so a successor can tell a dead predecessor's leases
from a live sibling's at once, across processes and containers that share the database volume,
without waiting for the lease to expire (which could outlast the IdP's grace window). A process
that is merely paused (SIGSTOP) keeps its lock; its leases end when they expire.

The same directory holds ``database-exporter``: the flock of the one process that exports the
database-wide metrics (:func:`take_exporter_lock`), taken by the first daemon that asks and held
until it dies, when the next one to ask takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
from pathlib import Path

# Not "<owner>.lock": live_owners() takes every *.lock file for an owner.
EXPORTER_LOCK_NAME = "database-exporter"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def owners_dir(database: Path) -> Path:
    return database.with_name(database.name + ".owners")


def new_owner_id(name: str | None = None) -> str:
    """A fresh owner id, ``<host or name>-<pid>-<8 hex>``: readable, and unique per process."""
    host = "".join(ch if ch in _SAFE else "-" for ch in (name or socket.gethostname()))[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock_path(directory: Path, owner: str) -> Path:
    if not owner or not set(owner) <= _SAFE:
        raise ValueError(f"not an owner id: {owner!r}")
    return directory / f"{owner}.lock"


class OwnerLock:
    """This process's identity as a lease owner, held alive by an flock."""

    def __init__(self, database: Path, name: str | None = None) -> None:
        self.directory = owners_dir(database)
        self.owner = new_owner_id(name)
        self._fd: int | None = None

    def acquire(self) -> str:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        path = _lock_path(self.directory, self.owner)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return self.owner

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink first: a checker that opens the path after this sees no file, i.e. dead.
        with contextlib.suppress(FileNotFoundError):
            _lock_path(self.directory, self.owner).unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> str:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_exporter_lock(database: Path) -> int | None:
    """The descriptor of ``database``'s exporter lock, now held by this open file (keep it open
    for as long as the role is wanted); None if another open file holds it, even one of this
    process (flock conflicts between open file descriptions). OSError if it cannot be tried.

    The file is never removed: a locker that opened the path just before an unlink would lock
    an orphan inode while the next one locks a new file, and both would export."""
    directory = owners_dir(database)
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / EXPORTER_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def is_alive(database: Path, owner: str) -> bool:
    """True while the process that registered ``owner`` still holds its lock.

    An owner id that does not look like ours, or whose lock cannot be inspected for a reason
    other than absence, is treated as alive: never take over a lease on a guess.
    """
    try:
        path = _lock_path(owners_dir(database), owner)
    except ValueError:
        return True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    else:
        # We got the lock: its owner is gone. Tidy up its file.
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    finally:
        os.close(fd)
