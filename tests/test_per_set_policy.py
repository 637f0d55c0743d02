"""Per-token-set policy: an IdP setting change applies only to token sets authorized after it, so
a set may carry its own refresh_token_usage, grace_period and refresh_token_lifetime. Covered
here: migration 3, intake validation, the effective policy, the refresher honouring it, crash
recovery's window and `tokens show`."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    IdPFactory,
    database_at_version,
    import_tokens,
    run_cli,
    write_config,
)
from refresh_parts import build_refresher
from test_refresher import SCHEDULE  # the refresher tests' schedule, shared

from refresherd import policy
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.intake import InputError, parse_lines, token_set_from_json
from refresherd.metrics import Metrics
from refresherd.model import RefreshTokenUsage, Secret, State
from refresherd.refresh.refresher import Refresher
from refresherd.settings import ProviderConfig
from refresherd.store import Location, NewTokenSet, open_store
from refresherd.store.migrations import SCHEMA_VERSION
from refresherd.store.sqlite import SqliteStore
from refresherd.testing import FakeIdP, FaultKind

NOW = 1_700_000_000.0
CLIENT_ID = "refresherd-test"
CLIENT_SECRET = "cs_per-set-policy-3b7e"


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def provider(
    *, usage: str = "reuse", grace: float = 0.0, lifetime: float | None = None, url: str = ""
) -> ProviderConfig:
    return ProviderConfig(
        name="p",
        token_url=url or "http://127.0.0.1:1/token",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token_usage=RefreshTokenUsage(usage),
        grace_period=grace,
        request_timeout=5.0,
        connect_timeout=2.0,
        refresh_token_lifetime=lifetime,
    )


def parse(**fields: object) -> NewTokenSet:
    return token_set_from_json(
        {"refresh_token": "rt", "access_token": "at", "expires_in": 3600, **fields},
        token_set_id="ts",
        provider="p",
        now=NOW,
        schedule=SCHEDULE,
        rand=0.5,
    )


# --------------------------------------------------------------------------- migration 3


def test_a_version_2_database_gains_the_policy_columns(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with database_at_version(path, 2) as conn:
        conn.execute(
            "INSERT INTO token_sets (id, provider, refresh_token, next_refresh_at, created_at,"
            " updated_at, refresh_expires_at) VALUES ('old', 'p', 'rt-old', 0, 0, 0, 99)"
        )

    async def reopen() -> None:
        store = await SqliteStore.open(path)
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            old = await store.get("old")
            assert old is not None and old.refresh_expires_at == 99
            # Sets authorized before the change carry nothing: the provider's policy applies.
            assert (old.refresh_token_usage, old.grace_period, old.refresh_token_lifetime) == (
                None,
                None,
                None,
            )
            assert await store.max_set_grace_period() == 0.0
            await store.add(parse(refresh_token_usage="one_time", grace_period="30s"), now=NOW)
            new = await store.get("ts")
            assert new is not None
            assert new.refresh_token_usage is RefreshTokenUsage.ONE_TIME
            assert new.grace_period == 30.0 and new.refresh_token_lifetime is None
            assert await store.max_set_grace_period() == 30.0
        finally:
            await store.close()

    anyio.run(reopen)
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE token_sets SET refresh_token_usage = 'sometimes'")


# --------------------------------------------------------------------------- intake


def test_intake_reads_the_optional_policy() -> None:
    new = parse(refresh_token_usage="one_time", grace_period=5, refresh_token_lifetime="30d")
    assert new.refresh_token_usage is RefreshTokenUsage.ONE_TIME
    assert new.grace_period == 5.0
    assert new.refresh_token_lifetime == 30 * 86400.0
    assert parse(grace_period="1m30s").grace_period == 90.0
    assert parse(grace_period=0.5).grace_period == 0.5
    plain = parse()
    assert (plain.refresh_token_usage, plain.grace_period, plain.refresh_token_lifetime) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"refresh_token_usage": "rotating"}, "refresh_token_usage must be one of"),
        ({"refresh_token_usage": 1}, "refresh_token_usage must be one of"),
        ({"grace_period": "30"}, "grace_period: expected a duration"),
        ({"grace_period": "soon"}, "grace_period: expected a duration"),
        ({"grace_period": True}, "grace_period must be a number of seconds"),
        ({"grace_period": [5]}, "grace_period must be a number of seconds"),
        ({"grace_period": -1}, "grace_period must not be negative"),
        ({"grace_period": "11m"}, "grace_period must be at most 10m"),
        ({"grace_period": 1e400}, "grace_period must be a finite number"),
        ({"refresh_token_lifetime": 0}, "refresh_token_lifetime must be positive"),
        ({"refresh_token_lifetime": "0s"}, "refresh_token_lifetime must be positive"),
        ({"refresh_token_lifetime": "4000d"}, "larger than ten years"),
    ],
)
def test_intake_refuses_a_bad_policy(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**fields)


def test_import_names_the_line_of_a_bad_policy() -> None:
    lines = [
        {"id": "a", "provider": "p", "refresh_token": "rt-a"},
        {"id": "b", "provider": "p", "refresh_token": "rt-b", "grace_period": "x"},
    ]
    stream = io.StringIO("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError, match=r"^in\.jsonl:2: grace_period: expected a duration"):
        parse_lines(
            stream,
            source="in.jsonl",
            providers={"p": object()},
            now=NOW,
            schedule=SCHEDULE,
            rand=iter(random.Random(1).random, None),
        )


@pytest.mark.parametrize(
    ("field", "meant"),
    [
        ("refersh_token_usage", "refresh_token_usage"),
        ("refresh_token_usages", "refresh_token_usage"),
        ("refreshTokenUsage", "refresh_token_usage"),
        ("grace_periode", "grace_period"),
        ("grace-period", "grace_period"),
        ("refresh_token_lifetme", "refresh_token_lifetime"),
        ("refresh_token_idle_lifetme", "refresh_token_idle_lifetime"),
        ("refresh_modes", "refresh_mode"),
    ],
)
def test_intake_refuses_a_misspelt_policy_field_and_names_the_one_meant(
    field: str, meant: str
) -> None:
    """Ignored, a misspelt field would leave the set under its provider's policy (a rotating
    token treated as re-use, say) without a word."""
    with pytest.raises(ValueError, match=f'^unknown field "{field}"; did you mean "{meant}"\\?$'):
        parse(**{field: "one_time"})


def test_intake_still_ignores_the_fields_real_idps_add() -> None:
    """A token response is piped in as it came: fields of the IdP's own stay ignored, even
    those that look a little like a policy field."""
    extras = {
        "id_token": "eyJ-ignored",
        "x_refresh_token_expires_in": 8726400,  # Intuit
        "refresh_token_expires_in": 15897600,  # GitHub apps
        "refresh_expires_in": 1800,  # Keycloak
        "not-before-policy": 0,
        "session_state": "s",
        "ext_expires_in": 3599,  # Microsoft
        "refresh_token_issued_at": NOW,
        "refresh_token_expires_at": NOW + 86400,
        "refresh_token_id": "rt-id",
        "realmId": "123",
    }
    new = parse(**extras)
    assert new.refresh_token_usage is None and new.refresh_token_lifetime is None


def test_import_names_the_line_of_a_misspelt_policy_field() -> None:
    lines = [
        {"id": "a", "provider": "p", "refresh_token": "rt-a"},
        {"id": "b", "provider": "p", "refresh_token": "rt-b", "refersh_token_usage": "one_time"},
    ]
    stream = io.StringIO("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(
        InputError,
        match=r'^in\.jsonl:2: unknown field "refersh_token_usage"; did you mean '
        r'"refresh_token_usage"\?$',
    ):
        parse_lines(
            stream,
            source="in.jsonl",
            providers={"p": object()},
            now=NOW,
            schedule=SCHEDULE,
            rand=iter(random.Random(1).random, None),
        )


def test_tokens_add_and_import_refuse_a_misspelt_policy_field_and_store_nothing(
    tmp_path: Path, idp_factory: IdPFactory
) -> None:
    idp = idp_factory(usage="one_time", grace_period=5)
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    first, second, third = idp.token_lines("p", 3)
    second["refersh_token_usage"] = "reuse"

    proc = run_cli(
        config,
        "tokens",
        "import",
        "-",
        input="".join(json.dumps(line) + "\n" for line in (first, second, third)),
    )
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert (
        'stdin:2: unknown field "refersh_token_usage"; did you mean "refresh_token_usage"?'
        in proc.stderr
    )
    assert "nothing was imported" in proc.stderr

    single = {k: v for k, v in second.items() if k not in ("id", "provider")}
    proc = run_cli(config, "tokens", "add", "x", "--provider", "p", input=json.dumps(single))
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert (
        'tokens add x: stdin: unknown field "refersh_token_usage"; '
        'did you mean "refresh_token_usage"?' in proc.stderr
    )
    listed = run_cli(config, "tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


# --------------------------------------------------------------------------- effective policy


async def test_effective_policy_prefers_the_sets_own_values(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "t.db")
    try:
        await store.add(parse(refresh_token_usage="one_time", grace_period=7), now=NOW)
        await store.add(
            NewTokenSet(
                id="plain",
                provider="p",
                refresh_token=Secret("rt-plain"),
                access_token=None,
                expires_at=None,
                next_refresh_at=NOW,
            ),
            now=NOW,
        )
        own, plain = await store.get("ts"), await store.get("plain")
        assert own is not None and plain is not None
    finally:
        await store.close()
    p = provider(usage="reuse", grace=0.0, lifetime=86400.0)
    assert policy.effective_policy(own, p)[:3] == (RefreshTokenUsage.ONE_TIME, 7.0, 86400.0)
    assert policy.effective_policy(plain, p)[:3] == (RefreshTokenUsage.REUSE, 0.0, 86400.0)


async def test_the_gauge_query_uses_a_sets_own_lifetime(store_location: Location) -> None:
    store = await open_store(store_location)
    try:
        await store.add(parse(refresh_token_lifetime="1d"), now=NOW)
        assert await store.refresh_expiry_soonest({"p": 30 * 86400.0}) == {"p": NOW + 86400.0}
        # The set's own lifetime overrides the provider's even when the provider's is shorter.
        assert await store.refresh_expiry_soonest({"p": 3600.0}) == {"p": NOW + 86400.0}
        await store.add(
            NewTokenSet(
                id="plain",
                provider="p",
                refresh_token=Secret("rt-plain"),
                access_token=None,
                expires_at=None,
                next_refresh_at=NOW,
            ),
            now=NOW,
        )
        assert await store.refresh_expiry_soonest({"p": 3600.0}) == {"p": NOW + 3600.0}
    finally:
        await store.close()


# --------------------------------------------------------------------------- the refresher


@dataclass
class Rig:
    store: SqliteStore
    idp: FakeIdP
    metrics: Metrics
    refresher: Refresher

    async def add(self, token_set_id: str, **policy_fields: Any) -> str:
        issued = self.idp.issue(token_set_id)
        now = time.time()
        await self.store.add(
            NewTokenSet(
                id=token_set_id,
                provider="p",
                refresh_token=Secret(str(issued["refresh_token"])),
                access_token=Secret(str(issued["access_token"])),
                expires_at=now + 3600,
                next_refresh_at=now + 2880,
                token_type="Bearer",
                **policy_fields,
            ),
            now=now,
        )
        return str(issued["refresh_token"])

    def grace_retries(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "refresherd_grace_retries_total", {"provider": "p"}
        )
        return 0.0 if value is None else value


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The provider is configured ``reuse`` (no grace); the IdP has since switched to rotating
    one-time tokens with a grace window — which only the sets authorized after it know."""
    store = await SqliteStore.open(tmp_path / "tokens.db")
    idp = FakeIdP(
        clients={CLIENT_ID: CLIENT_SECRET},
        usage="one_time",
        grace_period=4.0,
        access_token_lifetime=3600,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            providers = {"p": provider(usage="reuse", grace=0.0, url=idp.token_url)}
            endpoints = {"p": TokenEndpoint(providers["p"])}
            metrics = Metrics()
            refresher = build_refresher(
                store=store,
                providers=providers,
                endpoints=endpoints,
                schedule=SCHEDULE,
                metrics=metrics,
                owner="owner-a",
                lease_duration=30.0,
                rng=random.Random(1),
            ).refresher
            try:
                yield Rig(store, idp, metrics, refresher)
            finally:
                await endpoints["p"].aclose()
                tg.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_sets_own_one_time_policy_gets_a_grace_retry(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        old = await r.add("new", refresh_token_usage=RefreshTokenUsage.ONE_TIME, grace_period=4.0)
        r.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        result = await r.refresher.refresh("new")
        assert result.outcome == "refreshed" and result.detail == "sends=2"
        assert r.grace_retries() == 1
        assert r.idp.ledger.reuses_in_grace == 1 and r.idp.ledger.reuses_outside_grace == 0
        stored = await r.store.get("new")
        assert stored is not None and stored.refresh_token.reveal() != old
        assert r.idp.ledger.is_live(stored.refresh_token.reveal())


async def test_a_set_without_its_own_policy_follows_the_provider(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        old = await r.add("old")
        r.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        result = await r.refresher.refresh("old")
        # The provider says reuse: an ambiguous send is ordinary backoff, never a grace retry.
        assert (result.outcome, result.reason) == ("failed", "network_error")
        assert r.grace_retries() == 0 and r.idp.ledger.requests == 1
        stored = await r.store.get("old")
        assert stored is not None and stored.state is State.FAILING
        assert stored.refresh_token.reveal() == old
        assert stored.next_refresh_at > time.time() + 4


# --------------------------------------------------------------------------- tokens show


def test_tokens_show_reports_the_effective_policy_and_its_sources(
    tmp_path: Path, idp_factory: IdPFactory
) -> None:
    idp = idp_factory(usage="reuse", grace_period=0)
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": idp.provider(refresh_token_lifetime="30d")},
    )
    old, new = idp.token_lines("p", 2)
    new.update(refresh_token_usage="one_time", grace_period="30s")
    import_tokens(config, [old, new])

    shown = run_cli(config, "tokens", "show", str(new["id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["policy"] == {
        "refresh_token_usage": "one_time",
        "grace_period": 30.0,
        "refresh_token_lifetime": 30 * 86400.0,
        "refresh_token_idle_lifetime": None,
        "refresh_mode": "access_token",
        "source": {
            "refresh_token_usage": "token_set",
            "grace_period": "token_set",
            "refresh_token_lifetime": "provider",
            "refresh_token_idle_lifetime": "provider",
            "refresh_mode": "provider",
        },
    }
    listed = run_cli(config, "tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_id = {item["id"]: item["policy"] for item in json.loads(listed.stdout)}
    assert by_id[old["id"]]["refresh_token_usage"] == "reuse"
    assert set(by_id[old["id"]]["source"].values()) == {"provider"}

    text = run_cli(config, "tokens", "show", str(new["id"]))
    assert text.returncode == 0, text.stderr
    assert "policy.refresh_token_usage" in text.stdout
    assert "one_time (token_set)" in text.stdout and "30.0 (token_set)" in text.stdout

    bad = dict(idp.token_lines("p", 1, prefix="bad")[0], refresh_token_usage="maybe")
    proc = run_cli(config, "tokens", "import", "-", input=json.dumps(bad) + "\n")
    assert proc.returncode == 65
    assert "stdin:1: refresh_token_usage must be one of" in proc.stderr
