"""The PostgreSQL test fixtures themselves: a fresh, empty database per test, on loopback."""

from __future__ import annotations

import asyncpg
import pytest

from refresherd.store_contract import PostgresLocation


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
