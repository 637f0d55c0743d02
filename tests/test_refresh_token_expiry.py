"""The absolute refresh-token expiry: from the IdP's response, the import, or the provider's
configured lifetime; kept across rotations; reported by `tokens show` and a gauge."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import (
    Daemons,
    IdPFactory,
    database_at_version,
    import_tokens,
    run_cli,
    wait_until,
    write_config,
)

from refresherd.idp.token_response import parse_grant
from refresherd.intake import token_set_from_json
from refresherd.model import Secret
from refresherd.settings import ScheduleConfig
from refresherd.store import Location, NewTokenSet, open_store
from refresherd.store.migrations import SCHEMA_VERSION
from refresherd.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
DAY = 86400.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def grant_body(**extra: object) -> bytes:
    return json.dumps({"access_token": "at", "token_type": "Bearer", **extra}).encode()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"refresh_token_expires_in": 7776000}, 7776000.0),
        ({"refresh_expires_in": "1800"}, 1800.0),  # Keycloak's name, as a string
        ({"refresh_expires_in": 0}, None),  # Keycloak offline tokens: no expiry
        ({"refresh_token_expires_in": -5}, None),  # unusable: ignored, not fatal
        ({"refresh_token_expires_in": "soon"}, None),
        ({}, None),
    ],
)
def test_the_response_may_state_the_refresh_tokens_lifetime(
    extra: dict[str, object], expected: float | None
) -> None:
    assert parse_grant(grant_body(**extra)).refresh_expires_in == expected


def test_import_reads_the_stated_lifetime() -> None:
    ts = token_set_from_json(
        {"refresh_token": "rt", "refresh_token_expires_in": 90 * DAY},
        token_set_id="a",
        provider="p",
        now=NOW,
        schedule=ScheduleConfig(),
        rand=0.5,
    )
    assert ts.refresh_expires_at == NOW + 90 * DAY
    bad = token_set_from_json(
        {"refresh_token": "rt", "refresh_token_expires_in": []},
        token_set_id="a",
        provider="p",
        now=NOW,
        schedule=ScheduleConfig(),
        rand=0.5,
    )
    assert bad.refresh_expires_at is None


def new(token_set_id: str, provider: str, refresh_expires_at: float | None) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider=provider,
        refresh_token=Secret(f"rt-{token_set_id}"),
        access_token=None,
        expires_at=None,
        next_refresh_at=NOW,
        refresh_expires_at=refresh_expires_at,
    )


@pytest.mark.anyio
async def test_store_keeps_the_expiry_across_rotation_and_reports_the_soonest(
    store_location: Location,
) -> None:
    store = await open_store(store_location)
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        await store.add_many(
            [
                new("stated", "p", NOW + 10 * DAY),
                new("configured", "p", None),  # created at NOW - 1 day, below
                new("other", "q", None),
            ],
            now=NOW - DAY,
        )
        soonest = await store.refresh_expiry_soonest({"p": 5 * DAY, "q": None})
        assert soonest == {"p": NOW + 4 * DAY}  # created_at + 5 days beats the stated 10 days
        assert await store.refresh_expiry_soonest({"p": None}) == {"p": NOW + 10 * DAY}

        # A rotation without a stated lifetime keeps the absolute expiry; a stated one wins.
        claimed = await store.claim("stated", owner="me", now=NOW, lease_until=NOW + 60)
        assert not isinstance(claimed, type(None))
        saved = await store.save_grant(
            "stated",
            owner="me",
            expected_version=1,
            sent_refresh_token=Secret("rt-stated"),
            access_token=Secret("at-2"),
            refresh_token=Secret("rt-2"),
            token_type="Bearer",
            scope=None,
            expires_at=NOW + 3600,
            next_refresh_at=NOW + 2880,
            now=NOW,
        )
        assert saved is not None and saved.refresh_expires_at == NOW + 10 * DAY
    finally:
        await store.close()


def test_an_old_database_is_migrated_to_carry_the_column(tmp_path: Path) -> None:
    """A version-1 database (as the first release wrote it) gains the column on open."""
    import anyio

    path = tmp_path / "v1.db"
    with database_at_version(path, 1) as conn:
        conn.execute(
            "INSERT INTO token_sets (id, provider, refresh_token, next_refresh_at, created_at,"
            " updated_at) VALUES ('old', 'p', 'rt-old', 0, 0, 0)"
        )

    async def reopen() -> None:
        store = await SqliteStore.open(path)
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            ts = await store.get("old")
            assert ts is not None and ts.refresh_expires_at is None
        finally:
            await store.close()

    anyio.run(reopen)


def test_tokens_show_and_the_gauge_report_the_configured_lifetime(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    idp = idp_factory()
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": idp.provider(refresh_token_lifetime="30d")},
    )
    before = time.time()
    import_tokens(config, idp.token_lines("p", 2))
    shown = run_cli(config, "tokens", "show", "ts-0000", "--json")
    assert shown.returncode == 0, shown.stderr
    expires = json.loads(shown.stdout)["refresh_token_expires_at"]
    assert expires is not None and expires.endswith("Z")

    daemon = daemons(config)
    name = "refresherd_refresh_token_expires_soonest_timestamp_seconds"

    def gauge() -> float | None:
        for line in daemon.metrics().splitlines():
            if line.startswith(name + '{provider="p"}'):
                return float(line.rsplit(" ", 1)[1])
        return None

    value = wait_until(gauge, what=f"{name} on /metrics")
    assert before + 30 * DAY - 5 <= value <= time.time() + 30 * DAY
    assert daemon.stop() == 0
