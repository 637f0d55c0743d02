"""The token API end to end: a real ``refresherd run`` process, a real FakeIdP on loopback,
real HTTP over TCP and over the unix socket."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from api_daemon import PROVIDER, REDIRECT, Client, api_config
from conftest import (
    LEAKS,
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
)
from test_storage_faults import HELD, PAUSED, HeldLock

from refresherd.testing import FaultKind
from refresherd.web.tokens import openapi_document


def start(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, usage: str = "one_time", **kw: Any
) -> tuple[IdPHandle, DaemonProcess, Client, Path]:
    # A held request of a one-time token would be given up inside its grace window and resent;
    # the tests that hold requests use re-use tokens, whose attempt gets request_timeout.
    handle = idp_factory(grace_period=5.0, usage=usage)
    config, bearer = api_config(tmp_path, handle, **kw)
    daemon = daemons(config)
    return handle, daemon, Client(daemon, bearer), config


def test_get_serves_a_fresh_token_without_asking_the_idp(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, _daemon, client, config = start(tmp_path, idp_factory, daemons)
    lines = handle.token_lines(PROVIDER, 1)
    import_tokens(config, lines)
    response = client.get("ts-0000")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["access_token"] == lines[0]["access_token"]
    assert body["token_type"] == "Bearer" and body["state"] == "active"
    assert 3500 < body["expires_in"] <= 3600 and body["expires_at_rfc3339"].endswith("Z")
    assert "refresh_token" not in body
    assert response.headers["cache-control"] == "no-store"
    assert handle.ledger.refreshes == 0


def test_errors_are_json_with_stable_codes_and_the_bearer_is_required(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, config = start(tmp_path, idp_factory, daemons)
    response = client.get("nope")
    assert (response.status_code, response.json()["error"]) == (404, "unknown_token_set")

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        response = httpx.get(daemon.url("/v1/tokens/nope"), headers=headers)
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    # Health, metrics and the OpenAPI document stay open.
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert httpx.get(daemon.url(path)).status_code == 200, path

    response = client.request("POST", "/v1/tokens", content=b"{not json")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    response = client.request(
        "POST", "/v1/tokens", json={"id": "a", "provider": "elsewhere", "refresh_token": "x"}
    )
    assert (response.status_code, response.json()["error"]) == (400, "unknown_provider")
    response = client.request("POST", "/v1/tokens", json={"id": "a", "provider": PROVIDER})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert "refresh_token" in response.json()["message"]

    # Invalidated: the IdP refuses the refresh token; the API says authorization is needed.
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    handle.idp.revoke(str(lines[0]["refresh_token"]))
    import_tokens(config, lines)
    wait_until(
        lambda: read_rows(tmp_path / "tokens.db")["ts-0000"]["state"] == "invalidated",
        what="the revoked set to be invalidated",
    )
    response = client.get("ts-0000")
    assert (response.status_code, response.json()["error"]) == (409, "invalidated")
    assert response.json()["reason"] == "invalid_grant"


def test_a_forced_refresh_rotates_only_the_token_refused_and_at_most_every_30_s(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """POST /v1/tokens/{id}/refresh: the application's upstream refused an access token."""
    handle, _daemon, client, config = start(tmp_path, idp_factory, daemons)
    lines = handle.token_lines(PROVIDER, 2)
    import_tokens(config, lines)
    old = str(lines[0]["access_token"])

    def force(token_set_id: str, **body: object) -> httpx.Response:
        return client.request("POST", f"/v1/tokens/{token_set_id}/refresh", json=body)

    # Refused: a token that is not the current one. Someone refreshed since: no IdP request.
    response = force("ts-0000", rejected="at_an_older_one")
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] == old and handle.ledger.refreshes == 0

    # The current one refused: refreshed now, the new one answered and stored.
    response = force("ts-0000", rejected=old)
    assert response.status_code == 200, response.text
    new = response.json()["access_token"]
    assert new != old and handle.ledger.refreshes == 1
    assert client.get("ts-0000").json()["access_token"] == new

    # The fresh one refused too, moments later: not rotated again, and said when it will be.
    response = force("ts-0000", rejected=new)
    assert (response.status_code, response.json()["error"]) == (429, "refreshed_recently")
    assert 1 <= int(response.headers["retry-after"]) <= 31
    assert handle.ledger.refreshes == 1 and new not in response.text

    # Without a body: a refresh now (this set was never refreshed here).
    response = client.request("POST", "/v1/tokens/ts-0001/refresh")
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] != lines[1]["access_token"]
    assert handle.ledger.refreshes == 2

    response = force("nope", rejected=old)
    assert (response.status_code, response.json()["error"]) == (404, "unknown_token_set")
    response = force("ts-0000", rejected=5)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    response = client.request("POST", "/v1/tokens/ts-0000/refresh", content=b"{not json")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert handle.ledger.refreshes == 2


