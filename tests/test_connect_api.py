"""Connecting a customer through a real daemon, without a browser: the link from the token API,
the callback as the IdP's redirect (GET) or form_post (POST) would make it, against the
project's FakeIdP on loopback, whose authorization endpoint the test plays (``idp.authorize``:
what the IdP does once the customer has consented). Every refusal is tried: no state, a forged,
replayed, expired or foreign state, a return address outside the allow list, no code, an IdP
error, a code replayed after success, storage refusing the grant (held and retried, never
dropped); and two daemons on one database (a state made by one is taken by the other).

tests/test_connect_browser.py goes through the same flow in a real browser against
django-oauth-toolkit's own login and consent pages.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from api_daemon import PROVIDER, REDIRECT, Client, api_table
from conftest import (
    LEAKS,
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    free_port,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
    write_config,
)
from databases import Database
from test_storage_faults import HELD, HeldLock

from refresherd.connect import EXPIRED_STATE_KEPT, PendingConnection, code_challenge, state_digest
from refresherd.model import Secret
from refresherd.store import open_store
from refresherd.testing import FaultKind

RETURN = "https://app.example.com/integrations/done"


def connect_config(
    path: Path,
    handle: IdPHandle,
    *,
    database: Database,
    port: int,
    callback_port: int | None = None,
    api: dict[str, object] | None = None,
    providers: dict[str, dict[str, object]] | None = None,
    **connect: object,
) -> tuple[Path, str]:
    """A daemon listening on ``port`` with the token API and ``PROVIDER`` set up for
    connecting, its callback at ``callback_port`` (this daemon's own by default)."""
    bearer, api_section = api_table(path.parent, api)
    callback = f"http://127.0.0.1:{callback_port or port}/connect/{PROVIDER}/callback"
    table: dict[str, object] = {
        **handle.provider(),
        "authorization_url": handle.idp.url + "/authorize",
        "redirect_uri": callback,
        "return_urls": [RETURN],
        **connect,
    }
    write_config(
        path,
        database=database,
        providers={PROVIDER: table, **(providers or {})},
        listen=f"127.0.0.1:{port}",
        tables={"api": api_section},
    )
    return path, bearer


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


class Connection:
    """One link through to the callback, as the application, the IdP and the browser make it."""

    def __init__(self, client: Client, handle: IdPHandle, token_set_id: str, **body: object):
        self.client = client
        self.handle = handle
        self.token_set_id = token_set_id
        response = client.request(
            "POST", f"/v1/tokens/{token_set_id}/connect", json={"provider": PROVIDER, **body}
        )
        assert response.status_code == 201, response.text
        self.link: dict[str, Any] = response.json()
        self.params = query(self.link["authorization_url"])
        self.state = self.params["state"]
        # The state must never show in refresherd's output.
        LEAKS.add_secret(self.state)

    def consent(self, user: str | None = None) -> str:
        """What the IdP does when the customer logs in and consents: a code for this link."""
        return self.handle.idp.authorize(
            user or self.token_set_id,
            redirect_uri=self.params["redirect_uri"],
            code_challenge=self.params["code_challenge"],
        )

    def back(
        self, *, form_post: bool = False, daemon: DaemonProcess | None = None, **params: str
    ) -> httpx.Response:
        """The browser's arrival at the callback (not following refresherd's redirect)."""
        url = (daemon or self.client.daemon).url(f"/connect/{PROVIDER}/callback")
        if form_post:
            return httpx.post(url, data=params, timeout=60)
        return httpx.get(url, params=params, timeout=60)


def outcome_of(response: httpx.Response) -> dict[str, str]:
    """Where refresherd sent the browser: the return address, with the outcome and the id."""
    assert response.status_code == 303, (response.status_code, response.text)
    location = response.headers["location"]
    assert location.startswith(RETURN + "?"), location
    assert response.headers["referrer-policy"] == "no-referrer"
    sent = query(location)
    assert set(sent) == {"outcome", "token_set"}, location  # nothing else, never a secret
    return sent


def refused(response: httpx.Response) -> None:
    """Refused with a page of refresherd's own: no redirect (nowhere trusted to send it)."""
    assert response.status_code == 400, (response.status_code, response.text)
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


def events(db: Path) -> list[dict[str, Any]]:
    """The token-set events queued in the database (no daemon here delivers them)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT payload FROM hook_events ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]) for r in rows]


def connected_events(db: Path, count: int) -> list[dict[str, Any]]:
    """The token_set.connected events, once ``count`` are queued: the answer (a redirect, a
    201) is released before its event is queued, so the event may follow a moment later."""

    def queued() -> list[dict[str, Any]] | None:
        found = [e for e in events(db) if e["type"] == "token_set.connected"]
        return found if len(found) >= count else None

    return wait_until(queued, what=f"{count} token_set.connected event(s)")


def start(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, **connect: object
) -> tuple[IdPHandle, DaemonProcess, Client, Path]:
    handle = idp_factory(grace_period=5.0)
    port = free_port()
    config, bearer = connect_config(
        tmp_path / "config.toml", handle, database=tmp_path / "tokens.db", port=port, **connect
    )
    daemon = daemons(config)
    return handle, daemon, Client(daemon, bearer), config


# --------------------------------------------------------------------------- the flow


def test_a_link_connects_customers_through_the_query_and_the_form_post_callback(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, _config = start(tmp_path, idp_factory, daemons)
    db = tmp_path / "tokens.db"
    first = Connection(client, handle, "alice", prompt="login", params={"ui_locales": "da"})
    link = first.link
    assert link["id"] == "alice" and link["provider"] == PROVIDER and not link["reconnect"]
    assert link["return_url"] == RETURN and link["redirect_uri"].endswith("/connect/idp/callback")
    assert link["expires_at"] - time.time() == pytest.approx(600, abs=30)
    params = first.params
    assert urlsplit(link["authorization_url"]).path == "/authorize"
    assert params["response_type"] == "code" and params["client_id"] == handle.client_id
    assert params["code_challenge_method"] == "S256" and len(params["state"]) >= 43
    assert params["prompt"] == "login" and params["ui_locales"] == "da"
    assert "response_mode" not in params
    # The database keeps the state's digest, never the state; the verifier stays there.
    conn = sqlite3.connect(db)
    ((digest, verifier),) = conn.execute("SELECT state_digest, code_verifier FROM connect_states")
    conn.close()
    assert digest == state_digest(first.state)
    assert code_challenge(verifier) == params["code_challenge"]
    LEAKS.add_secret(verifier)

    sent = outcome_of(first.back(state=first.state, code=first.consent()))
    assert sent == {"outcome": "connected", "token_set": "alice"}
    row = read_rows(db)["alice"]
    assert row["state"] == "active" and row["version"] == 1
    assert handle.ledger.live_refresh_tokens("alice") == {row["refresh_token"]}
    assert client.get("alice").status_code == 200

    # form_post: the IdP's answer comes as a POST; refresherd's 303 turns it into a GET.
    second = Connection(client, handle, "bob")
    sent = outcome_of(second.back(form_post=True, state=second.state, code=second.consent()))
    assert sent == {"outcome": "connected", "token_set": "bob"}
    assert read_rows(db)["bob"]["state"] == "active"

    queued = connected_events(db, 2)
    assert [(e["token_set"], e["reconnected"], e["version"]) for e in queued] == [
        ("alice", False, 1),
        ("bob", False, 1),
    ]
    text = daemon.metrics()
    assert metric(text, "refresherd_connect_links_total", provider=PROVIDER) == 2
    assert metric(text, "refresherd_connections_total", outcome="connected") == 2
    assert len(daemon.events("customer connected")) == 2
    # Both are kept fresh from now on, like any token set.
    response = client.request("POST", "/v1/tokens/alice/connect", json={"provider": PROVIDER})
    assert (response.status_code, response.json()["error"]) == (409, "exists")
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- refusals


def test_every_refused_callback_stores_nothing_and_spends_no_code(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    other = idp_factory("other", grace_period=5.0)
    handle = idp_factory(grace_period=5.0)
    port = free_port()
    other_table = {
        **other.provider(),
        "authorization_url": other.idp.url + "/authorize",
        "redirect_uri": f"http://127.0.0.1:{port}/connect/other/callback",
    }
    config, bearer = connect_config(
        tmp_path / "config.toml",
        handle,
        database=tmp_path / "tokens.db",
        port=port,
        providers={"other": other_table},
    )
    daemon = daemons(config)
    client = Client(daemon, bearer)
    db = tmp_path / "tokens.db"
    callback = daemon.url(f"/connect/{PROVIDER}/callback")

    # No state, a forged one, a parameter twice, an unreadable form_post: a page, no redirect.
    refused(httpx.get(callback, params={"code": "c"}))
    refused(httpx.get(callback, params={"state": secrets.token_urlsafe(32), "code": "c"}))
    link = Connection(client, handle, "carol")
    code = link.consent()
    refused(httpx.get(callback + f"?state={link.state}&state={link.state}&code={code}"))
    refused(httpx.post(callback, content=b"{}", headers={"content-type": "application/json"}))
    # A state issued for another provider, presented at this one's callback: refused, and
    # used up (it was handed to the wrong place: the customer starts again).
    foreign = client.request("POST", "/v1/tokens/carol/connect", json={"provider": "other"})
    foreign_state = query(foreign.json()["authorization_url"])["state"]
    LEAKS.add_secret(foreign_state)
    refused(httpx.get(callback, params={"state": foreign_state, "code": code}))
    refused(httpx.get(daemon.url("/connect/other/callback"), params={"state": foreign_state}))
    # Unknown provider, or one not set up for connecting: not found.
    assert httpx.get(daemon.url("/connect/nope/callback"), params={"state": "x"}).status_code == 404
    assert handle.ledger.code_exchanges == 0 and read_rows(db) == {}

    # The link's own state still works, once; a replay (the same state and code) is refused
    # and the code is not sent again.
    assert outcome_of(link.back(state=link.state, code=code))["outcome"] == "connected"
    refused(link.back(state=link.state, code=code))
    assert handle.ledger.code_exchanges == 1
    # A code replayed after success with a fresh link: the IdP refuses it; nothing is stored.
    replay = Connection(client, handle, "dave")
    sent = outcome_of(replay.back(state=replay.state, code=code))
    assert sent == {"outcome": "exchange_failed", "token_set": "dave"}
    # The IdP's errors and a missing code come back as outcomes, not stack traces.
    for params, outcome in (
        ({"error": "access_denied", "error_description": "The user said no"}, "access_denied"),
        ({"error": "temporarily_unavailable"}, "idp_error"),
        ({}, "invalid_callback"),
    ):
        again = Connection(client, handle, "dave")
        assert outcome_of(again.back(state=again.state, **params))["outcome"] == outcome
    assert set(read_rows(db)) == {"carol"}
    # A return address outside the allow list is refused before any link exists.
    for url in ("https://evil.example/integrations/done", RETURN + "/../../steal", "//evil"):
        response = client.request(
            "POST", "/v1/tokens/erin/connect", json={"provider": PROVIDER, "return_url": url}
        )
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
        assert "return_url" in response.json()["message"]
    text = daemon.metrics()
    for outcome, count in (
        ("missing_state", 1),
        ("unknown_state", 3),
        ("duplicate_parameter", 1),
        ("unreadable", 1),
        ("wrong_provider", 1),
        ("connected", 1),
        ("exchange_failed", 1),
        ("access_denied", 1),
        ("idp_error", 1),
        ("invalid_callback", 1),
    ):
        assert metric(text, "refresherd_connections_total", outcome=outcome) == count, outcome
    assert handle.ledger.code_exchanges == 1  # carol's: the replayed code was refused
    assert daemon.stop() == 0
    lines = daemon.log_text()
    assert "The user said no" not in lines
    assert len(daemon.events("connect callback refused")) == 7


def test_an_expired_link_sends_the_customer_back_with_expired(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, _config = start(tmp_path, idp_factory, daemons, link_lifetime="1s")
    link = Connection(client, handle, "frank")
    code = link.consent()
    time.sleep(1.2)
    assert outcome_of(link.back(state=link.state, code=code)) == {
        "outcome": "expired",
        "token_set": "frank",
    }
    assert handle.ledger.code_exchanges == 0 and read_rows(tmp_path / "tokens.db") == {}
    assert daemon.stop() == 0


def test_expired_links_are_pruned(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0)
    db = tmp_path / "tokens.db"
    config, _ = connect_config(tmp_path / "config.toml", handle, database=db, port=free_port())

    async def plant() -> None:
        store = await open_store(db)
        try:
            for i, expired in enumerate((time.time() - EXPIRED_STATE_KEPT - 60, time.time() - 60)):
                await store.add_connect_state(
                    PendingConnection(
                        digest=state_digest(f"state-{i}"),
                        provider=PROVIDER,
                        token_set_id="x",
                        redirect_uri="http://127.0.0.1/connect/idp/callback",
                        return_url=None,
                        code_verifier=Secret("v" * 43),
                        created_at=expired - 600,
                        expires_at=expired,
                    )
                )
        finally:
            await store.close()

    anyio.run(plant)
    daemon = daemons(config)
    # The long-expired one goes; the one that expired a minute ago stays, so that its customer
    # is still told "expired".
    (line,) = daemon.wait_for_event("expired connect links pruned")
    assert line["links"] == 1
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT state_digest FROM connect_states").fetchall() == [
        (state_digest("state-1"),)
    ]
    conn.close()
    assert daemon.stop() == 0


def test_a_grant_the_database_refuses_is_held_until_stored(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """The IdP issues the grant, and the database refuses it (another process holds the write
    lock): the browser is sent back with outcome=pending, the grant is held in memory and
    retried, and stored when the database takes writes again: connected, never dropped."""
    handle, daemon, client, _config = start(
        tmp_path, idp_factory, daemons, api={"wait_timeout": "1s"}
    )
    db = tmp_path / "tokens.db"
    link = Connection(client, handle, "grace")
    code = link.consent()
    lock = HeldLock(db)
    # The IdP issues at once and answers 2 s later: the lock is taken in between.
    handle.faults.add(FaultKind.SLOW, delay=2.0, process_first=True)
    answers: list[httpx.Response] = []

    def browser() -> None:
        answers.append(link.back(state=link.state, code=code))

    thread = threading.Thread(target=browser)
    thread.start()
    try:
        wait_until(lambda: handle.ledger.code_exchanges == 1, what="the code to be spent")
        lock.break_()
        thread.join(timeout=60)
        assert outcome_of(answers[0]) == {"outcome": "pending", "token_set": "grace"}
        daemon.wait_for_event(HELD, token_set="grace")
        assert metric(daemon.metrics(), "refresherd_unpersisted_grants") == 1
        assert client.get("grace").status_code in (404, 503)  # not stored yet
    finally:
        lock.repair()
    daemon.wait_for_event("customer connected", token_set="grace")
    row = read_rows(db)["grace"]
    assert handle.ledger.live_refresh_tokens("grace") == {row["refresh_token"]}
    assert client.get("grace").status_code == 200
    assert [e["token_set"] for e in connected_events(db, 1)] == ["grace"]
    assert metric(daemon.metrics(), "refresherd_unpersisted_grants") == 0
    assert not [e for e in daemon.lines() if "not persisted" in str(e.get("event"))]
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


# --------------------------------------------------------------------------- re-connection


def test_an_invalidated_set_is_connected_again_in_place(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, config = start(tmp_path, idp_factory, daemons)
    db = tmp_path / "tokens.db"
    lines = handle.token_lines(PROVIDER, 1, prefix="hana", with_access_token=False)
    import_tokens(config, lines)
    wait_until(lambda: read_rows(db)["hana-0000"]["version"] >= 2, what="a first refresh")
    # The customer changes their password: every token of theirs dies; the next refresh (now,
    # by support staff) is refused with invalid_grant and the set is invalidated.
    handle.idp.revoke_user("hana-0000")
    run_cli(config, "refresh", "hana-0000")
    before = read_rows(db)["hana-0000"]
    assert before["state"] == "invalidated", before
    response = client.get("hana-0000")
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "invalidated" and body["reason"] == "invalid_grant"
    assert body["reconnect"] == {
        "method": "POST",
        "path": "/v1/tokens/hana-0000/connect",
        "provider": PROVIDER,
        "command": f"refresherd connect hana-0000 --provider {PROVIDER}",
    }
    (invalidated,) = [e for e in events(db) if e["type"] == "token_set.invalidated"]
    assert invalidated["reconnect"] == body["reconnect"]
    shown = run_cli(config, "tokens", "show", "hana-0000", "--json")
    assert json.loads(shown.stdout)["reconnect"] == body["reconnect"]
    shown = run_cli(config, "tokens", "show", "hana-0000")
    assert re.search(
        r"^reconnect\.command +refresherd connect hana-0000 --provider idp$", shown.stdout, re.M
    )

    link = Connection(client, handle, "hana-0000")
    assert link.link["reconnect"] is True
    sent = outcome_of(link.back(state=link.state, code=link.consent()))
    assert sent == {"outcome": "reconnected", "token_set": "hana-0000"}
    after = read_rows(db)["hana-0000"]
    assert after["state"] == "active" and after["invalid_reason"] is None
    assert after["version"] == before["version"] + 1 and after["created_at"] == before["created_at"]
    assert handle.ledger.live_refresh_tokens("hana-0000") == {after["refresh_token"]}
    assert client.get("hana-0000").status_code == 200
    (connected,) = connected_events(db, 1)
    assert connected["reconnected"] is True and connected["version"] == after["version"]
    assert metric(daemon.metrics(), "refresherd_connections_total", outcome="reconnected") == 1
    assert daemon.stop() == 0


def test_an_invalidated_set_is_authorized_again_by_the_exchange_endpoint(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """An application that runs its own authorization (POST /v1/tokens/ID/exchange) brings an
    invalidated set back as a connect link does: in place, with its id and history; a set
    that is not invalidated is refused before the code is spent (another provider's set is
    refused by the same rule, connect.connect_refusal: tests/test_connect.py)."""
    handle, daemon, client, config = start(tmp_path, idp_factory, daemons)
    db = tmp_path / "tokens.db"
    import_tokens(config, handle.token_lines(PROVIDER, 2, prefix="ines", with_access_token=False))
    wait_until(
        lambda: all(r["version"] >= 2 for r in read_rows(db).values()), what="first refreshes"
    )

    def exchange(token_set_id: str, provider: str = PROVIDER) -> httpx.Response:
        code = handle.idp.authorize(token_set_id, redirect_uri=REDIRECT)
        body = {"provider": provider, "code": code, "redirect_uri": REDIRECT}
        return client.request("POST", f"/v1/tokens/{token_set_id}/exchange", json=body)

    # Active: refused, and the code is not spent.
    spent = handle.ledger.code_exchanges
    response = exchange("ines-0001")
    assert (response.status_code, response.json()["error"]) == (409, "exists"), response.text
    assert "active" in response.json()["message"]
    assert handle.ledger.code_exchanges == spent

    handle.idp.revoke_user("ines-0000")
    run_cli(config, "refresh", "ines-0000")
    before = read_rows(db)["ines-0000"]
    assert before["state"] == "invalidated", before

    response = exchange("ines-0000")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reauthorized"] is True and body["access_token"] and "refresh_token" not in body
    after = read_rows(db)["ines-0000"]
    assert after["state"] == "active" and after["invalid_reason"] is None
    assert after["version"] == before["version"] + 1 and after["created_at"] == before["created_at"]
    assert handle.ledger.live_refresh_tokens("ines-0000") == {after["refresh_token"]}
    assert client.get("ines-0000").json()["access_token"] == body["access_token"]
    (connected,) = connected_events(db, 1)
    assert (connected["token_set"], connected["reconnected"], connected["via"]) == (
        "ines-0000",
        True,
        "exchange",
    )
    assert connected["version"] == after["version"]
    [line] = daemon.events("token set authorized again", token_set="ines-0000")
    assert line["via"] == "exchange"

    # A new id: 201, not reauthorized, and its event says so.
    response = exchange("ines-new")
    assert response.status_code == 201, response.text
    assert response.json()["reauthorized"] is False
    assert [(e["token_set"], e["reconnected"]) for e in connected_events(db, 2)[1:]] == [
        ("ines-new", False)
    ]
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- a fleet


def test_a_link_made_by_one_daemon_is_answered_by_another(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    """Two daemons on one database (SQLite, and PostgreSQL as a fleet runs): the first hands
    out the link, the second receives the callback and takes the state; a replay to the first
    finds it used."""
    handle = idp_factory(grace_period=5.0)
    ports = [free_port(), free_port()]
    made: list[tuple[DaemonProcess, Client]] = []
    for i, port in enumerate(ports):
        (tmp_path / f"d{i}").mkdir()
        config, bearer = connect_config(
            tmp_path / f"d{i}" / "config.toml",
            handle,
            database=db,
            port=port,
            callback_port=ports[1],
        )
        daemon = daemons(config, f"daemon-{i}")
        made.append((daemon, Client(daemon, bearer)))
    (first, first_client), (second, _) = made
    link = Connection(first_client, handle, "ivan")
    code = link.consent()
    sent = outcome_of(link.back(state=link.state, code=code, daemon=second))
    assert sent == {"outcome": "connected", "token_set": "ivan"}
    refused(link.back(state=link.state, code=code, daemon=first))
    assert read_rows(db)["ivan"]["state"] == "active"
    assert handle.ledger.code_exchanges == 1
    assert first_client.get("ivan").status_code == 200
    for daemon, _ in made:
        assert daemon.stop() == 0


# --------------------------------------------------------------------------- the CLI


def test_support_staff_print_a_link_with_the_cli(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle, daemon, client, config = start(tmp_path, idp_factory, daemons)
    proc = run_cli(config, "connect", "judy", "--provider", PROVIDER, "--prompt", "login")
    assert proc.returncode == 0, proc.stderr
    url = proc.stdout.splitlines()[0]
    params = query(url)
    assert params["prompt"] == "login" and params["client_id"] == handle.client_id
    assert "expires" in proc.stdout
    code = handle.idp.authorize(
        "judy", redirect_uri=params["redirect_uri"], code_challenge=params["code_challenge"]
    )
    callback = daemon.url(f"/connect/{PROVIDER}/callback")
    response = httpx.get(callback, params={"state": params["state"], "code": code})
    assert outcome_of(response) == {"outcome": "connected", "token_set": "judy"}
    # Refusals name what is wrong; nothing is kept.
    proc = run_cli(config, "connect", "judy", "--provider", PROVIDER)
    assert proc.returncode != 0 and "exists" in proc.stderr
    proc = run_cli(config, "connect", "kim", "--provider", PROVIDER, "--return-url", "https://x/")
    assert proc.returncode != 0 and "return_url" in proc.stderr
    proc = run_cli(config, "connect", "kim", "--provider", "nope")
    assert proc.returncode != 0 and "nope" in proc.stderr
    conn = sqlite3.connect(tmp_path / "tokens.db")
    assert conn.execute("SELECT count(*) FROM connect_states").fetchone() == (0,)
    conn.close()
    assert client.get("judy").status_code == 200
    assert daemon.stop() == 0
