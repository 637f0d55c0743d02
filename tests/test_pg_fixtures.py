"""The PostgreSQL test fixtures (a fresh, empty database per test, on loopback), and how a
PostgreSQL location is shown: never with its password."""

from __future__ import annotations

import asyncpg
import pytest

from refresherd.store import PostgresLocation, postgres_location


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_postgres_url_is_a_fresh_empty_database(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == postgres_url.rsplit("/", 1)[1]
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables == 0
        await conn.execute("CREATE TABLE scratch (x int)")
    finally:
        await conn.close()


def test_store_location_covers_both_backends(store_location: object) -> None:
    assert isinstance(store_location, PostgresLocation) or str(store_location).endswith(".db")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw-s3cr3t@db.example:5433/tokens",
        "postgres://:pw-s3cr3t@db/tokens",
        "postgresql://u@db/t?password=pw-s3cr3t&sslmode=require",
        "postgresql://u@db/t?PASS%57ORD=pw-s3cr3t",
    ],
)
def test_a_location_shows_its_url_without_the_password(url: str) -> None:
    location = postgres_location(url)
    assert location.display == str(location)
    assert location.display.startswith(url.split("://", 1)[0] + "://")
    assert "s3cr3t" not in location.display and "s3cr3t" not in repr(location)
    assert "pw-s3cr3t" in location.dsn.reveal()
