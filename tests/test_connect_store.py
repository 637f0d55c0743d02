"""Connect links in the store, on both backends: a state is kept by its digest, taken once by
one statement whichever store (daemon) asks, its PKCE verifier sealed like tokens; expired
states are pruned; an invalidated set is authorized again in place."""

from __future__ import annotations

import secrets

import anyio
import pytest
from test_store import NOW, RawDatabase, leased, new, record_first_failure
from test_store import raw as raw  # the fixtures
from test_store import store as store

from refresherd.connect import PendingConnection, state_digest
from refresherd.encryption import TokenCipher, new_key_text
from refresherd.model import Secret, State
from refresherd.store import Location, NewTokenSet, StoreError, TokenStore, open_store


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pending(
    state: str, *, verifier: str | None = "v" * 43, expires_at: float = NOW + 600
) -> PendingConnection:
    return PendingConnection(
        digest=state_digest(state),
        provider="visma",
        token_set_id="customer-1",
        redirect_uri="https://refresherd.example/connect/visma/callback",
        return_url="https://app.example/done?x=1",
        code_verifier=Secret(verifier) if verifier is not None else None,
        created_at=NOW,
        expires_at=expires_at,
    )


@pytest.mark.anyio
async def test_a_state_is_kept_by_its_digest_and_taken_once(
    store: TokenStore, raw: RawDatabase
) -> None:
    state = secrets.token_urlsafe(32)
    await store.add_connect_state(pending(state))
    _, rows = await raw.fetch("SELECT * FROM connect_states")
    assert len(rows) == 1
    # The state itself is nowhere in the database: only its SHA-256.
    assert state not in repr(rows) and rows[0]["state_digest"] == state_digest(state)
    taken = await store.take_connect_state(state_digest(state))
    assert taken == pending(state)
    assert taken is not None and taken.code_verifier is not None
    assert taken.code_verifier.reveal() == "v" * 43
    # Used: gone for every later callback.
    assert await store.take_connect_state(state_digest(state)) is None
    assert (await raw.fetch("SELECT * FROM connect_states"))[1] == []


@pytest.mark.anyio
async def test_of_many_concurrent_takes_in_two_stores_exactly_one_gets_the_state(
    store_location: Location,
) -> None:
    """Two daemons of a fleet, each with its own store on one database, receive the same
    callback many times at once: the state is taken by exactly one of them, once."""
    stores = [await open_store(store_location) for _ in range(2)]
    try:
        states = [secrets.token_urlsafe(32) for _ in range(5)]
        for state in states:
            await stores[0].add_connect_state(pending(state))
        for state in states:
            got: list[PendingConnection | None] = []

            async def take(
                s: TokenStore, state: str = state, got: list[PendingConnection | None] = got
            ) -> None:
                got.append(await s.take_connect_state(state_digest(state)))

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(take, stores[i % 2])
            assert sum(1 for g in got if g is not None) == 1, got
    finally:
        for s in stores:
            await s.close()


@pytest.mark.anyio
async def test_expired_states_are_pruned_and_fresh_ones_kept(store: TokenStore) -> None:
    old, young = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await store.add_connect_state(pending(old, expires_at=NOW - 10))
    await store.add_connect_state(pending(young, expires_at=NOW + 600, verifier=None))
    assert await store.prune_connect_states(expired_before=NOW) == 1
    assert await store.prune_connect_states(expired_before=NOW) == 0
    assert await store.take_connect_state(state_digest(old)) is None
    taken = await store.take_connect_state(state_digest(young))
    assert taken is not None and taken.code_verifier is None


@pytest.mark.anyio
async def test_the_verifier_is_sealed_at_rest_and_bound_to_its_state(
    store_location: Location, raw: RawDatabase
) -> None:
    cipher = TokenCipher(Secret(new_key_text()))
    store = await open_store(store_location, cipher=cipher)
    try:
        state, other = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(32)
        await store.add_connect_state(pending(state, verifier=verifier))
        await store.add_connect_state(pending(other, verifier="w" * 43))
        _, rows = await raw.fetch("SELECT state_digest, code_verifier FROM connect_states")
        stored = {r["state_digest"]: r["code_verifier"] for r in rows}
        assert stored[state_digest(state)].startswith("enc:v1:")
        assert verifier not in repr(rows)
        # A sealed verifier copied to another state's row does not open there.
        await raw.execute(
            f"UPDATE connect_states SET code_verifier = '{stored[state_digest(state)]}'"
            f" WHERE state_digest = '{state_digest(other)}'"
        )
        with pytest.raises(StoreError) as info:
            await store.take_connect_state(state_digest(other))
        assert verifier not in str(info.value)
        taken = await store.take_connect_state(state_digest(state))
        assert taken is not None and taken.code_verifier == Secret(verifier)
    finally:
        await store.close()


def grant(token_set_id: str, refresh: str) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider="visma",
        refresh_token=Secret(refresh),
        access_token=Secret("AT-new-s3cr3t"),
        expires_at=NOW + 7200,
        next_refresh_at=NOW + 5000,
        token_type="Bearer",
        scope=None,
        refresh_expires_at=NOW + 86400,
    )


@pytest.mark.anyio
async def test_an_invalidated_set_is_authorized_again_in_place(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW - 1000)
    await leased(store, "a")
    assert await record_first_failure(store, "a", error="invalid_grant: revoked")
    # Only that invalidated version of that provider.
    assert await store.reauthorize("a", expected_version=2, new=grant("a", "RT-2"), now=NOW) is None
    wrong = grant("a", "RT-2")
    wrong = NewTokenSet(
        id=wrong.id,
        provider="google",
        refresh_token=wrong.refresh_token,
        access_token=wrong.access_token,
        expires_at=wrong.expires_at,
        next_refresh_at=wrong.next_refresh_at,
    )
    assert await store.reauthorize("a", expected_version=1, new=wrong, now=NOW) is None
    again = await store.reauthorize("a", expected_version=1, new=grant("a", "RT-2"), now=NOW + 5)
    assert again is not None
    assert again.state is State.ACTIVE and again.version == 2
    assert again.refresh_token.reveal() == "RT-2" and again.created_at == NOW - 1000
    assert again.invalid_reason is None and again.failures == 0 and again.last_error is None
    assert again.refresh_expires_at == NOW + 86400 and again.expires_at == NOW + 7200
    assert again.scope == "openid offline_access"  # the grant named none: kept
    assert await store.get("a") == again
    # Active now: a second re-authorization of that version is refused.
    assert await store.reauthorize("a", expected_version=1, new=grant("a", "RT-3"), now=NOW) is None
