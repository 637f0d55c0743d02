"""Group commit in refresherd.store.sqlite: many writes per transaction under load, each still
committed before its caller hears of it, and a failure confined to what it really undid."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import anyio
import pytest

from refresherd.model import Secret
from refresherd.store import (
    Location,
    NewTokenSet,
    StoreError,
    TokenSetExists,
    TokenStore,
    open_store,
)
from refresherd.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
OWNER = "host-a-1-00000000"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sixty_four() -> list[NewTokenSet]:
    return [
        NewTokenSet(
            id=f"s{i}",
            provider="p",
            refresh_token=Secret(f"rt-{i}"),
            access_token=None,
            expires_at=None,
            next_refresh_at=NOW,
        )
        for i in range(64)
    ]


@pytest.fixture
async def any_store(store_location: Location) -> AsyncIterator[TokenStore]:
    """The same 64 token sets, on each backend."""
    s = await open_store(store_location)
    try:
        await s.add_many(sixty_four(), now=NOW)
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "t.db")
    try:
        await s.add_many(sixty_four(), now=NOW)
        yield s
    finally:
        await s.close()


def committed_refresh_token(path: Path, token_set_id: str) -> str:
    """What another connection (another process) sees: only committed data."""
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT refresh_token FROM token_sets WHERE id = ?", (token_set_id,)
        ).fetchone()
    return str(row[0])


async def grant(store: SqliteStore, i: int) -> None:
    saved = await store.save_grant(
        f"s{i}",
        owner=OWNER,
        expected_version=1,
        sent_refresh_token=Secret(f"rt-{i}"),
        access_token=Secret(f"at-{i}-2"),
        refresh_token=Secret(f"rt-{i}-2"),
        token_type="Bearer",
        scope=None,
        expires_at=NOW + 3600,
        next_refresh_at=NOW + 3000,
        now=NOW,
    )
    assert saved is not None and saved.version == 2


@pytest.mark.anyio
async def test_concurrent_grants_share_commits_and_each_is_durable_when_it_returns(
    store: SqliteStore,
) -> None:
    seen: list[str] = []

    async def one(i: int) -> None:
        await grant(store, i)
        # The moment save_grant returns, the grant is committed: visible to another process.
        seen.append(committed_refresh_token(store.path, f"s{i}"))

    writes, commits = store.writes, store.commits
    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(one, i)
    assert sorted(seen) == sorted(f"rt-{i}-2" for i in range(64))
    assert store.writes - writes == 64
    # 64 writes arriving together: the first commits alone, the rest share transactions.
    assert store.commits - commits < 64 // 2


@pytest.mark.anyio
async def test_a_statement_error_fails_only_its_own_write(store: SqliteStore) -> None:
    async def bad() -> None:
        with pytest.raises(StoreError, match="CHECK constraint failed"):
            await store._write(
                "UPDATE token_sets SET refresh_mode = 'sometimes' WHERE id = 's0' RETURNING id",
                {},
            )

    async with anyio.create_task_group() as tg:
        for i in range(1, 32):
            tg.start_soon(grant, store, i)
        tg.start_soon(bad)
        for i in range(32, 64):
            tg.start_soon(grant, store, i)
    for i in range(1, 64):
        assert committed_refresh_token(store.path, f"s{i}") == f"rt-{i}-2"
    assert committed_refresh_token(store.path, "s0") == "rt-0"


@pytest.mark.anyio
async def test_a_full_disk_fails_every_write_of_the_group_and_commits_none(
    store: SqliteStore,
) -> None:
    # Cap the database at its current size (this connection's limit), as a full disk would.
    with sqlite3.connect(store.path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    await store._write(f"PRAGMA max_page_count = {pages}", {})
    big = "x" * 4000
    failures: list[BaseException] = []

    async def fat(i: int) -> None:
        try:
            await store._write(
                "UPDATE token_sets SET last_error = :e WHERE id = :id RETURNING id",
                {"e": big * 4, "id": f"s{i}"},
            )
        except StoreError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(fat, i)
    assert failures and all("full" in str(f) for f in failures)
    with sqlite3.connect(store.path) as conn:
        written = conn.execute(
            "SELECT count(*) FROM token_sets WHERE last_error IS NOT NULL"
        ).fetchone()[0]
    # What was committed is exactly what did not fail: no write was lost or half reported.
    assert written == 64 - len(failures)
    # Room again: writing works at once.
    await store._write("PRAGMA max_page_count = 1073741823", {})
    await grant(store, 0)
    assert committed_refresh_token(store.path, "s0") == "rt-0-2"


# --------------------------------------------------------------------------- streamed import


async def chunked(
    items: Iterable[tuple[str, NewTokenSet]], size: int = 5000
) -> AsyncIterator[list[tuple[str, NewTokenSet]]]:
    """``items`` as import_stream takes them, a chunk at a time (as the CLI's reader hands
    them over); an exception ``items`` raises comes out of the iteration as it is."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def numbered(ids: list[str]) -> list[tuple[str, NewTokenSet]]:
    return [
        (
            f"in:{n}",
            NewTokenSet(
                id=token_set_id,
                provider="p",
                refresh_token=Secret(f"rt-{token_set_id}"),
                access_token=None,
                expires_at=None,
                next_refresh_at=NOW,
            ),
        )
        for n, token_set_id in enumerate(ids, start=1)
    ]


@pytest.mark.anyio
async def test_a_streamed_import_is_all_or_nothing_across_chunks(any_store: TokenStore) -> None:
    store = any_store
    before = await store.counts()
    ids = [f"x{i}" for i in range(12_000)]
    # A repeat in a later chunk than its first appearance, named with where it was read.
    with pytest.raises(TokenSetExists, match=r"in:11001: token set 'x7' appears twice"):
        await store.import_stream(chunked(numbered([*ids[:11_000], "x7"])), now=NOW)
    # An id the database holds already, named with where it was read.
    with pytest.raises(TokenSetExists, match=r"^in:12001: token set 's5' exists already"):
        await store.import_stream(chunked(numbered([*ids, "s5"])), now=NOW)

    # A bad line raised by the input itself, half-way.
    def broken() -> Iterator[tuple[str, NewTokenSet]]:
        yield from numbered(ids[:7000])
        raise ValueError("in:7001: not valid JSON")

    with pytest.raises(ValueError, match="in:7001"):
        await store.import_stream(chunked(broken()), now=NOW)

    # The input file cannot be read any further: its own error, not a database error.
    def unreadable() -> Iterator[tuple[str, NewTokenSet]]:
        yield from numbered(ids[:6000])
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        await store.import_stream(chunked(unreadable()), now=NOW)
    assert await store.counts() == before
    assert await store.import_stream(chunked(numbered(ids)), now=NOW) == 12_000
    assert (await store.counts())[("p", "active")] == 64 + 12_000
    # Nothing is left behind: a second import on the same connection works the same way.
    assert await store.import_stream(chunked(numbered(["y1", "y2"])), now=NOW) == 2
