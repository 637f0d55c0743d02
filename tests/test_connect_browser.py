"""Connecting a customer in a real browser, against an OAuth 2.0 server we did not write.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium with the
driver's path given, so Selenium Manager fetches nothing) goes through the whole flow against
django-oauth-toolkit, run as its own process (tests/dot_server): Django's login page and DOT's
own authorization (consent) page, DOT's token endpoint, DOT's database. The application's side
is played by the test: it asks refresherd's token API for a link (with the bearer), and a tiny
real return page on loopback records where the browser lands.

Two providers share one DOT application:

- ``dot-query`` is configured by ``issuer`` alone: discovery (OIDC, DOT_OIDC) gives the token
  and authorization endpoints; DOT answers the redirect_uri with a query (``?code=&state=``)
  and RFC 9207's ``iss``, which refresherd checks;
- ``dot-form`` is configured by URLs and ``response_mode = "form_post"``. DOT/oauthlib has no
  form_post: the piece a form_post IdP does (a page that posts code and state to the
  redirect_uri at once) is ours, in tests/dot_server/apps.py (``FormPostMiddleware``); the login,
  the consent, the code and the exchange are DOT's.

What each test proves: the link → the browser logs in and consents (or cancels) → DOT sends it
to refresherd's callback → the token set is stored (or not) → the daemon refreshes it (DOT's
database: the stored refresh token is the live one of its authorization, nothing minted was
dropped) → the browser lands on the application's page with ``outcome`` and ``token_set`` only
(no code, state or token in that URL or its Referer). Re-connection: a set whose refresh token
DOT revoked is invalidated by the daemon (invalid_grant), the API says how to bring it back,
and a new link re-authorizes it in place: same id, created_at kept, version counting on. Every
token and code DOT mints, and every state, joins the suite's leak scan of refresherd's output.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from api_daemon import Client
from conftest import LEAKS, DaemonProcess, free_port, metric, read_rows, wait_until, write_secret
from test_connect_api import events
from test_interop_dot import (
    DotBase,
    DotClient,
    DotServer,
    TokenSetRef,
    checksum,
    dot_env,
    dot_verdict,
    new_client_secret,
    run_python,
)

pytest.importorskip("django", reason="Django comes with the test extra")
pytest.importorskip("oauth2_provider", minversion="3.0", reason="DOT comes with the test extra")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium comes with the test extra")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Selenium Manager is never to fetch a driver or a browser: the paths below are given, and
# this makes sure of it.
os.environ["SE_OFFLINE"] = "true"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        pytest.fail("CI: chromium and chromium-driver must be installed (.ci/run installs them)")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

# DOT's access tokens live 6 s: the daemon refreshes a new set within seconds.
ACCESS_TTL = 6
USER = "customer"
PROVIDERS = ("dot-query", "dot-form")
BROWSER_WAIT = 30.0
# tests/dot_server/apps.py's line for each answer it turned into a form_post.
FORM_POSTED = "authorization answered by form_post"

SEED = """
import json, sys
import django
django.setup()
from django.contrib.auth import get_user_model
from oauth2_provider.models import get_application_model
spec = json.load(sys.stdin)
get_user_model().objects.create_user(spec["user"], password=spec["password"])
Application = get_application_model()
app = Application(
    name="refresherd",
    client_id=spec["client_id"],
    client_secret=spec["client_secret"],
    client_type=Application.CLIENT_CONFIDENTIAL,
    authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
    redirect_uris=" ".join(spec["redirect_uris"]),
    skip_authorization=False,
)
app.save()
"""


class ReturnPage:
    """The application's page the browser is sent back to: a real HTTP server on loopback that
    records what it was given (the URL and the Referer)."""

    def __init__(self) -> None:
        self.visits: list[tuple[str, str | None]] = []
        visits = self.visits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/app/"):  # not the browser's /favicon.ico
                    visits.append((self.path, self.headers.get("Referer")))
                outcome = parse_qs(urlsplit(self.path).query).get("outcome", ["?"])[0]
                body = f'<!doctype html><h1 id="outcome">{outcome}</h1>'.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/app/connected"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    """DOT, the daemon, the browser and the application's return page, for the module."""

    dot: DotServer
    client: DotClient
    password: str
    daemon: DaemonProcess
    api: Client
    db: Path
    browser: Any
    page: ReturnPage
    states: list[str] = field(default_factory=list)

    # -- the application ---------------------------------------------------------------------

    def link(self, token_set_id: str, provider: str, **body: object) -> dict[str, Any]:
        """The application asks refresherd for a link (the token API, with the bearer)."""
        response = self.api.request(
            "POST", f"/v1/tokens/{token_set_id}/connect", json={"provider": provider, **body}
        )
        assert response.status_code == 201, response.text
        link: dict[str, Any] = response.json()
        state = parse_qs(urlsplit(link["authorization_url"]).query)["state"][0]
        LEAKS.add_secret(state)
        self.states.append(state)
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            for (verifier,) in conn.execute("SELECT code_verifier FROM connect_states"):
                LEAKS.add_secret(verifier)
        finally:
            conn.close()
        return link

    # -- the customer's browser --------------------------------------------------------------

    def go_through(self, link: dict[str, Any], *, consent: bool) -> tuple[dict[str, str], bool]:
        """Open the link, log in on DOT's login page if it asks, consent or cancel on DOT's
        consent page; the query the browser landed with on the application's page, and
        whether it had to log in."""
        seen = len(self.page.visits)
        self.browser.get(link["authorization_url"])
        wait = WebDriverWait(self.browser, BROWSER_WAIT)
        wait.until(
            lambda b: (
                "/accounts/login/" in b.current_url or b.find_elements(By.ID, "authorizationForm")
            )
        )
        logged_in = "/accounts/login/" in self.browser.current_url
        if logged_in:
            self.browser.find_element(By.NAME, "username").send_keys(USER)
            self.browser.find_element(By.NAME, "password").send_keys(self.password)
            self.browser.find_element(By.ID, "login").click()
            wait.until(lambda b: b.find_elements(By.ID, "authorizationForm"))
        assert "refresherd" in self.browser.page_source  # DOT names the application
        button = 'input[name="allow"]' if consent else 'input[value="Cancel"]'
        self.browser.find_element(By.CSS_SELECTOR, button).click()
        wait.until(lambda b: b.current_url.startswith(self.page.url))
        assert self.browser.find_element(By.ID, "outcome").text
        (path, referer), *more = self.page.visits[seen:]
        assert not more, more
        landed = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        # The application learns the outcome and the id; no code, state or token reaches it,
        # neither in the URL nor in the Referer (the callback's URL held code and state).
        assert set(landed) == {"outcome", "token_set"}, path
        for leaked in (*self.states, "code="):
            assert leaked not in path and (referer is None or leaked not in referer), referer
        return landed, logged_in

    # -- what is stored ----------------------------------------------------------------------

    def row(self, token_set_id: str) -> dict[str, Any]:
        return read_rows(self.db)[token_set_id]

    def refreshed(self, token_set_id: str, version: int) -> dict[str, Any]:
        """Wait until the daemon has refreshed the set past ``version`` (DOT rotated it)."""
        wait_until(
            lambda: self.row(token_set_id)["version"] > version,
            what=f"the daemon to refresh {token_set_id}",
        )
        return self.row(token_set_id)

    def live_at_dot(self, token_set_id: str) -> dict[str, Any]:
        """DOT's word on the stored refresh token: live, this client's and this user's, the
        only live one of its authorization."""
        row = self.row(token_set_id)
        tokens = self.dot.refresh_tokens()
        (mine,) = [t for t in tokens if t["token_checksum"] == checksum(row["refresh_token"])]
        assert mine["revoked"] is None and mine["access_token_id"] is not None, mine
        assert (mine["client_id"], mine["username"]) == (self.client.client_id, USER)
        family = [t for t in tokens if t["token_family"] == mine["token_family"]]
        assert [t for t in family if t["revoked"] is None] == [mine]
        return mine


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("connect-browser")
    port = free_port()
    redirect_uris = [f"http://127.0.0.1:{port}/connect/{p}/callback" for p in PROVIDERS]
    # DOT's database: migrated once, with one confidential authorization-code application that
    # knows refresherd's two callbacks, and one customer.
    base_db = directory / "dot-base.sqlite3"
    env = dot_env(base_db)
    run_python(env, "-m", "django", "migrate", "--noinput", "-v", "0")
    secret, password = new_client_secret(), "pw-" + os.urandom(8).hex()
    LEAKS.add_secret(password)
    secret_file = write_secret(directory / "dot.client-secret", secret)
    client = DotClient("post", "refresherd-connect", secret, secret_file)
    spec = {
        "user": USER,
        "password": password,
        "client_id": client.client_id,
        "client_secret": secret,
        "redirect_uris": redirect_uris,
    }
    run_python(env, "-c", SEED, stdin=json.dumps(spec))
    dot = DotServer(
        directory / "dot",
        DotBase(base_db, {USER: password}, {"post": client}),
        grace=0,
        reuse_protection=True,
        access_ttl=ACCESS_TTL,
    )
    dot.env["DOT_OIDC"] = "1"
    page = ReturnPage()
    daemon: DaemonProcess | None = None
    browser: Any = None
    try:
        dot.start()
        db = directory / "tokens.db"
        config = write_connect_config(directory, dot, client, port, db, page.url)
        daemon = DaemonProcess(config, directory / "daemon.log").start()
        bearer = (directory / "api.bearer").read_text().strip()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ):
            options.add_argument(argument)
        # The driver's path, given: Selenium Manager has nothing to look for or download.
        browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        browser.set_page_load_timeout(BROWSER_WAIT)
        yield World(dot, client, password, daemon, Client(daemon, bearer), db, browser, page)
        assert daemon.stop() == 0
    finally:
        if browser is not None:
            browser.quit()
        if daemon is not None and daemon.running():
            daemon.kill()
        page.close()
        dot.stop()  # every token and code DOT minted joins the leak scan


