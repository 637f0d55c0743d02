"""A real PostgreSQL server on loopback for the tests, and a fresh database per test.

- ``postgres_server`` (session): the admin URL of a server. ``REFRESHERD_TEST_POSTGRES`` (a libpq
  URL of a database whose user may CREATE DATABASE) names one that runs already; otherwise a
  private cluster is made with this machine's own binaries (``/usr/lib/postgresql/*/bin``), as
  the ``postgres`` user when we are root (initdb refuses root), listening on 127.0.0.1 on a free
  port with its socket in its own directory, and stopped at the end of the session. Under
  pytest-xdist each worker has its own cluster. Without binaries the PostgreSQL tests are
  skipped, except under CI (``CI`` set), where that is a failure: CI must not skip silently.
- ``postgres_url`` (function): the URL of a new, empty database (from template0), dropped after
  the test.
- ``store_location`` (function, parametrized ``sqlite`` / ``postgresql``): a
  :data:`refresherd.store.Location` for :func:`refresherd.store.open_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from refresherd.store import Location, postgres_location

ENV_URL = "REFRESHERD_TEST_POSTGRES"
# Tests need no durability across a power cut: no fsync. Benchmarks start with durable ones.
TEST_SETTINGS = "-c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB"


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    """``url`` pointed at database ``name`` (its other parts kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


class LocalCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, run with ``pg_ctl``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="refresherd-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        # As root, the cluster belongs to the postgres user, which must own its directory.
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.base, "postgres", "postgres")
        self.base.chmod(0o700)

    def _run(self, *argv: str) -> None:
        proc = subprocess.run(
            [*self.as_user, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}{log}"
            )

    def start(self, settings: str = TEST_SETTINGS) -> str:
        """initdb, then start on a free loopback port with ``settings`` (postgres -c ...)."""
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        # A free port can be taken by someone else before the server binds it: try again.
        for attempt in range(5):
            self.port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} {settings}"
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
            except RuntimeError:
                if attempt == 4:
                    raise
                continue
            return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        raise AssertionError("unreachable")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if self.data.exists():
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                )
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The admin URL of a PostgreSQL server on loopback (see the module docstring)."""
    external = os.environ.get(ENV_URL)
    if external:
        yield external
        return
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = (
            f"no PostgreSQL: neither {ENV_URL} nor /usr/lib/postgresql/*/bin/initdb "
            "(apt-get install postgresql)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = LocalCluster(bin_dir)
    try:
        url = cluster.start()
        yield url
    finally:
        cluster.stop()


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """The URL of a new, empty database on ``postgres_server``, dropped after the test."""
    name = f"refresherd_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(postgres_server, f"CREATE DATABASE {name} TEMPLATE template0"))
    try:
        yield with_database(postgres_server, name)
    finally:
        # FORCE: a test that failed half-way may have left a connection open.
        asyncio.run(_admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Where a test's store lives, once per backend."""
    if request.param == "sqlite":
        return tmp_path / "refresherd.db"
    url: str = request.getfixturevalue("postgres_url")
    return postgres_location(url)
