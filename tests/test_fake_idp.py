"""The fake IdP over real loopback HTTP, as an httpx client (like refresherd's) sees it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from refresherd.testing import FakeIdP, FaultKind, RotationStats, running_in_thread

CLIENT_ID = "refresherd"
CLIENT_SECRET = "refresherd-secret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def serving(
    timeout: float = 5.0, **kwargs: Any
) -> AsyncIterator[tuple[FakeIdP, httpx.AsyncClient]]:
    """A served FakeIdP(**kwargs) and an httpx client for it."""
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=timeout) as client:
        idp: FakeIdP = await tg.start(FakeIdP(**kwargs).serve)
        try:
            yield idp, client
        finally:
            tg.cancel_scope.cancel()


async def refresh(
    client: httpx.AsyncClient,
    idp: FakeIdP,
    refresh_token: str,
    *,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    **extra: str,
) -> httpx.Response:
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": client_id,
        "client_secret": client_secret,
        **extra,
    }
    return await client.post(idp.token_url, data=form)


def basic(client_id: str, secret: str) -> str:
    # RFC 6749 2.3.1: form-urlencode each half, then base64 (httpx's auth= skips the first step).
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def rt(response: httpx.Response) -> str:
    value = response.json()["refresh_token"]
    assert isinstance(value, str)
    return value


# ------------------------------------------------------------------ one-time tokens


@pytest.mark.anyio
async def test_rotation_returns_a_new_refresh_token_and_kills_the_old_after_grace() -> None:
    clock = FakeClock()
    async with serving(clock=clock, grace_period=5) as (idp, client):
        issued = idp.issue("alice")
        assert set(issued) == {"access_token", "refresh_token", "expires_in", "token_type", "scope"}
        old = str(issued["refresh_token"])
        assert old.startswith("rt_") and str(issued["access_token"]).startswith("at_")

        response = await refresh(client, idp, old)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
        assert body["scope"] == "openid offline_access"
        new = body["refresh_token"]
        assert new != old and new.startswith("rt_")
        assert idp.ledger.family_of(new) == idp.ledger.family_of(old)
        assert idp.ledger.is_live(old)  # used, but inside its grace window
        clock.advance(5)
        assert not idp.ledger.is_live(old)
        assert idp.ledger.is_live(new)
        assert idp.ledger.live_refresh_tokens("alice") == {new}
        assert idp.ledger.refreshes == 1
        assert {old, new, body["access_token"]} <= idp.ledger.issued_tokens()


@pytest.mark.anyio
async def test_grace_reuse_inside_mints_another_token_outside_is_invalid_grant() -> None:
    clock = FakeClock()
    # reuse_revokes="none": the late reuse is refused and costs nothing else (see below for
    # the IdPs that revoke the family or the user for it).
    async with serving(clock=clock, grace_period=5, reuse_revokes="none") as (idp, client):
        first = str(idp.issue("alice")["refresh_token"])
        second = rt(await refresh(client, idp, first))

        clock.advance(4.9)  # grace counts from the first use
        again = await refresh(client, idp, first)
        assert again.status_code == 200
        third = rt(again)
        assert third not in (first, second)
        assert idp.ledger.reuses_in_grace == 1

        clock.advance(0.2)
        late = await refresh(client, idp, first)
        assert late.status_code == 400
        assert late.json()["error"] == "invalid_grant"
        assert "error_description" in late.json()
        assert idp.ledger.reuses_outside_grace == 1
        assert idp.ledger.invalid_grants == 1
        assert idp.ledger.live_refresh_tokens() == {second, third}
        assert idp.ledger.refreshes == 2
        assert idp.ledger.reuse_revoked_families == 0
        assert idp.ledger.siblings_per_rotation() == [1]  # first minted second and third
        assert idp.ledger.sends_per_window() == [3]  # first, its grace re-send, the late one


@pytest.mark.anyio
async def test_grace_answer_same_pair_repeats_the_first_answer() -> None:
    clock = FakeClock()
    async with serving(clock=clock, grace_period=5, grace_answer="same_pair") as (idp, client):
        first = str(idp.issue("alice")["refresh_token"])
        answer = (await refresh(client, idp, first)).json()
        successor = answer["refresh_token"]

        clock.advance(3)
        again = await refresh(client, idp, first)
        assert again.status_code == 200
        # django-oauth-toolkit: the same refresh and access token, nothing new minted.
        assert again.json() == answer
        assert idp.ledger.reuses_in_grace == 1 and idp.ledger.refreshes == 2
        assert idp.ledger.live_refresh_tokens("alice") == {first, successor}
        # Even once the successor was rotated itself, a grace re-send gets that pair back.
        newest = rt(await refresh(client, idp, successor))
        clock.advance(1.9)
        assert (await refresh(client, idp, first)).json() == answer
        assert idp.ledger.siblings_per_rotation() == [0, 0]
        assert idp.ledger.sends_per_window() == [3, 1]
        clock.advance(0.2)
        assert idp.ledger.live_refresh_tokens("alice") == {successor, newest}

        # A setting, like a real IdP's, applies to authorizations made after the change.
        idp.grace_answer = "sibling"
        later = str(idp.issue("bob")["refresh_token"])
        assert rt(await refresh(client, idp, later)) != rt(await refresh(client, idp, later))
        assert (await refresh(client, idp, successor)).json()["refresh_token"] == newest
        with pytest.raises(ValueError, match="grace_answer"):
            FakeIdP(grace_answer="again")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reuse_revokes"):
            FakeIdP(reuse_revokes="all")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_grace_answer_sibling_keeps_every_successor_live() -> None:
    clock = FakeClock()
    async with serving(clock=clock, grace_period=5) as (idp, client):
        assert idp.grace_answer == "sibling"  # IdentityServer, Auth0: the default
        first = str(idp.issue("alice")["refresh_token"])
        successors = [rt(await refresh(client, idp, first)) for _ in range(3)]
        assert len(set(successors)) == 3
        clock.advance(5)
        assert idp.ledger.live_refresh_tokens("alice") == set(successors)
        assert idp.ledger.siblings_per_rotation() == [2]


@pytest.mark.anyio
async def test_reuse_outside_grace_revokes_the_family_by_default() -> None:
    clock = FakeClock()
    async with serving(clock=clock, grace_period=5) as (idp, client):
        assert idp.reuse_revokes == "family"
        first = str(idp.issue("alice")["refresh_token"])
        other_company = str(idp.issue("alice")["refresh_token"])  # the same user, a 2nd family
        second = rt(await refresh(client, idp, first))
        third = rt(await refresh(client, idp, second))
        clock.advance(5)

        late = await refresh(client, idp, first)
        assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
        assert idp.ledger.reuses_outside_grace == 1
        assert idp.ledger.reuse_revoked_families == 1
        assert not idp.ledger.is_live(third)  # the whole family, the live successor included
        assert not idp.ledger.family_has_live_token(idp.ledger.family_of(first))
        assert idp.ledger.live_refresh_tokens("alice") == {other_company}
        [event] = [e for e in idp.ledger.events if e["kind"] == "reuse_revoked"]
        assert event["scope"] == "family" and event["tokens"] == 3
        # Presented again, the family is merely revoked: no second revocation is counted.
        assert (await refresh(client, idp, third)).status_code == 400
        assert idp.ledger.reuse_revoked_families == 1
        assert idp.ledger.reuses_outside_grace == 1
        # The client that stored the consumed token missed its window; one that stored the
        # successor lost it to the reuse.
        assert idp.ledger.loss_cause(first) == "missed_window"
        assert idp.ledger.loss_cause(third) == "revoked_reuse"
        assert idp.ledger.loss_cause(other_company) is None
        assert idp.ledger.missed_windows([first, third, other_company]) == 1


@pytest.mark.anyio
async def test_reuse_outside_grace_revokes_every_token_of_the_user_and_client() -> None:
    clock = FakeClock()
    clients = {CLIENT_ID: CLIENT_SECRET, "other": "other-secret"}
    async with serving(clock=clock, clients=clients, reuse_revokes="user") as (idp, client):
        first = str(idp.issue("alice")["refresh_token"])
        same_user = str(idp.issue("alice")["refresh_token"])
        other_client = str(idp.issue("alice", client_id="other")["refresh_token"])
        other_user = str(idp.issue("bob")["refresh_token"])
        idp.reuse_revokes = "none"  # applies to new authorizations only
        unpunished = str(idp.issue("carol")["refresh_token"])
        await refresh(client, idp, first)
        clock.advance(5)

        assert (await refresh(client, idp, first)).status_code == 400
        assert idp.ledger.reuse_revoked_families == 2
        assert not idp.ledger.is_live(same_user)
        assert idp.ledger.loss_cause(same_user) == "revoked_reuse"
        assert idp.ledger.is_live(other_client) and idp.ledger.is_live(other_user)

        successor = rt(await refresh(client, idp, unpunished))
        clock.advance(5)
        assert (await refresh(client, idp, unpunished)).status_code == 400
        assert idp.ledger.is_live(successor)
        assert idp.ledger.reuses_outside_grace == 2 and idp.ledger.reuse_revoked_families == 2


# ------------------------------------------------------------------ re-use tokens


@pytest.mark.anyio
async def test_reuse_tokens_come_back_or_are_omitted() -> None:
    async with serving(usage="reuse") as (idp, client):
        token = str(idp.issue()["refresh_token"])
        for _ in range(2):
            response = await refresh(client, idp, token)
            assert response.status_code == 200
            assert rt(response) == token
        assert idp.ledger.is_live(token)
        assert idp.ledger.reuses_in_grace == idp.ledger.reuses_outside_grace == 0

    async with serving(usage="reuse", reuse_returns_refresh_token=False) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        response = await refresh(client, idp, token)
        assert response.status_code == 200
        assert "refresh_token" not in response.json()
        assert (await refresh(client, idp, token)).status_code == 200


# ------------------------------------------------------------------ client authentication


@pytest.mark.anyio
async def test_basic_and_post_client_authentication() -> None:
    clients = {"my app": "s3cr:t+&=é"}  # characters that RFC 6749 2.3.1 encoding must carry
    async with serving(clients=clients) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        form = {"grant_type": "refresh_token", "refresh_token": token}
        headers = {"Authorization": basic("my app", "s3cr:t+&=é")}
        response = await client.post(idp.token_url, data=form, headers=headers)
        assert response.status_code == 200
        token = rt(response)

        post = await refresh(client, idp, token, client_id="my app", client_secret="s3cr:t+&=é")
        assert post.status_code == 200
        token = rt(post)

        both = {**form, "refresh_token": token, "client_secret": "s3cr:t+&=é"}
        response = await client.post(idp.token_url, data=both, headers=headers)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"

        wrong = {"Authorization": basic("my app", "nope")}
        response = await client.post(
            idp.token_url, data={**form, "refresh_token": token}, headers=wrong
        )
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert response.headers["www-authenticate"].startswith("Basic")

        response = await refresh(client, idp, token, client_id="my app", client_secret="nope")
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert idp.ledger.invalid_clients == 2
        assert idp.ledger.is_live(token)  # a client failure never consumes the token


@pytest.mark.anyio
async def test_rotated_client_secret_gives_invalid_client() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.set_client_secret(CLIENT_ID, "new-secret")
        response = await refresh(client, idp, token)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert idp.ledger.invalid_clients == 1
        assert idp.ledger.is_live(token)
        ok = await refresh(client, idp, token, client_secret="new-secret")
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_request_validation_and_routes() -> None:
    clients = {CLIENT_ID: CLIENT_SECRET, "other": "other-secret"}
    async with serving(clients=clients) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        as_json = {
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        response = await client.post(idp.token_url, json=as_json)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request")

        response = await refresh(client, idp, token, grant_type="password")
        assert (response.status_code, response.json()["error"]) == (400, "unsupported_grant_type")

        response = await refresh(client, idp, "")
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request")

        # A refresh token belongs to the client it was issued to.
        response = await refresh(
            client, idp, token, client_id="other", client_secret="other-secret"
        )
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")

        response = await refresh(client, idp, "rt_made_up")
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")

        assert (await client.get(idp.url + "/nope")).status_code == 404
        big = await client.post(idp.token_url, data={"x": "y" * (65 * 1024)})
        assert big.status_code == 413

        discovery = (await client.get(idp.url + "/.well-known/openid-configuration")).json()
        assert discovery["issuer"] == idp.url
        assert discovery["token_endpoint"] == idp.token_url
        assert discovery["revocation_endpoint"] == idp.revocation_url
        assert idp.ledger.is_live(token)


# ------------------------------------------------------------------ revocation


@pytest.mark.anyio
async def test_revocation_endpoint_and_api() -> None:
    async with serving() as (idp, client):
        creds = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        token = str(idp.issue("alice")["refresh_token"])
        response = await client.post(idp.revocation_url, data={"token": token, **creds})
        assert response.status_code == 200
        assert not idp.ledger.is_live(token)
        gone = await refresh(client, idp, token)
        assert (gone.status_code, gone.json()["error"]) == (400, "invalid_grant")

        unknown = await client.post(idp.revocation_url, data={"token": "rt_unknown", **creds})
        assert unknown.status_code == 200
        bad_client = await client.post(
            idp.revocation_url, data={"token": token, "client_id": CLIENT_ID}
        )
        assert bad_client.status_code == 401

        other = str(idp.issue("alice")["refresh_token"])
        idp.revoke(other)
        assert not idp.ledger.is_live(other)

        tokens = [str(idp.issue(user)["refresh_token"]) for user in ("bob", "bob", "carol")]
        idp.revoke_user("bob")
        assert [idp.ledger.is_live(t) for t in tokens] == [False, False, True]
        assert idp.ledger.live_refresh_tokens("bob") == set()
        assert idp.ledger.revocations == 4


# ------------------------------------------------------------------ lifetimes and cap


@pytest.mark.anyio
async def test_absolute_lifetime_is_not_extended_by_rotation() -> None:
    clock = FakeClock()
    async with serving(clock=clock, refresh_token_lifetime=100) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        for _ in range(2):
            clock.advance(45)
            token = rt(await refresh(client, idp, token))
        family = idp.ledger.family_of(token)
        clock.advance(10)  # 100 s after the authorization; the token itself is 10 s old
        assert not idp.ledger.is_live(token)
        assert not idp.ledger.family_has_live_token(family)
        response = await refresh(client, idp, token)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


@pytest.mark.anyio
async def test_sliding_lifetime_one_time_and_reuse() -> None:
    clock = FakeClock()
    async with serving(clock=clock, refresh_token_idle_lifetime=30) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        clock.advance(29)
        token = rt(await refresh(client, idp, token))
        clock.advance(29)  # a fresh token gets a fresh idle window
        token = rt(await refresh(client, idp, token))
        clock.advance(30)
        response = await refresh(client, idp, token)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")

    clock = FakeClock()
    async with serving(clock=clock, usage="reuse", refresh_token_idle_lifetime=30) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        for _ in range(3):
            clock.advance(25)  # each use resets the idle timer
            assert (await refresh(client, idp, token)).status_code == 200
        clock.advance(31)
        assert not idp.ledger.is_live(token)
        assert (await refresh(client, idp, token)).status_code == 400


@pytest.mark.anyio
async def test_per_user_cap_revokes_the_oldest_and_grace_reuse_counts() -> None:
    clock = FakeClock()
    async with serving(clock=clock, max_refresh_tokens_per_user=3) as (idp, client):
        tokens = []
        for _ in range(3):
            clock.advance(1)
            tokens.append(str(idp.issue("alice")["refresh_token"]))
        other_user = str(idp.issue("bob")["refresh_token"])
        assert idp.ledger.live_refresh_tokens("alice") == set(tokens)

        tokens.append(str(idp.issue("alice")["refresh_token"]))
        assert not idp.ledger.is_live(tokens[0])
        assert idp.ledger.cap_revocations == 1

        # Rotation keeps the count; a reuse inside grace mints one more and pays for it.
        rotated = rt(await refresh(client, idp, tokens[3]))
        assert idp.ledger.cap_revocations == 1
        extra = rt(await refresh(client, idp, tokens[3]))
        assert idp.ledger.cap_revocations == 2
        assert not idp.ledger.is_live(tokens[1])
        assert {tokens[2], rotated, extra} <= idp.ledger.live_refresh_tokens("alice")
        assert idp.ledger.is_live(other_user)


# ------------------------------------------------------------------ faults


@pytest.mark.anyio
async def test_drop_after_rotate_rotates_then_closes_without_answer() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        family = idp.ledger.family_of(token)
        idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        with pytest.raises(httpx.RemoteProtocolError):
            await refresh(client, idp, token)
        assert idp.ledger.refreshes == 1
        assert len(idp.ledger.live_refresh_tokens()) == 2  # the old (in grace) and the lost new
        # Recovery inside the grace window works and is visible in the ledger.
        response = await refresh(client, idp, token)
        assert response.status_code == 200
        assert idp.ledger.reuses_in_grace == 1
        assert idp.ledger.family_has_live_token(family)
        assert idp.ledger.faults_injected == {"drop_after_rotate": 1}


@pytest.mark.anyio
async def test_error_and_garbage_after_rotate_still_rotate() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.ERROR_AFTER_ROTATE)
        idp.faults.add(FaultKind.GARBAGE_AFTER_ROTATE)
        error = await refresh(client, idp, token)
        assert error.status_code == 500
        garbage = await refresh(client, idp, token)
        assert garbage.status_code == 200
        assert garbage.headers["content-type"].startswith("text/html")
        with pytest.raises(json.JSONDecodeError):
            garbage.json()
        assert idp.ledger.refreshes == 2
        assert idp.ledger.reuses_in_grace == 1
        assert idp.ledger.faults_injected == {"error_after_rotate": 1, "garbage_after_rotate": 1}


@pytest.mark.anyio
async def test_faults_that_do_not_process() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.RESET)
        idp.faults.add(FaultKind.RETRY_AFTER, status=429, retry_after=7)
        idp.faults.add(FaultKind.RETRY_AFTER, times=1)
        idp.faults.add(FaultKind.INVALID_CLIENT)
        idp.faults.add(FaultKind.SERVER_ERROR)

        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await refresh(client, idp, token)
        limited = await refresh(client, idp, token)
        assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
        unavailable = await refresh(client, idp, token)
        assert (unavailable.status_code, unavailable.headers["retry-after"]) == (503, "1")
        invalid = await refresh(client, idp, token)
        assert (invalid.status_code, invalid.json()["error"]) == (401, "invalid_client")
        assert (await refresh(client, idp, token)).status_code == 500

        assert idp.ledger.refreshes == 0
        assert idp.ledger.invalid_clients == 0  # injected, not genuine
        assert idp.ledger.requests == 5
        assert idp.faults.pending == 0
        assert (await refresh(client, idp, token)).status_code == 200
        assert idp.ledger.faults_injected == {
            "reset": 1,
            "retry_after": 2,
            "invalid_client": 1,
            "server_error": 1,
        }


@pytest.mark.anyio
@pytest.mark.parametrize("process_first", [True, False])
async def test_slow_times_out_the_client_but_the_work_happens(process_first: bool) -> None:
    async with serving(timeout=0.2) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.SLOW, delay=0.5, process_first=process_first)
        with pytest.raises(httpx.ReadTimeout):
            await refresh(client, idp, token)
        with anyio.fail_after(3):
            while idp.ledger.refreshes == 0:
                await anyio.sleep(0.05)
        assert len(idp.ledger.live_refresh_tokens()) == 2


@pytest.mark.anyio
async def test_latency_holds_every_token_request_before_it_is_handled() -> None:
    # A distant IdP for benchmarks: nothing is counted or rotated while the request waits.
    async with serving(timeout=0.2, latency=1.5) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        with pytest.raises(httpx.ReadTimeout):
            await refresh(client, idp, token)
        assert idp.ledger.requests == 0
        with anyio.fail_after(3):
            while idp.ledger.refreshes == 0:
                await anyio.sleep(0.05)
    with pytest.raises(ValueError, match="latency"):
        FakeIdP(latency=-1.0)


@pytest.mark.anyio
async def test_overlapping_requests_with_one_token_count_as_concurrent_uses() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.SLOW, delay=0.5)
        results: list[httpx.Response] = []

        async def one(after: float) -> None:
            await anyio.sleep(after)
            results.append(await refresh(client, idp, token))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            tg.start_soon(one, 0.15)
        assert [r.status_code for r in results] == [200, 200]
        assert idp.ledger.concurrent_uses == 2
        assert idp.ledger.reuses_in_grace == 1  # the second won only thanks to the grace period
        # Sequential use afterwards is not concurrent.
        await refresh(client, idp, rt(results[0]))
        assert idp.ledger.concurrent_uses == 2


@pytest.mark.anyio
async def test_random_faults_and_clear() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.random(1.0, kinds=[FaultKind.SERVER_ERROR], seed=1)
        assert [(await refresh(client, idp, token)).status_code for _ in range(3)] == [500] * 3
        idp.faults.clear()
        assert (await refresh(client, idp, token)).status_code == 200
        with pytest.raises(TypeError):
            idp.faults.add(FaultKind.RESET, delay=1)


@pytest.mark.anyio
async def test_random_faults_once_per_token_answer_the_retry() -> None:
    async with serving() as (idp, client):
        first, second = (str(idp.issue()["refresh_token"]) for _ in range(2))
        idp.faults.random(1.0, kinds=[FaultKind.ERROR_AFTER_ROTATE], seed=1, once_per_token=True)
        # Each token's first request is faulted (500 after rotating), its retry is answered.
        assert (await refresh(client, idp, first)).status_code == 500
        assert (await refresh(client, idp, first)).status_code == 200
        assert (await refresh(client, idp, second)).status_code == 500
        assert idp.ledger.faults_injected == {"error_after_rotate": 2}
        assert idp.ledger.reuses_in_grace == 1


@pytest.mark.anyio
async def test_stall_rotates_and_holds_the_answer_unavailable_does_nothing() -> None:
    async with serving(timeout=0.3) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.STALL, stall=30)
        with pytest.raises(httpx.ReadTimeout):
            await refresh(client, idp, token)
        assert idp.ledger.refreshes == 1  # rotated before the stall began
        assert len(idp.ledger.live_refresh_tokens()) == 2

        other = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.UNAVAILABLE)
        unavailable = await refresh(client, idp, other)
        assert unavailable.status_code == 503 and "retry-after" not in unavailable.headers
        assert idp.ledger.refreshes == 1 and idp.ledger.is_live(other)
        assert idp.ledger.faults_injected == {"stall": 1, "unavailable": 1}
        with pytest.raises(TypeError):
            idp.faults.add(FaultKind.UNAVAILABLE, stall=1)
        with pytest.raises(ValueError, match="stall"):
            idp.faults.add(FaultKind.STALL, stall=-1)


# Kinds that answer at once (SLOW, STALL and HUGE are left out: they take time or memory).
_QUICK_KINDS = [
    k for k in FaultKind if k not in (FaultKind.SLOW, FaultKind.STALL, FaultKind.HUGE_AFTER_ROTATE)
]


@pytest.mark.anyio
@pytest.mark.parametrize("grace_answer", ["sibling", "same_pair"])
async def test_independent_random_faults_hit_retries_and_grace_re_sends(grace_answer: str) -> None:
    async with serving(timeout=2.0, grace_answer=grace_answer) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        rt(await refresh(client, idp, token))  # consumed: every send below is a grace re-send
        idp.faults.random(1.0, kinds=_QUICK_KINDS, seed=7)  # once_per_token=False
        for _ in range(40):
            with suppress(httpx.TransportError):
                await refresh(client, idp, token)
        faults = idp.ledger.faults_injected
        assert sum(faults.values()) == 40 == idp.ledger.sends_per_window()[0] - 1
        assert set(faults) == {k.value for k in _QUICK_KINDS}  # every kind, on re-sends
        processed = idp.ledger.reuses_in_grace
        assert processed > 0
        siblings = processed if grace_answer == "sibling" else 0
        assert idp.ledger.siblings_per_rotation() == [siblings]


@pytest.mark.anyio
async def test_rotation_stats_over_every_consumed_token() -> None:
    clock = FakeClock()
    async with serving(clock=clock, grace_period=5) as (idp, client):
        assert idp.ledger.rotation_stats() == RotationStats(0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0)
        tokens = [str(idp.issue()["refresh_token"]) for _ in range(100)]
        for token in tokens:
            await refresh(client, idp, token)
        busy = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.RETRY_AFTER)  # presented, not processed: still a send
        await refresh(client, idp, busy)
        for _ in range(4):
            await refresh(client, idp, busy)  # the rotation and three grace siblings
        never_used = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.UNAVAILABLE)
        await refresh(client, idp, never_used)  # not consumed: no rotation to count
        clock.advance(6)
        await refresh(client, idp, busy)  # a reuse: the sixth send, the family revoked

        stats = idp.ledger.rotation_stats()
        assert stats.rotations == 101
        assert (stats.sends_median, stats.sends_p99, stats.sends_max) == (1, 1, 6)
        assert (stats.siblings, stats.siblings_max, stats.rotations_with_siblings) == (3, 3, 1)
        assert stats.reuses_outside_grace == 1 and stats.reuse_revoked_families == 1
        assert stats.cap_revocations == 0
        assert sorted(idp.ledger.sends_per_window())[-2:] == [1, 6]


@pytest.mark.anyio
async def test_loss_causes_say_why_the_idp_refuses_a_stored_token() -> None:
    clock = FakeClock()
    async with serving(clock=clock, max_refresh_tokens_per_user=1) as (idp, client):
        capped = str(idp.issue("alice")["refresh_token"])
        kept = str(idp.issue("alice")["refresh_token"])  # over the cap: the first is revoked
        revoked = str(idp.issue("bob")["refresh_token"])
        idp.revoke(revoked)
        spent = str(idp.issue("carol")["refresh_token"])
        rt(await refresh(client, idp, spent))
        idp.refresh_token_idle_lifetime = 10
        idle = str(idp.issue("dave")["refresh_token"])
        clock.advance(10)
        stored = [capped, kept, revoked, spent, idle, "rt_never_minted"]
        assert idp.ledger.loss_causes(stored) == {
            "revoked_cap": 1,
            "revoked": 1,
            "missed_window": 1,
            "expired": 1,
            "unknown": 1,
        }
        assert idp.ledger.loss_cause(kept) is None
        assert idp.ledger.missed_windows(stored) == 1


@pytest.mark.anyio
async def test_refuse_connections_refuses_new_and_resets_open_ones() -> None:
    async with serving(timeout=2.0) as (idp, client):
        token = str(idp.issue()["refresh_token"])
        url = idp.token_url
        assert (await refresh(client, idp, "rt_unknown")).status_code == 400  # a pooled conn
        idp.refuse_connections(0.5)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await refresh(client, idp, token)  # on the open keep-alive connection: reset
        async with httpx.AsyncClient() as fresh:
            with pytest.raises(httpx.ConnectError):  # refused: nothing was sent
                await fresh.post(url, data={"grant_type": "refresh_token"})
        await anyio.sleep(0.6)
        response = await refresh(client, idp, token)
        assert response.status_code == 200 and idp.token_url == url
        assert idp.ledger.refreshes == 1 and idp.ledger.outages == 1
        assert idp.ledger.faults_injected == {"outage": 1}
        with pytest.raises(ValueError):
            idp.refuse_connections(0)
    with pytest.raises(RuntimeError, match="not serving"):
        FakeIdP().refuse_connections(1)


def test_refuse_connections_from_another_thread() -> None:
    with running_in_thread(FakeIdP()) as idp, httpx.Client() as client:
        idp.refuse_connections(0.3)
        with pytest.raises(httpx.ConnectError):
            client.post(idp.token_url, data={})
        for _ in range(50):
            try:
                client.post(idp.token_url, data={})
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        else:
            pytest.fail("the IdP did not listen again")


# ------------------------------------------------------------------ transport and threads


@pytest.mark.anyio
async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        for _ in range(3):
            token = rt(await refresh(client, idp, token))
        assert idp.ledger.connections == 1
        assert idp.ledger.requests == 3


def test_running_in_thread() -> None:
    with running_in_thread(FakeIdP()) as idp:
        assert idp.token_url.startswith("http://127.0.0.1:")
        token = str(idp.issue("alice")["refresh_token"])
        with httpx.Client() as client:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": token,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
            response = client.post(idp.token_url, data=form)
        assert response.status_code == 200
        assert idp.ledger.refreshes == 1
        url = idp.token_url
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, data=form)


def test_events_never_hold_token_values() -> None:
    with running_in_thread(FakeIdP()) as idp:
        token = str(idp.issue()["refresh_token"])
        idp.faults.add(FaultKind.ERROR_AFTER_ROTATE)
        with httpx.Client() as client:
            client.post(
                idp.token_url,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": token,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
            )
        dumped = json.dumps(idp.ledger.events)
        assert all(value not in dumped for value in idp.ledger.issued_tokens())
        assert idp.ledger.snapshot()["refreshes"] == 1


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("cli-secret\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refresherd.testing",
            "--client-id",
            "cli",
            "--client-secret-file",
            str(secret_file),
            "--issue",
            "alice",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["token_url"].endswith("/connect/token")
        assert line["revocation_url"].endswith("/connect/revocation")
        token = line["issued"]["alice"]["refresh_token"]
        response = httpx.post(
            line["token_url"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": token,
                "client_id": "cli",
                "client_secret": "cli-secret",
            },
        )
        assert response.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def exchange(
    client: httpx.AsyncClient, idp: FakeIdP, code: str, **form: str
) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        **form,
    }
    return await client.post(idp.token_url, data=data)


@pytest.mark.anyio
async def test_authorization_code_grant_is_one_time_and_bound_to_redirect_and_pkce() -> None:
    clients = {CLIENT_ID: CLIENT_SECRET, "other": "other-secret"}
    redirect = "https://app.example/callback"
    verifier = "v" * 50
    async with serving(clients=clients) as (idp, client):
        code = idp.authorize("alice", redirect_uri=redirect, code_challenge=_s256(verifier))
        response = await exchange(client, idp, code, redirect_uri=redirect, code_verifier=verifier)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_type"] == "Bearer" and body["access_token"] and body["refresh_token"]
        assert idp.ledger.is_live(body["refresh_token"])
        assert idp.ledger.live_refresh_tokens("alice") == {body["refresh_token"]}
        assert idp.ledger.code_exchanges == 1
        # The refresh token it minted refreshes like any other.
        refreshed = await refresh(client, idp, body["refresh_token"])
        assert refreshed.status_code == 200

        # One time only.
        again = await exchange(client, idp, code, redirect_uri=redirect, code_verifier=verifier)
        assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")

        # Bound to its redirect_uri, its PKCE challenge and its client; a failed try burns it.
        for form, client_id in (
            ({"redirect_uri": "https://evil.example/cb", "code_verifier": verifier}, CLIENT_ID),
            ({"redirect_uri": redirect, "code_verifier": "w" * 50}, CLIENT_ID),
            ({"redirect_uri": redirect}, CLIENT_ID),
            ({"redirect_uri": redirect, "code_verifier": verifier}, "other"),
        ):
            fresh = idp.authorize(redirect_uri=redirect, code_challenge=_s256(verifier))
            data = {"grant_type": "authorization_code", "code": fresh, **form}
            secret = clients[client_id]
            response = await client.post(
                idp.token_url, data={**data, "client_id": client_id, "client_secret": secret}
            )
            assert (response.status_code, response.json()["error"]) == (400, "invalid_grant"), form
        # Without PKCE, redirect_uri alone binds it; an unknown code is invalid_grant too.
        plain = idp.authorize(redirect_uri=redirect)
        assert (await exchange(client, idp, plain, redirect_uri=redirect)).status_code == 200
        response = await exchange(client, idp, "code_made_up", redirect_uri=redirect)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
        assert idp.ledger.code_exchanges == 2
        # Codes count as issued secrets (the suite's leak scan looks for them).
        assert code in idp.ledger.issued_tokens()


@pytest.mark.anyio
async def test_authorization_code_expires() -> None:
    clock = FakeClock()
    async with serving(clock=clock) as (idp, client):
        code = idp.authorize(redirect_uri="https://app.example/cb", code_lifetime=30)
        clock.advance(31)
        response = await exchange(client, idp, code, redirect_uri="https://app.example/cb")
        assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
        assert "expired" in response.json()["error_description"]


@pytest.mark.anyio
async def test_hold_requests_keeps_token_requests_waiting_until_released() -> None:
    async with serving() as (idp, client):
        token = str(idp.issue()["refresh_token"])
        idp.hold_requests()
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await refresh(client, idp, token))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            while idp.held_requests < 1:
                await anyio.sleep(0.01)
            assert idp.ledger.refreshes == 0 and not results
            idp.release_requests()
        assert [r.status_code for r in results] == [200]
        assert idp.held_requests == 0 and idp.ledger.refreshes == 1