def write_connect_config(
    directory: Path, dot: DotServer, client: DotClient, port: int, db: Path, return_url: str
) -> Path:
    bearer = "api_" + os.urandom(18).hex()
    bearer_file = write_secret(directory / "api.bearer", bearer)
    common = f"""client_id = "{client.client_id}"
client_secret_file = "{client.secret_file}"
auth_method = "client_secret_post"
refresh_token_usage = "one_time"
grace_period = "0s"
authorization_scope = "read write"
return_urls = ["{return_url}"]
"""
    text = f"""[daemon]
database = "{db}"

[server]
listen = "127.0.0.1:{port}"

[log]
level = "info"
format = "json"

[api]
enabled = true
bearer_token_file = "{bearer_file}"

[providers.dot-query]
issuer = "{dot.url("/o")}"
redirect_uri = "http://127.0.0.1:{port}/connect/dot-query/callback"
{common}
[providers.dot-form]
token_url = "{dot.token_url}"
authorization_url = "{dot.url("/o/authorize/")}"
revocation_url = "{dot.url("/o/revoke_token/")}"
response_mode = "form_post"
redirect_uri = "http://127.0.0.1:{port}/connect/dot-form/callback"
{common}"""
    path = directory / "refresherd.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the flows


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_customer_connects_in_a_browser_and_the_daemon_keeps_the_set_fresh(
    world: World, provider: str
) -> None:
    token_set_id = f"acme-{provider}"
    link = world.link(token_set_id, provider)
    params = parse_qs(urlsplit(link["authorization_url"]).query)
    assert link["authorization_url"].startswith(world.dot.url("/o/authorize/"))
    assert params["code_challenge_method"] == ["S256"]
    assert ("response_mode" in params) is (provider == "dot-form")
    posted_before = world.dot.log_text().count(FORM_POSTED)
    landed, _ = world.go_through(link, consent=True)
    assert landed == {"outcome": "connected", "token_set": token_set_id}
    # form_post: the browser posted DOT's answer to refresherd (tests/dot_server/apps.py).
    posted = world.dot.log_text().count(FORM_POSTED) - posted_before
    assert posted == (1 if provider == "dot-form" else 0)
    row = world.row(token_set_id)
    assert row["state"] == "active" and row["version"] == 1 and row["provider"] == provider
    world.live_at_dot(token_set_id)
    # The daemon keeps it fresh: DOT rotates it, and the token refresherd stored is the live one.
    row = world.refreshed(token_set_id, 1)
    world.live_at_dot(token_set_id)
    ref = TokenSetRef(token_set_id, world.client, USER)
    assert dot_verdict(world.dot, [ref], {token_set_id: row}) == []
    assert world.api.get(token_set_id).status_code == 200
    connected = [e for e in events(world.db) if e["type"] == "token_set.connected"]
    assert {"token_set": token_set_id, "reconnected": False, "version": 1}.items() <= next(
        e for e in connected if e["token_set"] == token_set_id
    ).items()


