"""refresherd.client against the real daemon: a real ``refresherd run`` with its token API on
TCP and a unix socket, a real FakeIdP on loopback, and a real upstream API (an HTTP server on
loopback) that accepts only access tokens that IdP issued and answers 401 to any other, and to
the ones a test has it refuse.

The sidecar's requests are counted by the httpx client handed to :class:`Sidecar` (its
``event_hooks``): what went over the wire, not what the client thinks it did."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests
from api_daemon import PROVIDER, api_config
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
)

from refresherd.client import (
    AccessToken,
    Sidecar,
    SidecarAuth,
    SidecarRequestsAuth,
    SidecarTokens,
    SidecarUnreachable,
    TokenUnavailable,
    use_until,
)
from refresherd.testing import FaultKind

SET = "ts-0000"
BACKENDS = ["asyncio", "trio"]


# --------------------------------------------------------------------------- the upstream API


class Upstream:
    """The application's upstream API: ``GET /`` answers 200 to ``Authorization: Bearer T``
    when T is an access token the IdP issued and not refused here, else 401. Every token it
    was shown is kept, in order."""

    def __init__(self, handle: IdPHandle) -> None:
        self.handle = handle
        self.seen: list[str] = []
        self.refused: set[str] = set()
        self.refuse_all = False
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream._answer(self)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                upstream._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def accepts(self, token: str) -> bool:
        issued = token.startswith("at_") and token in self.handle.ledger.issued_tokens()
        return issued and token not in self.refused and not self.refuse_all

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        token = (request.headers.get("authorization") or "").removeprefix("Bearer ")
        with self._lock:
            self.seen.append(token)
        status = 200 if self.accepts(token) else 401
        body = json.dumps({"ok": status == 200}).encode()
        request.send_response(status)
        if status == 401:
            request.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


class Count:
    """Requests sent to the sidecar, counted by an httpx event hook."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def hook(self, request: httpx.Request) -> None:
        assert request.url.path.startswith("/v1/tokens/")
        with self._lock:
            self.n += 1

    async def ahook(self, request: httpx.Request) -> None:
        self.hook(request)


# --------------------------------------------------------------------------- the setup


@dataclass
class Setup:
    tmp_path: Path
    handle: IdPHandle
    daemon: DaemonProcess
    config: Path
    bearer: str
    bearer_file: Path
    upstream: Upstream
    socket: Path
    count: Count = field(default_factory=Count)
    clients: list[httpx.Client] = field(default_factory=list)

    def sidecar(self, **kw: Any) -> Sidecar:
        """Over TCP, counted."""
        client = httpx.Client(event_hooks={"request": [self.count.hook]})
        self.clients.append(client)
        return Sidecar(self.daemon.url(""), bearer_file=self.bearer_file, client=client, **kw)

    def counting_async_client(self) -> httpx.AsyncClient:
        """For :meth:`async_sidecar`; open it (``async with``) in the loop that uses it."""
        return httpx.AsyncClient(event_hooks={"request": [self.count.ahook]})

    def async_sidecar(self, client: httpx.AsyncClient) -> Sidecar:
        """Over TCP, counted."""
        return Sidecar(self.daemon.url(""), bearer_file=self.bearer_file, async_client=client)

    def stored_access_token(self) -> str:
        value = read_rows(self.tmp_path / "tokens.db")[SET]["access_token"]
        assert isinstance(value, str)
        return value

    def refresh_in_the_daemon(self) -> str:
        """``refresherd refresh`` (a real rotation, as the scheduler's): the new access token."""
        before = self.stored_access_token()
        proc = run_cli(self.config, "refresh", SET)
        assert proc.returncode == 0, proc.stderr
        after = self.stored_access_token()
        assert after != before
        return after

    def secrets(self) -> set[str]:
        return {self.bearer, *self.handle.ledger.issued_tokens()}


