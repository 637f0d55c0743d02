"""Encryption at rest of the token columns: the cipher, the store with a cipher (real SQLite
files), and the real daemon and CLI with ``[encryption]``, a key rotation and a wrong key."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest
from conftest import (
    Daemons,
    IdPFactory,
    IdPHandle,
    find_leaks,
    import_tokens,
    read_rows,
    run_cli,
    toml_value,
    wait_until,
    write_config,
    write_secret,
)

from refresherd.config import ConfigError, load_config
from refresherd.encryption import (
    PREFIX,
    EncryptionError,
    TokenCipher,
    decode_key,
    key_id,
    key_id_of,
    new_key_text,
)
from refresherd.model import Secret, TokenSet
from refresherd.store import Location, NewTokenSet, StoreError, open_store
from refresherd.store.sqlite import SqliteStore

KEY_A = Secret(new_key_text())
KEY_B = Secret(new_key_text())


# --------------------------------------------------------------------------- the cipher


def test_seal_and_open_round_trip_under_the_current_key() -> None:
    cipher = TokenCipher(KEY_A)
    sealed = cipher.seal("rt-plain-value", row_id="ts-1", column="refresh_token")
    assert sealed.startswith(PREFIX) and "rt-plain-value" not in sealed
    assert key_id_of(sealed) == cipher.current_id == key_id(decode_key(KEY_A.reveal()))
    assert cipher.open(sealed, row_id="ts-1", column="refresh_token") == "rt-plain-value"
    # A fresh nonce each time: equal plaintexts do not show as equal ciphertexts.
    assert sealed != cipher.seal("rt-plain-value", row_id="ts-1", column="refresh_token")


def test_plaintext_rows_pass_through() -> None:
    assert TokenCipher(KEY_A).open("rt-from-before", row_id="x", column="refresh_token") == (
        "rt-from-before"
    )


def test_a_value_moved_to_another_row_or_column_does_not_open() -> None:
    cipher = TokenCipher(KEY_A)
    sealed = cipher.seal("rt-x", row_id="ts-1", column="refresh_token")
    for row_id, column in (("ts-2", "refresh_token"), ("ts-1", "access_token")):
        with pytest.raises(EncryptionError, match="does not open with key"):
            cipher.open(sealed, row_id=row_id, column=column)


def test_a_damaged_value_does_not_open_and_the_error_holds_no_secret() -> None:
    cipher = TokenCipher(KEY_A)
    sealed = cipher.seal("rt-secret-value", row_id="ts-1", column="refresh_token")
    damaged = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(EncryptionError) as info:
        cipher.open(damaged, row_id="ts-1", column="refresh_token")
    assert "rt-secret-value" not in str(info.value) and KEY_A.reveal() not in str(info.value)


def test_rotation_opens_old_values_and_seals_with_the_new_key() -> None:
    old = TokenCipher(KEY_A).seal("rt-old", row_id="ts-1", column="refresh_token")
    rotated = TokenCipher(KEY_B, [KEY_A])
    assert rotated.open(old, row_id="ts-1", column="refresh_token") == "rt-old"
    assert not rotated.is_current(old)
    assert rotated.is_current(rotated.seal("rt-new", row_id="ts-1", column="refresh_token"))
    with pytest.raises(EncryptionError, match=f"sealed with key {key_id_of(old)}"):
        TokenCipher(KEY_B).open(old, row_id="ts-1", column="refresh_token")


def test_repr_shows_key_ids_only() -> None:
    text = repr(TokenCipher(KEY_B, [KEY_A]))
    assert KEY_A.reveal() not in text and KEY_B.reveal() not in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not base64 at all!", "text that is not base64"),
        ("c2hvcnQ=", "got 5 bytes"),
    ],
)
def test_a_bad_key_file_is_a_config_error_naming_the_key(
    tmp_path: Path, content: str, expected: str
) -> None:
    key = tmp_path / "token.key"
    key.write_text(content + "\n")
    key.chmod(0o600)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\ndatabase = "db"\n[encryption]\nkey_file = "{key}"\n'
        '[providers.p]\ntoken_url = "https://idp.example/token"\nclient_id = "c"\n'
        'client_secret = "s"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(config, env={})
    assert str(info.value).startswith(f"{config}: encryption.key_file: ")
    assert expected in str(info.value) and content not in str(info.value)


# --------------------------------------------------------------------------- the store


def new(token_set_id: str) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider="p",
        refresh_token=Secret(f"rt-{token_set_id}-0123456789"),
        access_token=Secret(f"at-{token_set_id}-0123456789"),
        expires_at=2000.0,
        next_refresh_at=1500.0,
    )


def raw_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


@pytest.mark.anyio
async def test_no_plaintext_token_reaches_the_database_files(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = await SqliteStore.open(db, cipher=TokenCipher(KEY_A))
    try:
        await store.add_many([new("a"), new("b")], now=1000.0)
        claimed = await store.claim("a", owner="me", now=1000.0, lease_until=1060.0)
        assert isinstance(claimed, TokenSet)
        assert claimed.refresh_token.reveal() == "rt-a-0123456789"
        saved = await store.save_grant(
            "a",
            owner="me",
            expected_version=1,
            sent_refresh_token=Secret("rt-a-0123456789"),
            access_token=Secret("at-a-new-0123456789"),
            refresh_token=Secret("rt-a-new-0123456789"),
            token_type="Bearer",
            scope=None,
            expires_at=3000.0,
            next_refresh_at=2500.0,
            now=1001.0,
        )
        assert saved is not None and saved.refresh_token.reveal() == "rt-a-new-0123456789"
        # The compare-and-swap still refuses a token that is not the stored one.
        stale = await store.save_grant(
            "b",
            owner="me",
            expected_version=1,
            sent_refresh_token=Secret("rt-not-the-stored-one"),
            access_token=Secret("at-x"),
            refresh_token=Secret("rt-x"),
            token_type=None,
            scope=None,
            expires_at=None,
            next_refresh_at=0.0,
            now=1001.0,
        )
        assert stale is None
        got = await store.get("b")
        assert got is not None and got.access_token is not None
        assert got.access_token.reveal() == "at-b-0123456789"
    finally:
        await store.close()
    data = raw_bytes(db)
    needles = {
        b"rt-a-0123456789",
        b"at-a-0123456789",
        b"rt-a-new-0123456789",
        b"at-a-new-0123456789",
        b"rt-b-0123456789",
        b"at-b-0123456789",
    }
    assert not find_leaks(data, needles)
    for row in read_rows(db).values():
        assert row["refresh_token"].startswith(PREFIX) and row["access_token"].startswith(PREFIX)


@pytest.mark.anyio
async def test_rekey_moves_old_and_plaintext_rows_to_the_current_key(
    store_location: Location,
) -> None:
    db = store_location
    store = await open_store(db)  # no encryption yet: plaintext rows
    await store.add(new("plain"), now=1000.0)
    await store.close()
    store = await open_store(db, cipher=TokenCipher(KEY_A))
    await store.add(new("under-a"), now=1000.0)
    await store.close()
    rotated = TokenCipher(KEY_B, [KEY_A])
    store = await open_store(db, cipher=rotated)
    try:
        assert await store.sealed_key_ids() == {TokenCipher(KEY_A).current_id}
        assert await store.rekey(batch=1) == 2
        assert await store.sealed_key_ids() == {rotated.current_id}
        assert await store.rekey() == 0  # nothing left to do
    finally:
        await store.close()
    # Only the new key is needed now; every value opens.
    store = await open_store(db, cipher=TokenCipher(KEY_B))
    try:
        for token_set_id in ("plain", "under-a"):
            got = await store.get(token_set_id)
            assert got is not None
            assert got.refresh_token.reveal() == f"rt-{token_set_id}-0123456789"
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_missing_key_is_refused_at_open_and_the_rows_are_kept(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = await SqliteStore.open(db, cipher=TokenCipher(KEY_A))
    await store.add(new("a"), now=1000.0)
    await store.close()
    before = read_rows(db)
    a_id = TokenCipher(KEY_A).current_id
    with pytest.raises(StoreError, match=f"sealed with key\\(s\\) {a_id}, which the config"):
        await SqliteStore.open(db, cipher=TokenCipher(KEY_B))
    with pytest.raises(StoreError, match="token values are encrypted"):
        await SqliteStore.open(db)
    assert read_rows(db) == before


# --------------------------------------------------------------------------- end to end


def write_key(path: Path) -> Path:
    return write_secret(path, new_key_text())


def encrypted_config(
    path: Path, db: Path, idp: IdPHandle, key: Path, previous: list[Path] | None = None
) -> Path:
    write_config(path, database=db, providers={"idp": idp.provider()})
    text = path.read_text()
    text += f"\n[encryption]\nkey_file = {toml_value(key)}\n"
    if previous:
        text += "previous_key_files = [" + ", ".join(toml_value(p) for p in previous) + "]\n"
    path.write_text(text)
    return path


def test_daemon_and_cli_with_encryption_rotation_and_a_wrong_key(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(access_token_lifetime=4, grace_period=5)
    db = tmp_path / "tokens.db"
    key_a = write_key(tmp_path / "a.key")
    key_b = write_key(tmp_path / "b.key")
    config = encrypted_config(tmp_path / "refresherd.toml", db, idp, key_a)
    import_tokens(config, idp.token_lines("idp", 3))
    daemon = daemons(config, "first")
    wait_until(lambda: idp.ledger.refreshes >= 6, what="two rounds of refreshes")
    assert daemon.stop() == 0

    def no_token_on_disk() -> None:
        needles = {t.encode() for t in idp.ledger.issued_tokens()}
        assert not find_leaks(raw_bytes(db), needles), "a plaintext token in the database files"

    no_token_on_disk()
    shown = run_cli(config, "tokens", "list", "--json", "--reveal")
    assert shown.returncode == 0, shown.stderr
    assert all(idp.ledger.is_live(item) for item in _refresh_tokens(shown.stdout))

    # A config with another key only: refused at start, nothing sent, rows kept.
    wrong = encrypted_config(tmp_path / "wrong.toml", db, idp, key_b)
    before, requests = read_rows(db), idp.ledger.requests
    refused = daemons(wrong, "wrong", start=False)
    refused.start(wait_listening=False)
    assert refused.wait_exit() == 1
    (line,) = refused.events("cannot use the database")
    assert "previous_key_files" in line["error"]
    assert read_rows(db) == before and idp.ledger.requests == requests

    # Rotation: B current, A previous; the daemon keeps refreshing (new grants under B).
    rotated = encrypted_config(tmp_path / "rotated.toml", db, idp, key_b, [key_a])
    daemon = daemons(rotated, "rotated")
    refreshed = idp.ledger.refreshes
    wait_until(lambda: idp.ledger.refreshes >= refreshed + 3, what="refreshes under key B")
    rekey = run_cli(rotated, "rekey")
    assert rekey.returncode == 0, rekey.stderr
    b_id = TokenCipher(Secret(key_b.read_text().strip())).current_id
    assert f"keys in use now: {b_id}" in rekey.stdout
    assert daemon.stop() == 0
    # A alone is no longer needed.
    only_b = encrypted_config(tmp_path / "only-b.toml", db, idp, key_b)
    daemon = daemons(only_b, "only-b")
    refreshed = idp.ledger.refreshes
    wait_until(lambda: idp.ledger.refreshes >= refreshed + 3, what="refreshes with key B only")
    assert daemon.stop() == 0
    no_token_on_disk()
    assert idp.ledger.invalid_grants == 0 and idp.ledger.reuses_outside_grace == 0
    assert all(row["state"] == "active" for row in read_rows(db).values())


def _refresh_tokens(stdout: str) -> list[str]:
    return [item["refresh_token"] for item in json.loads(stdout)]


def test_the_read_contract_view_shows_sealed_values(tmp_path: Path) -> None:
    """What an application reading the database directly gets with encryption on: sealed
    access tokens, which it opens with the same key (refresherd.encryption.TokenCipher)."""
    db = tmp_path / "tokens.db"

    async def add() -> None:
        store = await SqliteStore.open(db, cipher=TokenCipher(KEY_A))
        try:
            await store.add(new("a"), now=1000.0)
        finally:
            await store.close()

    anyio.run(add)
    with sqlite3.connect(db) as conn:
        (value,) = conn.execute(
            "SELECT access_token FROM refresherd_access_tokens WHERE id = 'a'"
        ).fetchone()
    assert value.startswith(PREFIX)
    opened = TokenCipher(KEY_A).open(value, row_id="a", column="access_token")
    assert opened == "at-a-0123456789"
