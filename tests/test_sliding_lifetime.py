"""Sliding (idle) lifetimes, the keep-alive mode, and the warning ahead of an absolute expiry."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from conftest import (
    Daemons,
    IdPFactory,
    database_at_version,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
    write_config,
)

from refresherd import policy
from refresherd.config import ConfigError, parse_config
from refresherd.expiry import ExpiryWatcher
from refresherd.intake import token_set_from_json
from refresherd.metrics import Metrics
from refresherd.model import Attempt, RefreshMode, Secret, State, TokenSet
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.store.migrations import SCHEMA_VERSION
from refresherd.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
DAY = 86400.0
SCHEDULE = ScheduleConfig()
PROVIDER = ProviderConfig(
    name="p", token_url="https://idp.example/token", client_id="c", client_secret=Secret("s")
)


def token_set(**changes: object) -> TokenSet:
    ts = TokenSet(
        id="ts",
        provider="p",
        refresh_token=Secret("rt"),
        access_token=Secret("at"),
        expires_at=NOW + 3600,
        state=State.ACTIVE,
        version=1,
        next_refresh_at=NOW,
        created_at=NOW,
        updated_at=NOW,
    )
    return replace(ts, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure decisions


def test_effective_policy_takes_the_sets_idle_lifetime_and_mode_over_the_providers() -> None:
    provider = replace(PROVIDER, refresh_token_idle_lifetime=30 * DAY)
    eff = policy.effective_policy(token_set(), provider)
    assert (eff.refresh_token_idle_lifetime, eff.mode) == (30 * DAY, RefreshMode.ACCESS_TOKEN)
    own = token_set(refresh_token_idle_lifetime=7 * DAY, refresh_mode=RefreshMode.KEEP_ALIVE)
    eff = policy.effective_policy(own, provider)
    assert (eff.refresh_token_idle_lifetime, eff.mode) == (7 * DAY, RefreshMode.KEEP_ALIVE)


def test_keep_alive_without_any_idle_lifetime_falls_back_to_the_access_token() -> None:
    eff = policy.effective_policy(token_set(refresh_mode=RefreshMode.KEEP_ALIVE), PROVIDER)
    assert eff.mode is RefreshMode.ACCESS_TOKEN
    assert policy.keep_alive_at(token_set(), eff, SCHEDULE, rand=0.5) is None


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_keep_alive_refreshes_only_ahead_of_the_end_of_the_sliding_lifetime(rand: float) -> None:
    eff = policy.effective_policy(
        token_set(),
        replace(
            PROVIDER, refresh_token_idle_lifetime=30 * DAY, refresh_mode=RefreshMode.KEEP_ALIVE
        ),
    )
    at = policy.plan_after_refresh(
        now=NOW,
        access_expires_at=NOW + 3600,
        access_lifetime=3600,
        eff=eff,
        cfg=SCHEDULE,
        rand=rand,
    )
    # 80 % of 30 days, less up to 10 % of that lead as jitter: days ahead, never an hour.
    lead = 30 * DAY * 0.8
    assert NOW + lead * 0.9 <= at <= NOW + lead
    assert at < NOW + 30 * DAY


def test_access_token_mode_never_waits_past_the_sliding_lifetime() -> None:
    short_idle = replace(PROVIDER, refresh_token_idle_lifetime=600.0)
    eff = policy.effective_policy(token_set(), short_idle)
    at = policy.plan_after_refresh(
        now=NOW,
        access_expires_at=NOW + 3 * DAY,
        access_lifetime=3 * DAY,
        eff=eff,
        cfg=SCHEDULE,
        rand=0.0,
    )
    assert at == NOW + 600 * 0.8  # the idle lifetime is the earlier deadline
    long_idle = policy.effective_policy(
        token_set(), replace(PROVIDER, refresh_token_idle_lifetime=90 * DAY)
    )
    at = policy.plan_after_refresh(
        now=NOW,
        access_expires_at=NOW + 3600,
        access_lifetime=3600,
        eff=long_idle,
        cfg=SCHEDULE,
        rand=0.0,
    )
    assert at == NOW + 3600 * 0.8  # the access token is


def test_keep_alive_due_time_counts_from_the_last_refresh_and_not_for_unfinished_work() -> None:
    provider = replace(
        PROVIDER, refresh_token_idle_lifetime=1000.0, refresh_mode=RefreshMode.KEEP_ALIVE
    )
    fresh = token_set()
    eff = policy.effective_policy(fresh, provider)
    assert policy.keep_alive_at(fresh, eff, SCHEDULE, rand=0.0) == NOW + 800
    later = token_set(last_refresh_at=NOW + 500)
    assert policy.keep_alive_at(later, eff, SCHEDULE, rand=0.0) == NOW + 1300
    assert policy.keep_alive_at(later, eff, SCHEDULE, rand=1.0) == NOW + 1300 - 80
    # A failing set, or one with a journaled attempt, is due when the scheduler says so.
    assert policy.keep_alive_at(token_set(state=State.FAILING), eff, SCHEDULE, rand=0.0) is None
    attempt = Attempt(version=1, started_at=NOW, owner="o", sends=1)
    assert policy.keep_alive_at(token_set(attempt=attempt), eff, SCHEDULE, rand=0.0) is None


def test_the_absolute_expiry_is_the_idps_word_else_creation_plus_the_lifetime() -> None:
    eff = policy.effective_policy(token_set(), replace(PROVIDER, refresh_token_lifetime=DAY))
    assert policy.refresh_token_expires_at(token_set(), eff) == NOW + DAY
    stated = token_set(refresh_expires_at=NOW + 5)
    assert policy.refresh_token_expires_at(stated, eff) == NOW + 5
    assert (
        policy.refresh_token_expires_at(token_set(), policy.effective_policy(token_set(), PROVIDER))
        is None
    )


@pytest.mark.parametrize(
    ("expires_at", "warned_for", "due"),
    [
        (None, None, False),  # unknown expiry
        (NOW + 8 * DAY, None, False),  # beyond the horizon
        (NOW + 6 * DAY, None, True),
        (NOW - 1, None, True),  # already past: still said, once
        (NOW + 6 * DAY, NOW + 6 * DAY, False),  # said for this expiry
        (NOW + 6 * DAY, NOW + 6 * DAY - 3600, False),  # a rolling expiry moved by an hour
        (NOW + 6 * DAY, NOW - 300 * DAY, True),  # authorized again since: a new expiry
    ],
)
def test_the_expiry_warning_is_given_once_per_expiry_within_the_horizon(
    expires_at: float | None, warned_for: float | None, due: bool
) -> None:
    assert (
        policy.expiry_warning_due(
            expires_at=expires_at, warned_for=warned_for, now=NOW, horizon=7 * DAY
        )
        is due
    )


# --------------------------------------------------------------------------- config and input


def provider_toml(**keys: str) -> str:
    lines = [
        "[daemon]",
        'database = "t.db"',
        "[providers.p]",
        'token_url = "https://idp.example/token"',
        'client_id = "c"',
        'client_secret_env = "SECRET"',
    ]
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def load(text: str) -> ProviderConfig:
    cfg = parse_config(text, source="c.toml", base_dir=Path("."), env={"SECRET": "s"})
    return cfg.providers["p"]


def test_config_reads_the_idle_lifetime_the_mode_and_the_warning_horizon() -> None:
    p = load(provider_toml(refresh_token_idle_lifetime="30d", refresh_mode="keep_alive"))
    assert (p.refresh_token_idle_lifetime, p.refresh_mode) == (30 * DAY, RefreshMode.KEEP_ALIVE)
    assert load(provider_toml()).refresh_mode is RefreshMode.ACCESS_TOKEN
    text = provider_toml() + '[schedule]\nrefresh_token_expiry_warning = "14d"\n'
    cfg = parse_config(text, source="c.toml", base_dir=Path("."), env={"SECRET": "s"})
    assert cfg.schedule.refresh_token_expiry_warning == 14 * DAY
    assert ScheduleConfig().refresh_token_expiry_warning == 7 * DAY


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"refresh_mode": "keep_alive"}, "providers.p.refresh_mode"),
        ({"refresh_mode": "sometimes"}, '"access_token", "keep_alive"'),
        ({"refresh_token_idle_lifetime": "0s"}, "providers.p.refresh_token_idle_lifetime"),
    ],
)
def test_config_refuses_a_keep_alive_without_a_sliding_lifetime_and_bad_values(
    keys: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(provider_toml(**keys))
    assert message in str(caught.value)
    if keys.get("refresh_mode") == "keep_alive":
        assert "refresh_token_idle_lifetime" in str(caught.value)


def test_presets_carry_the_documented_sliding_lifetimes() -> None:
    # provider_toml writes a token_url already; the preset's values sit under it.
    assert load(provider_toml(preset="entra-id")).refresh_token_idle_lifetime == 90 * DAY
    google = load(provider_toml(preset="google", refresh_token_idle_lifetime="30d"))
    assert google.refresh_token_idle_lifetime == 30 * DAY  # an explicit key wins


def test_a_token_set_may_carry_its_own_idle_lifetime_and_mode() -> None:
    def parse(**extra: object) -> object:
        return token_set_from_json(
            {"refresh_token": "rt", **extra},
            token_set_id="a",
            provider="p",
            now=NOW,
            schedule=SCHEDULE,
            rand=0.5,
        )

    new = parse(refresh_token_idle_lifetime="14d", refresh_mode="keep_alive")
    assert new.refresh_token_idle_lifetime == 14 * DAY  # type: ignore[attr-defined]
    assert new.refresh_mode is RefreshMode.KEEP_ALIVE  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="refresh_mode must be one of"):
        parse(refresh_mode="rarely")
    with pytest.raises(ValueError, match="refresh_token_idle_lifetime must be positive"):
        parse(refresh_token_idle_lifetime=0)


# --------------------------------------------------------------------------- store and watcher


class StepClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_watcher_warns_once_per_expiry_and_again_after_a_new_authorization(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(tmp_path / "t.db")
    try:
        near = token_set_from_json(
            {"refresh_token": "rt-near", "refresh_token_expires_in": 2 * DAY},
            token_set_id="near",
            provider="p",
            now=NOW,
            schedule=SCHEDULE,
            rand=0.5,
        )
        far = token_set_from_json(
            {"refresh_token": "rt-far", "refresh_token_expires_in": 300 * DAY},
            token_set_id="far",
            provider="p",
            now=NOW,
            schedule=SCHEDULE,
            rand=0.5,
        )
        configured = token_set_from_json(
            {"refresh_token": "rt-cfg"},
            token_set_id="configured",
            provider="p",
            now=NOW - 29 * DAY,
            schedule=SCHEDULE,
            rand=0.5,
        )
        await store.add_many([near, far], now=NOW)
        await store.add(configured, now=NOW - 29 * DAY)
        heard: list[tuple[str, float]] = []

        async def listen(ts: TokenSet, expires_at: float) -> None:
            heard.append((ts.id, expires_at))

        metrics = Metrics()
        clock = StepClock(NOW)
        provider = replace(PROVIDER, refresh_token_lifetime=30 * DAY)
        watcher = ExpiryWatcher(
            store=store,
            metrics=metrics,
            clock=clock,
            providers=lambda: {"p": provider},
            schedule=lambda: SCHEDULE,
            on_expiring=listen,
        )
        assert await watcher.scan() == 2
        assert sorted(heard) == [("configured", NOW + DAY), ("near", NOW + 2 * DAY)]
        assert metrics.refresh_tokens_expiring.labels("p")._value.get() == 2
        # A second scan, or a restarted daemon (the mark is in the database), is quiet.
        assert (
            await ExpiryWatcher(
                store=store,
                metrics=metrics,
                clock=clock,
                providers=lambda: {"p": provider},
                schedule=lambda: SCHEDULE,
                on_expiring=listen,
            ).scan()
            == 0
        )
        # The customer authorized again: "near" is replaced and, a year on, expires again.
        assert await store.remove("near")
        clock.now = NOW + 363 * DAY
        again = token_set_from_json(
            {"refresh_token": "rt-near-2", "refresh_token_expires_in": 2 * DAY},
            token_set_id="near",
            provider="p",
            now=clock.now,
            schedule=SCHEDULE,
            rand=0.5,
        )
        await store.add(again, now=clock.now)
        heard.clear()
        assert await watcher.scan() >= 1
        assert ("near", clock.now + 2 * DAY) in heard
    finally:
        await store.close()


def test_a_version_3_database_gains_the_sliding_lifetime_columns(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    with database_at_version(path, 3) as conn:
        conn.execute(
            "INSERT INTO token_sets (id, provider, refresh_token, next_refresh_at, created_at,"
            " updated_at, grace_period) VALUES ('old', 'p', 'rt-old', 0, 0, 0, 7)"
        )

    async def reopen() -> None:
        store = await SqliteStore.open(path)
        try:
            assert await store.schema_version() == SCHEMA_VERSION >= 4
            old = await store.get("old")
            assert old is not None and old.grace_period == 7
            assert (old.refresh_token_idle_lifetime, old.refresh_mode, old.expiry_warned_for) == (
                None,
                None,
                None,
            )
        finally:
            await store.close()

    anyio.run(reopen)
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE token_sets SET refresh_mode = 'rarely'")


# --------------------------------------------------------------------------- the real daemon


@pytest.mark.slow
def test_keep_alive_refreshes_as_the_sliding_lifetime_requires_and_keeps_tokens_alive(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    # Access tokens live 3 s, refresh tokens die after 20 s unused (at the IdP too).
    idp = idp_factory(access_token_lifetime=3.0, refresh_token_idle_lifetime=20.0)
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": idp.provider(refresh_token_idle_lifetime="20s", refresh_mode="keep_alive")},
        schedule={"min_margin": "2s", "min_interval": "1s"},
    )
    import_tokens(config, idp.token_lines("p", 5))
    imported = time.time()
    daemon = daemons(config)
    # Access-token mode would refresh each set every ~2.4 s; keep-alive waits for 80 % of the
    # idle lifetime (16 s, less up to 1.6 s jitter) after the import.
    time.sleep(max(0.0, imported + 12.0 - time.time()))
    assert idp.ledger.refreshes == 0
    wait_until(lambda: idp.ledger.refreshes >= 5, timeout=30, what="one keep-alive round")
    first_round = time.time()
    rows = read_rows(tmp_path / "tokens.db")
    assert all(r["version"] == 2 for r in rows.values()), rows
    # Through two more idle lifetimes, the refresh tokens stay alive with ~1 refresh per 16 s.
    time.sleep(max(0.0, first_round + 40.0 - time.time()))
    assert daemon.stop() == 0
    rows = read_rows(tmp_path / "tokens.db")
    for row in rows.values():
        assert row["state"] == "active"
        assert idp.ledger.is_live(row["refresh_token"])
        assert 3 <= row["version"] <= 5, row["version"]  # not ~20 refreshes each
    assert idp.ledger.invalid_grants == 0
    shown = json.loads(run_cli(config, "tokens", "show", "ts-0000", "--json").stdout)
    assert shown["policy"]["refresh_mode"] == "keep_alive"
    assert shown["policy"]["refresh_token_idle_lifetime"] == 20.0
    assert shown["policy"]["source"]["refresh_mode"] == "provider"


def test_the_daemon_warns_once_ahead_of_an_absolute_expiry(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    idp = idp_factory()
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": idp.provider(refresh_token_lifetime="1h")},
        schedule={"refresh_token_expiry_warning": "2h"},
    )
    import_tokens(config, idp.token_lines("p", 3))
    # Before any daemon ran, the CLI lists what expires within a horizon.
    listed = run_cli(config, "tokens", "list", "--expiring-within", "2h", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    assert (
        json.loads(run_cli(config, "tokens", "list", "--expiring-within", "30m", "--json").stdout)
        == []
    )
    text = run_cli(config, "tokens", "list", "--expiring-within", "2h").stdout.splitlines()
    assert "refresh_token_expires_at" in text[0].split() and len(text) == 4
    bad = run_cli(config, "tokens", "list", "--expiring-within", "soon")
    assert bad.returncode == 64 and "--expiring-within" in bad.stderr
    daemon = daemons(config)
    lines = daemon.wait_for_event("refresh token expiring", count=3)
    assert sorted(line["token_set"] for line in lines) == ["ts-0000", "ts-0001", "ts-0002"]
    assert all(line["level"] == "warning" and line["provider"] == "p" for line in lines)
    assert wait_until(
        lambda: (
            metric(daemon.metrics(), "refresherd_refresh_tokens_expiring", provider="p") == 3
            or None
        ),
        what="the expiring gauge",
    )
    assert daemon.stop() == 0
    # Restarted, it does not say it again: the warning is remembered in the database.
    again = daemons(config, name="again")
    wait_until(
        lambda: (
            metric(again.metrics(), "refresherd_refresh_tokens_expiring", provider="p") == 3 or None
        ),
        what="the gauge after a restart",
    )
    assert again.events("refresh token expiring") == []
    assert again.stop() == 0