def test_a_customer_who_cancels_comes_back_with_access_denied(world: World) -> None:
    link = world.link("initech", "dot-form")
    landed, _ = world.go_through(link, consent=False)
    assert landed == {"outcome": "access_denied", "token_set": "initech"}
    assert "initech" not in read_rows(world.db)
    assert (
        metric(world.daemon.metrics(), "refresherd_connections_total", outcome="access_denied") == 1
    )
    (line,) = world.daemon.events("customer not connected", token_set="initech")
    assert line["outcome"] == "access_denied"


def test_an_invalidated_set_is_connected_again_in_place(world: World) -> None:
    token_set_id = "umbrella"
    landed, _ = world.go_through(world.link(token_set_id, "dot-query"), consent=True)
    assert landed["outcome"] == "connected"
    before = world.refreshed(token_set_id, 1)
    # The customer withdraws the authorization at DOT: its refresh token is revoked there. The
    # daemon's next refresh is refused with invalid_grant: the set is invalidated.
    world.dot.revoke(world.client, before["refresh_token"])
    wait_until(
        lambda: world.row(token_set_id)["state"] == "invalidated",
        what="the daemon to invalidate the revoked set",
    )
    invalidated = world.row(token_set_id)
    assert invalidated["invalid_reason"] == "invalid_grant"
    # The application is told how to bring the customer back.
    response = world.api.get(token_set_id)
    assert response.status_code == 409
    hint = response.json()["reconnect"]
    assert hint["path"] == f"/v1/tokens/{token_set_id}/connect" and hint["provider"] == "dot-query"
    (event,) = [
        e
        for e in events(world.db)
        if e["type"] == "token_set.invalidated" and e["token_set"] == token_set_id
    ]
    assert event["reconnect"] == hint
    # A new link, with prompt=login: DOT asks the customer to log in again.
    link = world.link(token_set_id, hint["provider"], prompt="login")
    assert link["reconnect"] is True
    landed, logged_in = world.go_through(link, consent=True)
    assert logged_in
    assert landed == {"outcome": "reconnected", "token_set": token_set_id}
    after = world.row(token_set_id)
    assert after["state"] == "active" and after["invalid_reason"] is None
    assert after["created_at"] == invalidated["created_at"]
    assert after["version"] == invalidated["version"] + 1
    world.live_at_dot(token_set_id)
    # Kept fresh again, on the new authorization.
    world.refreshed(token_set_id, after["version"])
    world.live_at_dot(token_set_id)
    assert world.api.get(token_set_id).status_code == 200
    text = world.daemon.metrics()
    assert metric(text, "refresherd_connections_total", outcome="reconnected") == 1
    assert (
        metric(text, "refresherd_connections_total", provider="dot-query", outcome="connected") >= 2
    )
