"""The database a daemon test runs on, once per backend: a SQLite file or a PostgreSQL database.

``db`` (function, parametrized ``sqlite`` / ``postgresql``) is a Path for SQLite or a
:class:`PgDatabase`; ``write_config(database=db)`` writes either, and ``read_rows(db)`` reads
every token set back from either, so one daemon test serves both backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import pytest

from refresherd.store import TOKEN_SET_COLUMNS, Location, open_store, parse_location


@dataclass(frozen=True)
class PgDatabase:
    """A PostgreSQL database for a daemon's config: the URL without its password, which goes
    to a 0600 file (``database_password_file``) as a deployment would keep it."""

    url: str  # as the test server gave it, password and all
    directory: Path

    @property
    def location(self) -> Location:
        return parse_location(self.url, base_dir=self.directory)

    def config_entries(self) -> dict[str, str]:
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}@" if parts.username else ""
        entries = {"database": urlunsplit((parts.scheme, user + host, parts.path, parts.query, ""))}
        if parts.password is not None:
            secret = self.directory / "database-password"
            secret.write_text(unquote(parts.password))
            secret.chmod(0o600)
            entries["database_password_file"] = str(secret)
        return entries

    def __str__(self) -> str:
        return str(self.location)


Database = Path | PgDatabase


def location_of(database: Database) -> Location:
    return database.location if isinstance(database, PgDatabase) else database


def read_store_rows(location: Location) -> dict[str, dict[str, Any]]:
    """Every token set as stored, by id, through the store (either backend)."""

    async def read() -> dict[str, dict[str, Any]]:
        store = await open_store(location, create=False, verify_keys=False)
        try:
            return {
                row[0]: dict(zip(TOKEN_SET_COLUMNS, row, strict=True))
                async for batch in store.export_rows("token_sets")
                for row in batch
            }
        finally:
            await store.close()

    return anyio.run(read)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Where a daemon test keeps its token sets, once per backend."""
    if request.param == "sqlite":
        return tmp_path / "tokens.db"
    url: str = request.getfixturevalue("postgres_url")
    return PgDatabase(url, tmp_path)