@pytest.fixture
def make_setup(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(
        *,
        import_set: bool = True,
        idp: dict[str, Any] | None = None,
        api: dict[str, object] | None = None,
        extra_toml: str = "",
        **provider: object,
    ) -> Setup:
        handle = idp_factory(**{"grace_period": 5.0, **(idp or {})})
        socket = tmp_path / "api.sock"
        config, bearer = api_config(
            tmp_path, handle, api={"unix_socket": str(socket), **(api or {})}, **provider
        )
        with config.open("a") as fh:
            fh.write(extra_toml)
        daemon = daemons(config)
        daemon.wait_for_event("listening", socket=str(socket))
        setup = Setup(
            tmp_path,
            handle,
            daemon,
            config,
            bearer,
            tmp_path / "api.bearer",
            Upstream(handle),
            socket,
        )
        made.append(setup)
        if import_set:
            import_tokens(config, handle.token_lines(PROVIDER, 1))
        return setup

    yield make
    for setup in made:
        setup.upstream.close()
        for client in setup.clients:
            client.close()


def assert_shows_no_secret(text: str, setup: Setup, label: str) -> None:
    LEAKS.add_output(f"refresherd.client: {label}", text.encode())
    for secret in setup.secrets():
        assert secret not in text, f"{label} shows a secret"


# --------------------------------------------------------------------------- the cache


def test_the_first_call_fetches_and_the_next_ones_use_the_cache(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    tokens = SidecarTokens(setup.sidecar(), SET)
    auth = SidecarAuth(tokens)
    with httpx.Client(auth=auth) as api:
        first = api.get(setup.upstream.url)
        second = api.get(setup.upstream.url)
        third = api.post(setup.upstream.url, json={"a": 1})
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200]
    assert setup.count.n == 1
    current = setup.stored_access_token()
    assert setup.upstream.seen == [current] * 3
    cached = tokens.cached
    assert cached is not None and cached.value == current
    assert cached.token_set == SET and cached.token_type == "Bearer"
    assert cached.lifetime is not None and 3500 < cached.lifetime <= 3600
    assert cached.expires_at is not None and abs(cached.expires_at - time.time() - 3600) < 100
    # Used until a minute before it expires (the default margin).
    until = use_until(cached, margin=60, margin_share=0.5, ttl_without_expiry=60)
    assert until == pytest.approx(cached.fetched_at + cached.lifetime - 60)
    for shown in (repr(auth), str(auth), repr(tokens), repr(cached), repr(tokens.sidecar)):
        assert_shows_no_secret(shown, setup, "repr")
    assert SET in repr(tokens) and "api.bearer" in repr(tokens.sidecar)


def test_near_its_expiry_the_token_is_fetched_again(make_setup: Callable[..., Setup]) -> None:
    # 12 s tokens: the daemon refreshes them 6 s before they expire, and the client uses one
    # for half of what it had left (the default margin_share, below the 60 s margin).
    setup = make_setup(idp={"access_token_lifetime": 12.0})
    tokens = SidecarTokens(setup.sidecar(), SET)
    assert tokens.get() and setup.count.n == 1
    first = tokens.cached
    assert first is not None and first.lifetime is not None and first.lifetime > 0
    tokens.get()
    assert setup.count.n == 1
    while setup.count.n == 1:
        assert time.monotonic() < first.fetched_at + first.lifetime, "not fetched before expiry"
        tokens.get()
        time.sleep(0.05)
    # Not before its margin: half of its lifetime (expires_in is whole seconds, rounded down).
    elapsed = time.monotonic() - first.fetched_at
    assert elapsed >= first.lifetime * 0.5 - 0.1
    assert setup.count.n == 2


def test_the_margin_is_configurable(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    sidecar = setup.sidecar()
    probe = SidecarTokens(sidecar, SET)
    probe.get()
    assert probe.cached is not None and probe.cached.lifetime is not None
    # A margin of all but 4 s of the lifetime just seen (margin_share allows nearly all):
    # the next answer, a moment older, is used for 3 to 4 s.
    margin = probe.cached.lifetime - 4
    tokens = SidecarTokens(sidecar, SET, margin=margin, margin_share=0.9999)
    seen = setup.count.n
    tokens.get()
    tokens.get()
    assert setup.count.n == seen + 1
    wait_until(lambda: tokens.cached is None, timeout=10, interval=0.1, what="the margin")
    tokens.get()
    assert setup.count.n == seen + 2
    for bad in ({"margin": -1}, {"margin_share": 1.0}, {"ttl_without_expiry": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SidecarTokens(tokens.sidecar, SET, **bad)


# --------------------------------------------------------------------------- 401 from upstream


def test_a_401_asks_the_sidecar_once_and_retries_once(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    upstream = setup.upstream
    tokens = SidecarTokens(setup.sidecar(), SET)
    with httpx.Client(auth=SidecarAuth(tokens)) as api:
        old = setup.stored_access_token()
        assert api.get(upstream.url).status_code == 200
        # The daemon rotated it, and the upstream refuses the cached one from now on.
        new = setup.refresh_in_the_daemon()
        upstream.refused.add(old)
        del upstream.seen[:]
        response = api.post(upstream.url, json={"order": 1})
        assert response.status_code == 200
        assert upstream.seen == [old, new] and setup.count.n == 2
        assert [r.status_code for r in response.history] == [401]

        # The sidecar has nothing newer: the 401 is the answer, not re-sent.
        upstream.refuse_all = True
        del upstream.seen[:]
        response = api.get(upstream.url)
        assert response.status_code == 401
        assert upstream.seen == [new] and setup.count.n == 3

        # A newer one, refused too: one retry, and its 401 is the answer, not a loop.
        newest = setup.refresh_in_the_daemon()
        del upstream.seen[:]
        response = api.get(upstream.url)
        assert response.status_code == 401
        assert upstream.seen == [new, newest] and setup.count.n == 4


def test_a_401_on_the_token_refresherd_still_holds_makes_it_refresh_now(
    make_setup: Callable[..., Setup],
) -> None:
    """The upstream refuses a token refresherd would serve for another hour (revoked early,
    say): the renewal is a forced refresh (POST /v1/tokens/{id}/refresh), and the request goes
    through with the rotated token. Refused again at once: no second rotation (429 inside the
    daemon), the 401 is the answer."""
    setup = make_setup()
    upstream = setup.upstream
    tokens = SidecarTokens(setup.sidecar(), SET)
    with httpx.Client(auth=SidecarAuth(tokens)) as api:
        old = setup.stored_access_token()
        upstream.refused.add(old)
        before = setup.handle.ledger.refreshes
        response = api.get(upstream.url)
        assert response.status_code == 200, response.text
        new = setup.stored_access_token()
        assert new != old and upstream.seen == [old, new]
        assert setup.handle.ledger.refreshes == before + 1 and setup.count.n == 2

        upstream.refused.add(new)
        del upstream.seen[:]
        response = api.get(upstream.url)
        assert response.status_code == 401
        assert upstream.seen == [new] and setup.handle.ledger.refreshes == before + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_401_asks_once_and_retries_once_async(
    make_setup: Callable[..., Setup], backend: str
) -> None:
    setup = make_setup()
    upstream = setup.upstream

    async def main() -> None:
        async with (
            setup.counting_async_client() as client,
            httpx.AsyncClient(
                auth=SidecarAuth(SidecarTokens(setup.async_sidecar(client), SET))
            ) as api,
        ):
            old = setup.stored_access_token()
            assert (await api.get(upstream.url)).status_code == 200
            assert (await api.get(upstream.url)).status_code == 200
            assert setup.count.n == 1
            new = await anyio.to_thread.run_sync(setup.refresh_in_the_daemon)
            upstream.refused.add(old)
            del upstream.seen[:]
            response = await api.get(upstream.url)
            assert response.status_code == 200
            assert upstream.seen == [old, new] and setup.count.n == 2
            upstream.refuse_all = True
            newest = await anyio.to_thread.run_sync(setup.refresh_in_the_daemon)
            del upstream.seen[:]
            response = await api.get(upstream.url)
            assert response.status_code == 401
            assert upstream.seen == [new, newest] and setup.count.n == 3

    anyio.run(main, backend=backend)


def test_requests_auth_caches_and_retries_once_on_a_401(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    upstream = setup.upstream
    tokens = SidecarTokens(setup.sidecar(), SET)
    auth = SidecarRequestsAuth(tokens)
    with requests.Session() as session:
        session.auth = auth
        old = setup.stored_access_token()
        assert session.get(upstream.url, timeout=30).status_code == 200
        assert session.post(upstream.url, json={"a": 1}, timeout=30).status_code == 200
        assert setup.count.n == 1
        new = setup.refresh_in_the_daemon()
        upstream.refused.add(old)
        del upstream.seen[:]
        response = session.post(upstream.url, data=b"payload", timeout=30)
        assert response.status_code == 200
        assert upstream.seen == [old, new] and setup.count.n == 2
        assert [r.status_code for r in response.history] == [401]
        upstream.refuse_all = True
        newest = setup.refresh_in_the_daemon()
        del upstream.seen[:]
        response = session.get(upstream.url, timeout=30)
        assert response.status_code == 401
        assert upstream.seen == [new, newest] and setup.count.n == 3
        # A body that cannot be sent twice is not re-sent: its 401 is the answer.
        setup.refresh_in_the_daemon()
        del upstream.seen[:]
        response = session.post(upstream.url, data=iter([b"once"]), timeout=30)
        assert response.status_code == 401 and upstream.seen == [newest]
        assert setup.count.n == 3
    assert_shows_no_secret(repr(auth), setup, "repr of the requests auth")


# --------------------------------------------------------------------------- transports


def test_over_the_unix_socket_and_served_from_the_cache_while_the_sidecar_is_down(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    sidecar = Sidecar(unix_socket=setup.socket, bearer_file=setup.bearer_file)
    tokens = SidecarTokens(sidecar, SET)
    with httpx.Client(auth=SidecarAuth(tokens)) as api:
        assert api.get(setup.upstream.url).status_code == 200
        assert setup.upstream.seen == [setup.stored_access_token()]
        assert setup.daemon.stop() == 0
        # Cached: no need of the sidecar until near its expiry.
        assert api.get(setup.upstream.url).status_code == 200
    # A new client has nothing cached: the sidecar's absence is the clear error.
    with pytest.raises(SidecarUnreachable) as caught:
        SidecarTokens(sidecar, SET).get()
    message = str(caught.value)
    assert f"token set {SET!r}: no answer from refresherd at unix socket {setup.socket}" in message
    assert caught.value.token_set == SET and caught.value.status is None
    assert caught.value.__cause__ is None  # the httpx error holds the request, and the bearer
    assert_shows_no_secret(message, setup, "SidecarUnreachable")


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_over_the_unix_socket(make_setup: Callable[..., Setup], backend: str) -> None:
    setup = make_setup()

    async def main() -> None:
        sidecar = Sidecar(unix_socket=setup.socket, bearer_file=setup.bearer_file)
        async with httpx.AsyncClient(auth=SidecarAuth(SidecarTokens(sidecar, SET))) as api:
            assert (await api.get(setup.upstream.url)).status_code == 200

    anyio.run(main, backend=backend)
    assert setup.upstream.seen == [setup.stored_access_token()]


def test_a_sidecar_that_does_not_listen_is_a_clear_error(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    url = f"http://127.0.0.1:{free_port()}"
    tokens = SidecarTokens(Sidecar(url, bearer=setup.bearer, timeout=5), SET)
    with pytest.raises(SidecarUnreachable, match=f"no answer from refresherd at {url}"):
        tokens.get()
    with httpx.Client(auth=SidecarAuth(tokens)) as api, pytest.raises(SidecarUnreachable):
        api.get(setup.upstream.url)
    assert setup.upstream.seen == []  # nothing sent upstream without a token

    async def main() -> None:
        await tokens.aget()

    with pytest.raises(SidecarUnreachable) as caught:
        anyio.run(main)
    assert_shows_no_secret(str(caught.value) + repr(tokens), setup, "SidecarUnreachable")


# --------------------------------------------------------------------------- one fetch


def _held_setup(make_setup: Callable[..., Setup]) -> Setup:
    """A set without an access token, its refresh held at the IdP: every GET of it waits."""
    setup = make_setup(
        import_set=False,
        idp={"usage": "reuse"},
        api={"wait_timeout": "2m"},
        request_timeout="2m",
    )
    setup.handle.idp.hold_requests()
    import_tokens(setup.config, setup.handle.token_lines(PROVIDER, 1, with_access_token=False))
    wait_until(lambda: setup.handle.idp.held_requests == 1, what="the scheduler's refresh")
    return setup


def _joined(setup: Setup) -> int:
    """GETs of the API waiting for the held refresh."""
    return int(metric(setup.daemon.metrics(), "refresherd_singleflight_coalesced_total"))


def test_concurrent_threads_cause_one_fetch(make_setup: Callable[..., Setup]) -> None:
    setup = _held_setup(make_setup)
    tokens = SidecarTokens(setup.sidecar(timeout=120), SET)
    api = httpx.Client(auth=SidecarAuth(tokens), timeout=120)
    results: list[int] = []
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        results.append(api.get(setup.upstream.url).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: _joined(setup) >= 1, what="the first GET to wait for the refresh")
    # Unlocked, the other seven would join the refresh too within this second.
    time.sleep(1.0)
    assert _joined(setup) == 1 and setup.count.n == 1
    setup.handle.idp.release_requests()
    for thread in threads:
        thread.join(60)
    api.close()
    assert results == [200] * 8
    assert setup.count.n == 1 and _joined(setup) == 1
    assert setup.upstream.seen == [setup.stored_access_token()] * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_tasks_cause_one_fetch(make_setup: Callable[..., Setup], backend: str) -> None:
    setup = _held_setup(make_setup)
    results: list[int] = []

    async def main() -> None:
        async with (
            setup.counting_async_client() as client,
            httpx.AsyncClient(
                auth=SidecarAuth(SidecarTokens(setup.async_sidecar(client), SET)), timeout=120
            ) as api,
            anyio.create_task_group() as tg,
        ):

            async def call() -> None:
                results.append((await api.get(setup.upstream.url)).status_code)

            for _ in range(8):
                tg.start_soon(call)
            while await anyio.to_thread.run_sync(_joined, setup) < 1:
                await anyio.sleep(0.1)
            await anyio.sleep(1.0)
            assert await anyio.to_thread.run_sync(_joined, setup) == 1
            assert setup.count.n == 1
            setup.handle.idp.release_requests()

    anyio.run(main, backend=backend)
    assert results == [200] * 8
    assert setup.count.n == 1 and _joined(setup) == 1


def test_concurrent_401s_cause_one_renewal(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    tokens = SidecarTokens(setup.sidecar(), SET)
    api = httpx.Client(auth=SidecarAuth(tokens))
    old = setup.stored_access_token()
    assert api.get(setup.upstream.url).status_code == 200
    new = setup.refresh_in_the_daemon()
    setup.upstream.refused.add(old)
    results: list[int] = []
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        results.append(api.get(setup.upstream.url).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    api.close()
    assert results == [200] * 8
    # However many were refused meanwhile, the sidecar was asked once more.
    assert setup.count.n == 2
    assert setup.upstream.seen.count(new) == 8


# --------------------------------------------------------------------------- errors


def test_errors_name_the_token_set_and_refreshers_reason(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    sidecar = setup.sidecar()

    with pytest.raises(TokenUnavailable) as unknown:
        SidecarTokens(sidecar, "nobody").get()
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_token_set")
    assert str(unknown.value) == (
        "token set 'nobody' is not known to refresherd (refresherd: HTTP 404 unknown_token_set)"
    )

    # Invalidated: the IdP refuses its refresh token.
    lines = setup.handle.token_lines(PROVIDER, 1, prefix="gone", with_access_token=False)
    setup.handle.idp.revoke(str(lines[0]["refresh_token"]))
    import_tokens(setup.config, lines)
    wait_until(
        lambda: read_rows(setup.tmp_path / "tokens.db")["gone-0000"]["state"] == "invalidated",
        what="the revoked set to be invalidated",
    )
    with (
        httpx.Client(auth=SidecarAuth(SidecarTokens(sidecar, "gone-0000"))) as api,
        pytest.raises(TokenUnavailable) as invalidated,
    ):
        api.get(setup.upstream.url)
    assert (invalidated.value.code, invalidated.value.reason) == ("invalidated", "invalid_grant")
    assert str(invalidated.value).startswith(
        "token set 'gone-0000' is invalidated: the customer must authorize again"
    )
    assert "HTTP 409 invalidated, reason invalid_grant" in str(invalidated.value)

    # A wrong bearer: refused by the sidecar, and the bearer is not repeated.
    wrong = Sidecar(setup.daemon.url(""), bearer="wrong-bearer-0123456789")
    with pytest.raises(TokenUnavailable) as refused:
        SidecarTokens(wrong, SET).get()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert "refused the API bearer" in str(refused.value)
    assert "wrong-bearer" not in str(refused.value) + repr(wrong)

    for caught in (unknown, invalidated, refused):
        assert_shows_no_secret(str(caught.value) + repr(caught.value), setup, "TokenUnavailable")
    assert setup.upstream.seen == []


def test_provider_unavailable_carries_the_retry_time(make_setup: Callable[..., Setup]) -> None:
    # A long backoff: after one failure the set waits an hour, and says so.
    setup = make_setup(
        import_set=False,
        idp={"usage": "reuse"},
        extra_toml='\n[schedule]\nbackoff_initial = "1h"\nbackoff_max = "2h"\n',
    )
    setup.handle.faults.add(FaultKind.SERVER_ERROR, times=1)
    (line,) = setup.handle.token_lines(PROVIDER, 1)
    line["expires_in"] = 0  # expired: due at once, and nothing to serve while it fails
    import_tokens(setup.config, [line])
    wait_until(
        lambda: read_rows(setup.tmp_path / "tokens.db")[SET]["state"] == "failing",
        what="the set to fail once and back off",
    )

    async def main() -> None:
        async with setup.counting_async_client() as client:
            await SidecarTokens(setup.async_sidecar(client), SET).aget()

    with pytest.raises(TokenUnavailable) as caught:
        anyio.run(main)
    error = caught.value
    assert (error.status, error.code) == (503, "provider_unavailable")
    assert error.retry_after is not None and 1800 - 60 < error.retry_after <= 3600
    assert str(error).startswith(f"token set {SET!r} has no valid access token now")
    assert f"retry after {error.retry_after:g}s" in str(error)


def test_bad_arguments_are_refused_where_they_are_given(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"url .* or unix_socket"):
        Sidecar(bearer="b" * 20)
    with pytest.raises(ValueError, match="one of them"):
        Sidecar("http://127.0.0.1:9469")
    with pytest.raises(ValueError, match="must not carry a user or password"):
        Sidecar("http://user:pw@127.0.0.1:9469", bearer="b" * 20)
    missing = tmp_path / "missing.bearer"
    with pytest.raises(ValueError, match=f"cannot be read from bearer_file {missing}"):
        Sidecar("http://127.0.0.1:9469", bearer_file=missing)
    empty = tmp_path / "empty.bearer"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Sidecar("http://127.0.0.1:9469", bearer_file=empty)
    with pytest.raises(ValueError, match="token_set"):
        SidecarTokens(Sidecar("http://127.0.0.1:9469", bearer="b" * 20), "")


def test_use_until_takes_the_smaller_of_the_margins() -> None:
    def token(lifetime: float | None) -> AccessToken:
        return AccessToken(SET, "at_x", "Bearer", None, lifetime, fetched_at=100.0)

    kw: dict[str, float] = {"margin": 60, "margin_share": 0.5, "ttl_without_expiry": 30}
    assert use_until(token(3600), **kw) == 100 + 3600 - 60
    assert use_until(token(30), **kw) == 100 + 15  # half of a short lifetime, not nothing
    assert use_until(token(0), **kw) == 100
    assert use_until(token(None), **kw) == 130
    assert "at_x" not in repr(token(1))


# --------------------------------------------------------------------------- imports


def test_the_client_imports_nothing_of_the_daemon_and_requests_only_when_asked() -> None:
    heavy = ["aiohttp", "starlette", "uvicorn", "aiosqlite", "asyncpg", "requests"]
    ours = ["refresherd.store", "refresherd.daemon", "refresherd.config", "refresherd.web"]
    script = (
        "import sys, json\n"
        "import refresherd.client\n"
        f"print(json.dumps([m for m in {heavy + ours!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(proc.stdout) == []
    # Without requests the package works, and asking for its auth says what is missing.
    script = (
        "import sys\n"
        "sys.modules['requests'] = None\n"
        "from refresherd.client import SidecarAuth\n"
        "try:\n"
        "    from refresherd.client import SidecarRequestsAuth\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "SidecarRequestsAuth needs requests (pip install requests)" in proc.stdout


# --------------------------------------------------------------------------- the README


def readme_shell_client(setup: Setup, token_set: str) -> str:
    """README's shell client ("Any other language: the contract"), pointed at this setup."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("In shell, with curl and jq:\n\n```sh\n", 1)[1]
    script = section.split("```", 1)[0]
    for documented, here in (
        ("/etc/refresherd/api.bearer", str(setup.bearer_file)),
        ("/run/refresherd/api.sock", str(setup.socket)),
        ("https://api.example.com/invoices", setup.upstream.url),
        ("customer-42", token_set),
    ):
        assert documented in script
        script = script.replace(documented, here)
    return script + 'printf "%s %s %s\\n" "$status" "$asked" "$use_until"\n'


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="the README's example needs curl, jq"
)
def test_the_readmes_shell_client_follows_the_contract(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()

    def run(token_set: str = SET) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", readme_shell_client(setup, token_set)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=setup.tmp_path,
        )

    proc = run()
    assert proc.returncode == 0, proc.stderr
    status, asked, use_until_ = proc.stdout.split()
    assert status == "200" and setup.upstream.seen == [setup.stored_access_token()]
    assert 3600 - 60 - 5 <= int(use_until_) - int(asked) <= 3600 - 60
    # Refused: a forced refresh, and the request sent once more with the new token.
    setup.upstream.refuse_all = True
    refreshes = setup.handle.ledger.refreshes
    del setup.upstream.seen[:]
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "401" and len(setup.upstream.seen) == 2
    assert setup.upstream.seen[1] == setup.stored_access_token() != setup.upstream.seen[0]
    assert setup.handle.ledger.refreshes == refreshes + 1
    # Refused again at once: refreshed moments ago, nothing newer (429): not re-sent.
    del setup.upstream.seen[:]
    proc = run()
    assert proc.stdout.split()[0] == "401" and len(setup.upstream.seen) == 1
    assert setup.handle.ledger.refreshes == refreshes + 1
    proc = run("nobody")
    assert proc.returncode == 1 and proc.stderr.startswith("unknown_token_set: no token set")
    assert_shows_no_secret(proc.stdout + proc.stderr, setup, "the README's shell client")