def test_the_bearer_scheme_is_matched_whatever_its_case(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """The auth scheme is case-insensitive (RFC 9110 §11.1) and followed by one or more spaces
    (§11.4): ``bearer x`` and ``BEARER x`` are the same credentials as ``Bearer x``. The token
    itself is not: a token in the wrong case, or one glued to the scheme, is refused."""
    handle, daemon, client, config = start(tmp_path, idp_factory, daemons)
    import_tokens(config, handle.token_lines(PROVIDER, 1))
    bearer = client.headers["Authorization"].removeprefix("Bearer ")
    url = daemon.url("/v1/tokens/ts-0000")
    for scheme in ("bearer", "BEARER", "bEaReR", "Bearer "):
        response = httpx.get(url, headers={"Authorization": f"{scheme} {bearer}"})
        assert response.status_code == 200, (scheme, response.text)
        assert response.json()["id"] == "ts-0000"
    for value in (f"bearer {bearer.upper()}", f"Bearer{bearer}", f"Basic {bearer}", "bearer"):
        response = httpx.get(url, headers={"Authorization": value})
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized"), value


def test_register_refuses_a_misspelt_policy_field_and_stores_nothing(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, _daemon, client, _config = start(tmp_path, idp_factory, daemons)
    issued = handle.idp.issue(user="dora")
    body = {
        "id": "dora",
        "provider": PROVIDER,
        "refresh_token": issued["refresh_token"],
        "refersh_token_usage": "reuse",
    }
    response = client.request("POST", "/v1/tokens", json=body)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert response.json()["message"] == (
        'unknown field "refersh_token_usage"; did you mean "refresh_token_usage"?'
    )
    assert "dora" not in read_rows(tmp_path / "tokens.db")
    assert client.get("dora").status_code == 404


def test_register_then_get_refreshes_a_set_without_access_token(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, _daemon, client, config = start(tmp_path, idp_factory, daemons)
    issued = handle.idp.issue(user="alice")
    body = {"id": "alice", "provider": PROVIDER, "refresh_token": issued["refresh_token"]}
    response = client.request("POST", "/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "alice"
    again = client.request("POST", "/v1/tokens", json=body)
    assert (again.status_code, again.json()["error"]) == (409, "exists")
    # Due at once (no access token): the GET gets a refreshed token, by whichever of the
    # scheduler and the API started the refresh; either way, one refresh.
    response = client.get("alice")
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] in handle.ledger.issued_tokens()
    assert response.json()["access_token"] != issued["access_token"]
    assert handle.ledger.refreshes == 1
    # The CLI sees the same set (one store, one parser).
    shown = run_cli(config, "tokens", "show", "alice", "--json")
    assert json.loads(shown.stdout)["provider"] == PROVIDER


def test_burst_of_1000_gets_causes_exactly_one_refresh(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, config = start(
        tmp_path,
        idp_factory,
        daemons,
        usage="reuse",
        api={"wait_timeout": "2m"},
        request_timeout="2m",
    )
    # An access token inside the refresh margin is due for the API but must not be refreshed
    # by the scheduler first: the IdP holds every token request until the burst is in.
    handle.idp.hold_requests()
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    import_tokens(config, lines)
    wait_until(lambda: handle.idp.held_requests == 1, what="the scheduler's refresh to be held")
    results: list[httpx.Response] = []

    async def burst() -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with (
            httpx.AsyncClient(limits=limits, timeout=120, headers=client.headers) as http,
            httpx.AsyncClient(timeout=60) as scraper,
            anyio.create_task_group() as tg,
        ):

            async def one() -> None:
                results.append(await http.get(daemon.url("/v1/tokens/ts-0000")))

            for _ in range(1000):
                tg.start_soon(one)
            # Every request of the burst has joined the held refresh before the IdP answers.
            while True:
                coalesced = metric(
                    (await scraper.get(daemon.url("/metrics"))).text,
                    "refresherd_singleflight_coalesced_total",
                )
                if coalesced >= 1000:
                    break
                await anyio.sleep(0.1)
            handle.idp.release_requests()

    anyio.run(burst)
    assert len(results) == 1000
    assert {r.status_code for r in results} == {200}
    tokens = {r.json()["access_token"] for r in results}
    assert len(tokens) == 1
    # The grant of the scheduler's refresh (stored without reading the row back), which each
    # caller that joined it read from the database.
    assert tokens <= set(handle.ledger.issued_tokens())
    # One refresh at the IdP, for the scheduler's flight and 1000 API callers that joined it.
    assert handle.ledger.refreshes == 1
    assert handle.ledger.requests == 1
    assert metric(daemon.metrics(), "refresherd_singleflight_coalesced_total") == 1000


def test_a_client_that_gives_up_does_not_cancel_the_refresh(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, config = start(
        tmp_path,
        idp_factory,
        daemons,
        usage="reuse",
        api={"wait_timeout": "1s"},
        request_timeout="2m",
    )
    handle.idp.hold_requests()
    import_tokens(config, handle.token_lines(PROVIDER, 1, with_access_token=False))
    wait_until(lambda: handle.idp.held_requests == 1, what="a refresh to be held")
    # The API's wait is bounded: timeout, and the refresh goes on.
    response = client.get("ts-0000")
    assert (response.status_code, response.json()["error"]) == (504, "timeout")
    # A client that disconnects mid-wait does not cancel the refresh either.
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(daemon.url("/v1/tokens/ts-0000"), headers=client.headers, timeout=0.3)
    handle.idp.release_requests()
    wait_until(
        lambda: read_rows(tmp_path / "tokens.db")["ts-0000"]["access_token"] is not None,
        what="the held refresh to be persisted",
    )
    response = client.get("ts-0000")
    assert response.status_code == 200
    assert handle.ledger.refreshes == 1
    assert daemon.events("refresh", outcome="refreshed")


def _s256(verifier: str) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


def test_exchange_stores_the_token_set_and_delete_revokes_it(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0)
    config, bearer = api_config(tmp_path, handle, revocation_url=handle.idp.revocation_url)
    daemon = daemons(config)
    client = Client(daemon, bearer)
    verifier = "verifier-" + "x" * 40
    code = handle.idp.authorize("bob", redirect_uri=REDIRECT, code_challenge=_s256(verifier))
    exchange = {
        "provider": PROVIDER,
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    response = client.request("POST", "/v1/tokens/bob/exchange", json=exchange)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "bob" and body["access_token"] and "refresh_token" not in body
    assert handle.ledger.code_exchanges == 1
    refresh_token = read_rows(tmp_path / "tokens.db")["bob"]["refresh_token"]
    assert handle.ledger.live_refresh_tokens("bob") == {refresh_token}
    assert client.get("bob").json()["access_token"] == body["access_token"]

    # The code is spent: a second exchange under another id is refused by the IdP.
    response = client.request("POST", "/v1/tokens/bob2/exchange", json=exchange)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    # An id in use is refused before the code is spent.
    fresh = handle.idp.authorize("bob", redirect_uri=REDIRECT)
    response = client.request(
        "POST", "/v1/tokens/bob/exchange", json={**exchange, "code": fresh, "code_verifier": None}
    )
    assert (response.status_code, response.json()["error"]) == (409, "exists")

    # DELETE with revoke: revoked at the IdP (RFC 7009), then removed.
    response = client.request("DELETE", "/v1/tokens/bob", params={"revoke": "true"})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "bob", "removed": True, "revoked": True}
    assert not handle.ledger.is_live(refresh_token)
    assert "bob" not in read_rows(tmp_path / "tokens.db")
    response = client.request("DELETE", "/v1/tokens/bob")
    assert (response.status_code, response.json()["error"]) == (404, "unknown_token_set")


def test_delete_keeps_the_set_when_revocation_is_not_possible(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, _daemon, client, config = start(tmp_path, idp_factory, daemons)
    import_tokens(config, handle.token_lines(PROVIDER, 1))
    response = client.request("DELETE", "/v1/tokens/ts-0000", params={"revoke": "true"})
    assert (response.status_code, response.json()["error"]) == (400, "revocation_unsupported")
    assert "ts-0000" in read_rows(tmp_path / "tokens.db")
    response = client.request("DELETE", "/v1/tokens/ts-0000")
    assert response.json() == {"id": "ts-0000", "removed": True, "revoked": False}


def test_unix_socket_only_api(tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons) -> None:
    sock = tmp_path / "api.sock"
    handle, daemon, client, config = start(
        tmp_path,
        idp_factory,
        daemons,
        api={"unix_socket": str(sock), "unix_socket_mode": "0660", "tcp": False},
    )
    daemon.wait_for_event("listening", socket=str(sock))
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and stat.S_ISSOCK(sock.stat().st_mode)
    import_tokens(config, handle.token_lines(PROVIDER, 1))
    over_unix = Client(daemon, client.headers["Authorization"].removeprefix("Bearer "), uds=sock)
    response = over_unix.get("ts-0000")
    assert response.status_code == 200, response.text
    # The same one server answers health and metrics on the socket, and no /v1 over TCP.
    assert over_unix.http.get("http://refresherd/healthz").status_code == 200
    assert (client.get("ts-0000").status_code, client.get("x").json()["error"]) == (
        404,
        "not_found",
    )
    assert httpx.get(daemon.url("/metrics")).status_code == 200
    assert daemon.stop() == 0
    assert not sock.exists()


def test_served_openapi_document_is_the_one_in_the_repo(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    _handle, daemon, _client, _config = start(tmp_path, idp_factory, daemons)
    served = httpx.get(daemon.url("/openapi.json"))
    assert served.status_code == 200
    in_repo = (Path(__file__).parent.parent / "refresherd" / "openapi.json").read_bytes()
    assert served.content == in_repo == openapi_document()
    paths = json.loads(in_repo)["paths"]
    assert {"/v1/tokens", "/v1/tokens/{id}", "/v1/tokens/{id}/exchange"} <= set(paths)


def test_no_bearer_or_token_value_in_the_daemon_output(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, _config = start(tmp_path, idp_factory, daemons)
    issued = handle.idp.issue(user="carol")
    client.request("POST", "/v1/tokens", json={"id": "carol", "provider": PROVIDER, **issued})
    assert client.get("carol").status_code == 200
    client.request("DELETE", "/v1/tokens/carol")
    httpx.get(daemon.url("/v1/tokens/carol"), headers={"Authorization": "Bearer guess"})
    assert daemon.stop() == 0
    text = daemon.log_text()
    assert daemon.events("token set registered", token_set="carol", via="api")
    bearer = client.headers["Authorization"].removeprefix("Bearer ")
    for value in (bearer, "guess", str(issued["access_token"]), str(issued["refresh_token"])):
        assert value not in text


def test_provider_unavailable_while_backing_off_and_a_valid_token_still_served(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0, usage="reuse")
    config, bearer = api_config(tmp_path, handle)
    with config.open("a") as fh:
        # A long backoff: after one failure the sets wait, and the API must not hammer the IdP.
        fh.write('\n[schedule]\nbackoff_initial = "1h"\nbackoff_max = "2h"\n')
    handle.faults.add(FaultKind.SERVER_ERROR, times=2)
    daemon = daemons(config)
    client = Client(daemon, bearer)
    expired, fresh = handle.token_lines(PROVIDER, 2)
    expired["expires_in"] = 0  # expired now: due at once
    fresh["expires_in"] = 30  # inside the 60 s margin: due at once, but still valid
    import_tokens(config, [expired, fresh])
    wait_until(
        lambda: {r["state"] for r in read_rows(tmp_path / "tokens.db").values()} == {"failing"},
        what="both sets to fail once and back off",
    )
    requests = handle.ledger.requests
    response = client.get("ts-0000")
    assert (response.status_code, response.json()["error"]) == (503, "provider_unavailable")
    # Backoff has "equal jitter": between half and all of backoff_initial (1 h).
    assert 1800 - 60 < int(response.headers["retry-after"]) <= 3600
    response = client.get("ts-0001")
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] == fresh["access_token"]
    assert response.json()["state"] == "failing"
    assert handle.ledger.requests == requests  # backing off: nothing sent for the API


def test_a_unix_socket_path_that_is_not_a_stale_socket_is_refused(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0)
    path = tmp_path / "api.sock"
    path.write_text("not a socket: must not be deleted\n")
    config, _ = api_config(tmp_path, handle, api={"unix_socket": str(path)})
    daemon = daemons(config, start=False).start(wait_listening=False)
    assert daemon.wait_exit() == 1
    [line] = daemon.events("cannot listen")
    assert line["socket"] == str(path) and "not a socket" in line["error"]
    assert path.read_text() == "not a socket: must not be deleted\n"
    # A stale socket (its daemon killed) is replaced, and removed again at exit.
    path.unlink()
    first = daemons(config, "first")
    first.wait_for_event("listening", socket=str(path))
    first.kill()
    assert stat.S_ISSOCK(path.stat().st_mode)
    second = daemons(config, "second")
    second.wait_for_event("listening", socket=str(path))
    assert second.stop() == 0
    assert not path.exists()


def test_delete_with_revoke_waits_for_a_refresh_in_flight_and_revokes_its_result(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    # Rotating tokens without a grace window: the old token dies at the rotation, so a
    # revocation of the token read before the rotation would leave the new one alive.
    handle = idp_factory(grace_period=0.0, usage="one_time")
    config, bearer = api_config(tmp_path, handle, revocation_url=handle.idp.revocation_url)
    daemon = daemons(config)
    client = Client(daemon, bearer)
    handle.idp.hold_requests()
    import_tokens(config, handle.token_lines(PROVIDER, 1, with_access_token=False))
    wait_until(lambda: handle.idp.held_requests == 1, what="the scheduler's refresh at the IdP")

    answers: list[httpx.Response] = []

    def delete() -> None:
        answers.append(client.request("DELETE", "/v1/tokens/ts-0000", params={"revoke": "true"}))

    worker = threading.Thread(target=delete)
    worker.start()
    worker.join(timeout=1.0)
    assert worker.is_alive() and not answers  # waiting for the refresh to land
    handle.idp.release_requests()
    worker.join(timeout=30)
    [response] = answers
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "ts-0000", "removed": True, "revoked": True}
    assert handle.ledger.refreshes == 1 and handle.ledger.revocations == 1
    # The refresh token the rotation minted was the one revoked: nothing is left alive.
    assert handle.ledger.live_refresh_tokens("ts-0000") == set()
    assert "ts-0000" not in read_rows(tmp_path / "tokens.db")


# --------------------------------------------------------------------------- code exchange faults


def exchange_body(code: str) -> dict[str, object]:
    return {"provider": PROVIDER, "code": code, "redirect_uri": REDIRECT}


def exchange_in_thread(
    client: Client, token_set_id: str, code: str, *, timeout: float = 60
) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    """POST the exchange from a thread; its answer (or httpx's error) lands in the list."""
    answers: list[httpx.Response | Exception] = []

    def post() -> None:
        try:
            answers.append(
                client.http.post(
                    client.base + f"/v1/tokens/{token_set_id}/exchange",
                    headers=client.headers,
                    json=exchange_body(code),
                    timeout=timeout,
                )
            )
        except httpx.HTTPError as exc:
            answers.append(exc)

    worker = threading.Thread(target=post)
    worker.start()
    return worker, answers


def test_an_exchanged_grant_the_database_refuses_is_held_and_stored_though_the_client_left(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """The IdP issues two grants, and the database refuses both (another process holds the
    write lock). One client has disconnected, the other waits out wait_timeout: neither grant
    is dropped. Both are held and counted; meanwhile nothing else spends a code (the same id
    is busy, the storage pause refuses others); SIGTERM waits for them and stores them."""
    handle = idp_factory(grace_period=5.0)
    config, bearer = api_config(tmp_path, handle, api={"wait_timeout": "1s"})
    daemon = daemons(config)
    client = Client(daemon, bearer)
    db = tmp_path / "tokens.db"
    lock = HeldLock(db)
    # Each grant is issued at once and answered 3 s later: the lock is taken in between.
    handle.faults.add(FaultKind.SLOW, times=2, delay=3.0, process_first=True)
    left, left_answers = exchange_in_thread(
        client, "bob", handle.idp.authorize("bob", redirect_uri=REDIRECT), timeout=0.5
    )
    waited, waited_answers = exchange_in_thread(
        client, "dave", handle.idp.authorize("dave", redirect_uri=REDIRECT)
    )
    try:
        wait_until(lambda: handle.ledger.code_exchanges == 2, what="both codes to be spent")
        lock.break_()
        left.join(timeout=30)
        [gone] = left_answers
        assert isinstance(gone, httpx.ReadTimeout), gone  # the client left before the answer
        daemon.wait_for_event(HELD, token_set="bob")
        daemon.wait_for_event(HELD, token_set="dave")
        waited.join(timeout=30)
        [response] = waited_answers
        assert isinstance(response, httpx.Response)
        assert response.status_code == 202, response.text
        assert response.json()["held"] is True and response.json()["id"] == "dave"
        assert metric(daemon.metrics(), "refresherd_unpersisted_grants") == 2
        # Refused before a code is spent: the same id (its grant held), and, while storage
        # is paused, any other.
        daemon.wait_for_event(PAUSED)
        spare = handle.idp.authorize("bob", redirect_uri=REDIRECT)
        response = client.request("POST", "/v1/tokens/bob/exchange", json=exchange_body(spare))
        assert (response.status_code, response.json()["error"]) == (409, "busy")
        response = client.request("POST", "/v1/tokens/erin/exchange", json=exchange_body(spare))
        assert (response.status_code, response.json()["error"]) == (503, "storage_unavailable")
        assert handle.ledger.code_exchanges == 2
        daemon.send_signal(signal.SIGTERM)
        daemon.wait_for_event("shutting down")
        assert daemon.running()  # the held grants keep the process up
    finally:
        lock.repair()
    assert daemon.wait_exit() == 0
    assert not [e for e in daemon.lines() if "not persisted" in str(e.get("event"))]
    rows = read_rows(db)
    assert set(rows) == {"bob", "dave"}
    for user in ("bob", "dave"):
        assert handle.ledger.live_refresh_tokens(user) == {rows[user]["refresh_token"]}


def test_an_exchange_whose_id_is_taken_meanwhile_keeps_that_set_and_says_so(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """Another process adds the id while the IdP's answer to our exchange is on its way: the
    other set is kept, and the new grant is not dropped silently: 409 says it was discarded,
    and so does a log line. It is not revoked (that could revoke the kept set's grant too)."""
    handle = idp_factory(grace_period=5.0)
    config, bearer = api_config(tmp_path, handle, revocation_url=handle.idp.revocation_url)
    daemon = daemons(config)
    client = Client(daemon, bearer)
    handle.faults.add(FaultKind.SLOW, delay=3.0, process_first=True)
    worker, answers = exchange_in_thread(
        client, "bob", handle.idp.authorize("bob", redirect_uri=REDIRECT)
    )
    wait_until(lambda: handle.ledger.code_exchanges == 1, what="the code to be spent")
    added = {"id": "bob", "provider": PROVIDER, **handle.idp.issue(user="bob")}
    import_tokens(config, [added])
    worker.join(timeout=30)
    [response] = answers
    assert isinstance(response, httpx.Response)
    assert (response.status_code, response.json()["error"]) == (409, "exists"), response.text
    assert response.json()["grant_discarded"] is True
    [line] = daemon.events(
        "exchanged grant discarded: a token set with this id was added meanwhile; its refresh "
        "token stays live at the provider, unused, until it expires",
        token_set="bob",
    )
    assert line["level"] == "warning"
    assert read_rows(tmp_path / "tokens.db")["bob"]["refresh_token"] == added["refresh_token"]
    assert handle.ledger.revocations == 0
    assert len(handle.ledger.live_refresh_tokens("bob")) == 2


def test_a_second_exchange_of_an_id_in_progress_is_refused_before_its_code_is_spent(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """A double submit: the second exchange of an id whose first is still at the IdP would
    spend its code for a grant that cannot be stored. It is refused (409 busy) with its code
    unspent, usable elsewhere."""
    handle, _daemon, client, _config = start(tmp_path, idp_factory, daemons)
    first, second = (handle.idp.authorize("bob", redirect_uri=REDIRECT) for _ in range(2))
    handle.faults.add(FaultKind.SLOW, delay=2.0, process_first=True)
    worker, answers = exchange_in_thread(client, "bob", first)
    wait_until(lambda: handle.ledger.code_exchanges == 1, what="the first code to be spent")
    response = client.request("POST", "/v1/tokens/bob/exchange", json=exchange_body(second))
    assert (response.status_code, response.json()["error"]) == (409, "busy"), response.text
    worker.join(timeout=30)
    [stored] = answers
    assert isinstance(stored, httpx.Response) and stored.status_code == 201, stored
    assert handle.ledger.code_exchanges == 1
    response = client.request("POST", "/v1/tokens/bob-2/exchange", json=exchange_body(second))
    assert response.status_code == 201, response.text


def test_a_handler_that_fails_unexpectedly_answers_json_500_and_logs_one_scrubbed_line(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """A real bug path: a lone surrogate in the code passes the API's checks and the JSON
    parser, then cannot be form-encoded for the IdP (UnicodeEncodeError). It used to be a bare
    text 500 and nothing in the log (the server's error log was off). Now: the API's JSON error
    shape, one line naming the route and the exception with its traceback, a count, and no
    bearer, code or verifier in the line. The code is not spent and the id is free again."""
    handle, daemon, client, _config = start(tmp_path, idp_factory, daemons)
    verifier = "verifier-" + os.urandom(16).hex()
    LEAKS.add_secret(verifier)
    code = handle.idp.authorize("bob", redirect_uri=REDIRECT, code_challenge=_s256(verifier))
    body = json.dumps({**exchange_body(code + "\ud800"), "code_verifier": verifier})
    response = client.request("POST", "/v1/tokens/bob/exchange", content=body.encode())
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "internal_error"
    [line] = daemon.wait_for_event("api handler failed")
    assert line["level"] == "error"
    assert (line["method"], line["route"], line["token_set"]) == (
        "POST",
        "/v1/tokens/{id}/exchange",
        "bob",
    )
    assert line["error"].startswith("UnicodeEncodeError:"), line["error"]
    assert "Traceback" in line["exception"] and "exchange_code" in line["exception"]
    bearer = client.headers["Authorization"].removeprefix("Bearer ")
    for secret in (bearer, code, verifier):
        assert secret not in json.dumps(line)
    assert (
        metric(
            daemon.metrics(),
            "refresherd_http_internal_errors_total",
            route="/v1/tokens/{id}/exchange",
        )
        == 1
    )
    assert handle.ledger.code_exchanges == 0
    response = client.request(
        "POST",
        "/v1/tokens/bob/exchange",
        json={**exchange_body(code), "code_verifier": verifier},
    )
    assert response.status_code == 201, response.text
    assert len(daemon.events("api handler failed")) == 1
