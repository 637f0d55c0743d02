"""`refresherd migrate`: a whole database moved between stores, verified, refused while in use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    LEAKS,
    Daemons,
    Database,
    IdPFactory,
    PgDatabase,
    run_cli,
    write_config,
)
from databases import location_of

from refresherd.encryption import TokenCipher, new_key_text
from refresherd.migrate import TABLES
from refresherd.model import Secret, State
from refresherd.store import (
    HOOK_DELIVERY_COLUMNS,
    TOKEN_SET_COLUMNS,
    Location,
    NewTokenSet,
    TokenStore,
    open_store,
)

KEY = Secret(new_key_text())
NOW = 1_800_000_000.0


async def _fill(location: Location) -> None:
    """Token sets in every state the daemon leaves them in, sealed, and a hook queue."""
    store = await open_store(location, cipher=TokenCipher(KEY))
    try:
        items = [
            NewTokenSet(
                id=f"set-{i:03d}",
                provider="p" if i % 3 else "q",
                refresh_token=Secret(f"rt-migrate-{i}-{'x' * i}"),
                access_token=Secret(f"at-migrate-{i}") if i % 4 else None,
                expires_at=NOW + 3600 + i,
                next_refresh_at=NOW + 3000 + i,
                scope="openid offline_access" if i % 2 else None,
                refresh_expires_at=NOW + 86400 * 30 if i % 5 == 0 else None,
                grace_period=30.0 if i % 7 == 0 else None,
            )
            for i in range(120)
        ]
        await store.add_many(items, now=NOW)
        for token in items[:120]:
            LEAKS.add_secret(token.refresh_token.reveal())
        # A journaled attempt left behind by a daemon that died (its lease released).
        claimed = await store.claim("set-001", owner="gone-1-aa", now=NOW, lease_until=NOW + 60)
        assert not isinstance(claimed, type(None))
        await store.begin_attempt(
            "set-001", owner="gone-1-aa", version=1, now=NOW, keep_since=NOW - 30
        )
        await store.release("set-001", owner="gone-1-aa")
        # A failing set and an invalidated one.
        for set_id, state in (("set-002", State.FAILING), ("set-003", State.INVALIDATED)):
            await store.claim(set_id, owner="gone-1-aa", now=NOW, lease_until=NOW + 60)
            await store.record_failure(
                set_id,
                owner="gone-1-aa",
                expected_version=1,
                state=state,
                next_refresh_at=NOW + 60,
                error="temporarily_unavailable",
                failures=2,
                invalid_reason="invalid_grant" if state is State.INVALIDATED else None,
                now=NOW,
                resolve_attempt=True,
            )
        await store.mark_expiry_warned([("set-005", NOW + 86400 * 30)])
        for n in range(3):
            await store.enqueue_hook(
                event_id=f"ev-{n}",
                event_type="token_set.invalidated",
                payload=json.dumps({"token_set": "set-003", "n": n}),
                targets=["webhook", "command"],
                now=NOW + n,
            )
        # Events no daemon with [hooks] has taken yet (queued by `refresherd refresh`, say).
        for n in range(2):
            await store.enqueue_event(
                event_id=f"queued-{n}",
                event_type="token_set.recovered",
                payload=json.dumps({"token_set": "set-002", "n": n}),
                now=NOW + n,
            )
        claimed_hooks = await store.claim_hook_deliveries(now=NOW + 5, until=NOW + 35, limit=2)
        await store.hook_delivered(claimed_hooks[0].id, now=NOW + 6)
        await store.hook_failed(
            claimed_hooks[1].id, error="HTTP 500", next_attempt_at=None, now=NOW
        )
    finally:
        await store.close()


async def _rows(location: Location) -> dict[str, list[tuple[Any, ...]]]:
    store = await open_store(location, create=False, verify_keys=False)
    try:
        tables: dict[str, list[tuple[Any, ...]]] = {}
        for table in TABLES:
            rows = [row async for batch in store.export_rows(table) for row in batch]
            tables[table] = sorted(rows, key=lambda r: str(r[0]))
        return tables
    finally:
        await store.close()


async def _plain(location: Location) -> dict[str, tuple[str, str | None]]:
    store: TokenStore = await open_store(location, create=False, cipher=TokenCipher(KEY))
    try:
        return {
            ts.id: (
                ts.refresh_token.reveal(),
                ts.access_token.reveal() if ts.access_token else None,
            )
            async for ts in store.iterate()
        }
    finally:
        await store.close()


async def _owner_alive(location: Location, owner: str) -> bool:
    store = await open_store(location, create=False, verify_keys=False)
    try:
        return await store.owner_alive(owner)
    finally:
        await store.close()


def migrate(source: Database, target: Database) -> Any:
    return run_cli(None, "migrate", *_args("from", source), *_args("to", target))


def _args(side: str, database: Database) -> list[str]:
    """``--from``/``--to`` for ``database``: a PostgreSQL password goes in a file, never argv."""
    if isinstance(database, Path):
        return [f"--{side}", f"sqlite://{database}"]
    entries = database.config_entries()
    args = [f"--{side}", entries["database"]]
    if "database_password_file" in entries:
        args += [f"--{side}-password-file", entries["database_password_file"]]
    return args


@pytest.mark.parametrize("via", ["sqlite", "postgresql"])
def test_round_trip_moves_everything_and_verifies(
    tmp_path: Path, request: pytest.FixtureRequest, via: str
) -> None:
    source, back = tmp_path / "a.db", tmp_path / "c.db"
    middle: Database = tmp_path / "b.db"
    if via == "postgresql":
        middle = PgDatabase(request.getfixturevalue("postgres_url"), tmp_path)
    anyio.run(_fill, source)
    before = anyio.run(_rows, source)
    assert len(before["token_sets"]) == 120 and len(before["hook_deliveries"]) == 6
    assert len(before["token_sets"][0]) == len(TOKEN_SET_COLUMNS)
    assert len(before["hook_deliveries"][0]) == len(HOOK_DELIVERY_COLUMNS)
    assert len(before["hook_events"]) == 2
    # set-003's invalidation, counted by the database.
    assert before["invalidation_counts"] == [("q", "invalid_grant", 1)]

    proc = migrate(source, middle)
    assert proc.returncode == 0, proc.stderr
    assert "moved 120 row(s) of token_sets" in proc.stdout
    assert "moved 6 row(s) of hook_deliveries" in proc.stdout
    assert "moved 2 row(s) of hook_events" in proc.stdout
    assert "moved 1 row(s) of invalidation_counts" in proc.stdout
    assert "verified" in proc.stdout
    proc = migrate(middle, back)
    assert proc.returncode == 0, proc.stderr

    # Every value of every row, journal and hook queue included, as it was; the source as well.
    assert anyio.run(_rows, location_of(middle)) == before
    assert anyio.run(_rows, back) == before
    assert anyio.run(_rows, source) == before
    # The processes the journal names belonged to the source: on the other side they read as
    # gone, so their unresolved attempts are continued, not left to them for ever.
    assert anyio.run(_owner_alive, location_of(middle), "gone-1-aa") is False
    # Sealed values are opened by the same key on the other side.
    assert anyio.run(_plain, back) == anyio.run(_plain, source)


def test_refuses_a_target_that_holds_token_sets(tmp_path: Path) -> None:
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    anyio.run(_fill, source)
    anyio.run(_fill, target)
    before = anyio.run(_rows, target)
    proc = migrate(source, target)
    assert proc.returncode != 0
    assert "is not empty" in proc.stderr, proc.stderr
    assert anyio.run(_rows, target) == before


def test_refuses_while_a_daemon_runs_on_the_source(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
    db: Database,
) -> None:
    idp = idp_factory("p", usage="reuse")
    source, target = db, tmp_path / "moved.db"
    config = write_config(tmp_path / "c.toml", database=source, providers={"p": idp.provider()})
    daemon = daemons(config)  # started: it listens, so it has registered as an owner

    proc = migrate(source, target)
    assert proc.returncode == 75, proc.stderr
    assert "in use by refresherd process" in proc.stderr
    assert "stop every daemon" in proc.stderr
    assert anyio.run(_rows, target) == {table: [] for table in TABLES}

    daemon.stop()
    proc = migrate(source, tmp_path / "moved-2.db")
    assert proc.returncode == 0, proc.stderr


def test_refuses_while_a_lease_is_unexpired(tmp_path: Path) -> None:
    """A lease whose owner left no trace (another host, say) still counts until it ends."""
    source = tmp_path / "a.db"
    anyio.run(_fill, source)

    async def lease() -> None:
        store = await open_store(source, cipher=TokenCipher(KEY))
        try:
            await store.claim("set-010", owner="elsewhere-7-ff", now=NOW, lease_until=4e9)
        finally:
            await store.close()

    anyio.run(lease)
    proc = migrate(source, tmp_path / "b.db")
    assert proc.returncode == 75
    assert "leased by elsewhere-7-ff" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--from", "a.db", "--to", "postgresql://u:hunter2-secret@127.0.0.1/x"],
            "must not be on the command line",
        ),
        (["--from", "a.db", "--to", "a.db"], "name the same database"),
        (["--from", "mysql://h/db", "--to", "b.db"], "unknown database scheme"),
        (["--from", "sqlite://rel.db", "--to", "b.db"], "absolute path"),
    ],
)
def test_bad_arguments(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = run_cli(None, "migrate", *[a.replace("a.db", str(tmp_path / "a.db")) for a in args])
    assert proc.returncode == 64, proc.stderr
    assert expected in proc.stderr
    assert "hunter2" not in proc.stderr


def test_a_missing_source_is_named(tmp_path: Path) -> None:
    proc = migrate(tmp_path / "nothing.db", tmp_path / "b.db")
    assert proc.returncode == 1
    assert "nothing.db" in proc.stderr and "no such file" in proc.stderr
