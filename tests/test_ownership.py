"""Owner liveness across processes: flock-held lock files next to the database."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from refresherd.ownership import OwnerLock, is_alive, owners_dir

# The child registers as an owner, optionally starts a grandchild that inherits its file
# descriptors (os.spawnv: fork + exec, nothing closed), reports both and waits to be killed.
CHILD = r"""
import os, sys, time
from pathlib import Path
from refresherd.ownership import OwnerLock

lock = OwnerLock(Path(sys.argv[1]), sys.argv[2])
owner = lock.acquire()
grandchild = 0
if sys.argv[3] == "spawn":
    # It says "exec'd" once running: from fork to exec it still shares the lock descriptor.
    argv = [sys.executable, "-c", "import time; print(\"exec'd\", flush=True); time.sleep(600)"]
    grandchild = os.spawnv(os.P_NOWAIT, sys.executable, argv)
print(owner, grandchild, flush=True)
time.sleep(600)
"""


@dataclass
class Child:
    proc: subprocess.Popen[str]
    owner: str
    grandchild: int


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "refresherd.db"


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        for pid in (child.proc.pid, child.grandchild):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        child.proc.wait(timeout=60)
        # the grandchild is not ours to reap: it was the child's (now init's)


def start_child(children: list[Child], database: Path, *, spawn: bool = False) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(database), "worker", "spawn" if spawn else "-"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    reports = [proc.stdout.readline() for _ in range(2 if spawn else 1)]
    if not all(reports):
        proc.kill()
        proc.wait(timeout=60)
        pytest.fail(f"owner child exited with {proc.returncode} before reporting")
    # the child holds its lock once it has said so (and its grandchild has exec'd)
    owner, grandchild = next(r for r in reports if r != "exec'd\n").split()
    child = Child(proc, owner, int(grandchild))
    children.append(child)
    return child


def kill_and_reap(child: Child) -> None:
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait(timeout=60)


def lock_file(database: Path, owner: str) -> Path:
    return owners_dir(database) / f"{owner}.lock"


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---- this process ------------------------------------------------------------------------------


def test_this_process_is_alive_while_it_holds_its_lock(database: Path) -> None:
    lock = OwnerLock(database, "test-host")
    owner = lock.acquire()
    try:
        assert owner == lock.owner
        assert owner.startswith(f"test-host-{os.getpid()}-")
        assert is_alive(database, owner)
        assert is_alive(database, owner)  # checking does not disturb it
        path = lock_file(database, owner)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(owners_dir(database).stat().st_mode) == 0o700
    finally:
        lock.release()
    assert not is_alive(database, owner)
    assert not lock_file(database, owner).exists()
    lock.release()  # idempotent


def test_context_manager(database: Path) -> None:
    with OwnerLock(database) as owner:
        assert is_alive(database, owner)
    assert not is_alive(database, owner)


def test_two_owners_in_one_process_are_distinct(database: Path) -> None:
    with OwnerLock(database, "h") as first, OwnerLock(database, "h") as second:
        assert first != second
        assert is_alive(database, first) and is_alive(database, second)
    assert not is_alive(database, first) and not is_alive(database, second)


@pytest.mark.parametrize("name", ["my host/with:odd chars", "x" * 100, "ümlaut", "..", ""])
def test_owner_ids_are_safe_file_names(database: Path, name: str) -> None:
    with OwnerLock(database, name) as owner:
        assert "/" not in owner and " " not in owner and owner.isascii()
        assert lock_file(database, owner).parent == owners_dir(database)
        assert is_alive(database, owner)
        assert len(owner) <= 40 + 1 + 10 + 1 + 8


def test_owners_dir_sits_next_to_the_database(database: Path) -> None:
    assert owners_dir(database) == database.parent / "refresherd.db.owners"


# ---- other processes ---------------------------------------------------------------------------


def test_a_child_holding_a_lock_is_alive_until_killed(
    database: Path, children: list[Child]
) -> None:
    child = start_child(children, database)
    assert child.owner.startswith(f"worker-{child.proc.pid}-")
    assert is_alive(database, child.owner)
    assert lock_file(database, child.owner).exists()

    kill_and_reap(child)
    # The kernel dropped the lock with the process: dead at once, no lease timeout needed.
    assert lock_file(database, child.owner).exists()  # a dead owner leaves its file behind
    assert not is_alive(database, child.owner)
    assert not lock_file(database, child.owner).exists()  # ... which the check tidies up
    assert not is_alive(database, child.owner)


def test_a_stopped_child_is_still_alive(database: Path, children: list[Child]) -> None:
    child = start_child(children, database)
    os.kill(child.proc.pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: _state(child.proc.pid) == "T")
        # paused, not dead: its leases end when they expire, never by takeover
        assert is_alive(database, child.owner)
        assert is_alive(database, child.owner)
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
    assert is_alive(database, child.owner)
    kill_and_reap(child)
    assert not is_alive(database, child.owner)


def test_a_grandchild_does_not_keep_a_dead_owner_alive(
    database: Path, children: list[Child]
) -> None:
    """The lock descriptor is close-on-exec: a process the owner started (a hook, a helper)
    must not hold its lock after the owner died."""
    child = start_child(children, database, spawn=True)
    assert child.grandchild > 0
    assert is_alive(database, child.owner)
    kill_and_reap(child)
    os.kill(child.grandchild, 0)  # the grandchild still runs
    assert not is_alive(database, child.owner)


def test_two_children_do_not_see_each_other_as_dead(database: Path, children: list[Child]) -> None:
    first = start_child(children, database)
    second = start_child(children, database)
    assert first.owner != second.owner
    assert is_alive(database, first.owner) and is_alive(database, second.owner)
    kill_and_reap(first)
    assert not is_alive(database, first.owner)
    assert is_alive(database, second.owner)


# ---- unknown and malformed ids -------------------------------------------------------------------


def test_unknown_owner_is_dead(database: Path) -> None:
    # no owners directory at all
    assert not is_alive(database, "host-1234-deadbeef")
    with OwnerLock(database):
        assert not is_alive(database, "host-1234-deadbeef")
    assert not owners_dir(database).joinpath("host-1234-deadbeef.lock").exists()


def test_a_stale_lock_file_without_a_holder_is_dead_and_removed(database: Path) -> None:
    owners_dir(database).mkdir()
    stale = lock_file(database, "crashed-99-00000000")
    stale.touch()
    assert not is_alive(database, "crashed-99-00000000")
    assert not stale.exists()


@pytest.mark.parametrize(
    "owner",
    ["", "../escape", "a/b", "/etc/passwd", "with space", "nul\x00", "tab\t", "ü", "a;rm -rf"],
)
def test_malformed_ids_are_treated_as_alive(database: Path, owner: str) -> None:
    # Never take over a lease on a guess: an id we cannot check is alive until it expires.
    assert is_alive(database, owner)
    assert not owners_dir(database).exists()


def test_an_uninspectable_lock_counts_as_alive(database: Path) -> None:
    # A lock "file" that cannot be opened for writing (here: a directory) is not proof of death.
    owners_dir(database).mkdir()
    lock_file(database, "odd-1-00000000").mkdir()
    assert is_alive(database, "odd-1-00000000")
    assert lock_file(database, "odd-1-00000000").is_dir()


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]
