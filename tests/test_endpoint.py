"""TokenEndpoint against real loopback servers: the FakeIdP for protocol behaviour, and a raw TCP
server of our own for the bad answers a real IdP, proxy or load balancer can give.

Every error is checked twice: its class (DESIGN.md's failure table: could the IdP have consumed
the refresh token?) and its message (it names what was wrong, and holds no token or secret).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from functools import partial
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refresherd.idp.endpoint import MAX_RETRY_AFTER, TokenEndpoint, parse_retry_after
from refresherd.idp.failures import (
    Ambiguous,
    ClientRejected,
    EndpointError,
    InvalidGrant,
    NotSent,
    OAuthError,
    RateLimited,
)
from refresherd.idp.token_response import parse_grant
from refresherd.idp.transport import MAX_BODY_BYTES
from refresherd.model import AuthMethod, FailureKind, Grant, Secret
from refresherd.settings import ProviderConfig
from refresherd.testing import FakeIdP, FaultKind

CLIENT_ID = "refresherd"
CLIENT_SECRET = "cs_endpoint-test-secret-4f1c9a"
# What the raw server is sent, and the token values its canned answers carry.
PRESENTED = "rt_presented-0123456789abcdefghijklmnop"
BODY_ACCESS = "at_body-access-9a8b7c6d5e4f3g2h1i0j"
BODY_REFRESH = "rt_body-refresh-zyxwvutsrqponmlkji"
SECRETS = (CLIENT_SECRET, PRESENTED, BODY_ACCESS, BODY_REFRESH)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- helpers


def provider_for(
    token_url: str,
    *,
    auth_method: AuthMethod = AuthMethod.CLIENT_SECRET_POST,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    timeout: float = 3.0,
    scope: str | None = None,
) -> ProviderConfig:
    return ProviderConfig(
        name="test",
        token_url=token_url,
        client_id=client_id,
        client_secret=Secret(client_secret),
        auth_method=auth_method,
        request_timeout=timeout,
        connect_timeout=min(timeout, 2.0),
        scope=scope,
    )


@asynccontextmanager
async def endpoint_for(provider: ProviderConfig) -> AsyncIterator[TokenEndpoint]:
    endpoint = TokenEndpoint(provider)
    try:
        yield endpoint
    finally:
        await endpoint.aclose()


@asynccontextmanager
async def serving_idp(**kwargs: Any) -> AsyncIterator[FakeIdP]:
    kwargs.setdefault("clients", {CLIENT_ID: CLIENT_SECRET})
    async with anyio.create_task_group() as tg:
        idp: FakeIdP = await tg.start(FakeIdP(**kwargs).serve)
        try:
            yield idp
        finally:
            tg.cancel_scope.cancel()


def assert_no_secret(exc: BaseException, *values: str) -> None:
    """No secret in the message, the repr, the Failure, or a rendered traceback."""
    rendered = [
        str(exc),
        repr(exc),
        repr(exc.args),
        "".join(traceback.format_exception(exc)),
    ]
    if isinstance(exc, EndpointError):
        rendered += [repr(exc.failure), exc.failure.detail, exc.failure.reason]
    for text in rendered:
        for value in (*SECRETS, *values):
            assert value not in text, f"a secret leaked into {text[:120]!r}"


async def refresh_error(
    endpoint: TokenEndpoint, token: str, *, timeout: float | None = None
) -> EndpointError:
    with pytest.raises(EndpointError) as info:
        # Every test here ends well inside this bound; it only keeps a hang from hanging CI.
        with anyio.fail_after(60):
            await endpoint.refresh(
                Secret(token), timeout=timeout or endpoint.provider.request_timeout
            )
    exc = info.value
    assert exc.failure.kind is type(exc).kind
    assert_no_secret(exc, token)
    return exc


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the raw server


@dataclass
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(
            self.body.decode("ascii"), keep_blank_values=True, strict_parsing=True
        )


Responder = Callable[[anyio.abc.SocketStream, RawRequest], Awaitable[None]]


@dataclass
class RawServer:
    url: str
    requests: list[RawRequest] = field(default_factory=list)


async def _read_request(stream: anyio.abc.SocketStream) -> RawRequest:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive(65536)
    head, _, body = buffer.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        body += await stream.receive(65536)
    return RawRequest(method, target, headers, body)


@asynccontextmanager
async def raw_server(respond: Responder) -> AsyncIterator[RawServer]:
    """A loopback HTTP 'server' that reads one request per connection and lets ``respond``
    write whatever bytes it likes, then closes."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server = RawServer(url=f"http://127.0.0.1:{port}/connect/token")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                request = await _read_request(stream)
                server.requests.append(request)
                await respond(stream, request)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass  # the client hung up, as it should on a bad answer

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def http_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    reason: str = "Whatever",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if not any(h.lower() == "content-length" for h in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def canned(data: bytes) -> Responder:
    async def respond(stream: anyio.abc.SocketStream, request: RawRequest) -> None:
        await stream.send(data)

    return respond


def grant_json(**overrides: object) -> bytes:
    payload: dict[str, object] = {
        "access_token": BODY_ACCESS,
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": BODY_REFRESH,
        "scope": "openid offline_access",
    }
    payload.update(overrides)
    return json.dumps({k: v for k, v in payload.items() if v is not ...}).encode()


async def raw_refresh_error(
    respond: Responder, *, timeout: float = 3.0
) -> tuple[EndpointError, RawServer]:
    async with raw_server(respond) as server, endpoint_for(provider_for(server.url)) as ep:
        exc = await refresh_error(ep, PRESENTED, timeout=timeout)
    return exc, server


async def raw_refresh(respond: Responder) -> Grant:
    async with raw_server(respond) as server, endpoint_for(provider_for(server.url)) as ep:
        return await ep.refresh(Secret(PRESENTED), timeout=3.0)


# --------------------------------------------------------------------------- the request itself


@pytest.mark.anyio
async def test_client_secret_post_sends_a_form_with_credentials_in_the_body_only() -> None:
    async with raw_server(canned(http_response(200, grant_json()))) as server:
        provider = provider_for(server.url, scope="openid offline_access")
        async with endpoint_for(provider) as ep:
            await ep.refresh(Secret(PRESENTED), timeout=3.0)
    [request] = server.requests
    assert request.method == "POST"
    assert request.target == "/connect/token"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    assert "authorization" not in request.headers
    assert request.form() == {
        "grant_type": ["refresh_token"],
        "refresh_token": [PRESENTED],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
        "scope": ["openid offline_access"],
    }


@pytest.mark.anyio
@pytest.mark.parametrize("scope", [None, "openid offline_access api:read/write"])
async def test_a_refresh_body_is_the_form_urlencoded_as_a_whole(scope: str | None) -> None:
    """The refresh body is put together from a part encoded once per endpoint and the token
    encoded per request: byte for byte what encoding the whole form gives, odd characters too."""
    token = "r+t/k=n &%é~" + PRESENTED
    async with raw_server(canned(http_response(200, grant_json()))) as server:
        provider = provider_for(server.url, scope=scope)
        async with endpoint_for(provider) as ep:
            await ep.refresh(Secret(token), timeout=3.0)
            await ep.refresh(Secret(PRESENTED), timeout=3.0)
    form = {"grant_type": "refresh_token", "refresh_token": token}
    if scope:
        form["scope"] = scope
    form |= {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    first, second = server.requests
    assert first.body == urllib.parse.urlencode(form).encode("ascii")
    assert second.form()["refresh_token"] == [PRESENTED]


@pytest.mark.anyio
async def test_client_secret_basic_sends_the_credentials_in_the_header_only() -> None:
    client_id, secret = "my client/1", "p@ss:w/rd+ é&="
    async with raw_server(canned(http_response(200, grant_json()))) as server:
        provider = provider_for(
            server.url,
            auth_method=AuthMethod.CLIENT_SECRET_BASIC,
            client_id=client_id,
            client_secret=secret,
        )
        async with endpoint_for(provider) as ep:
            await ep.refresh(Secret(PRESENTED), timeout=3.0)
    [request] = server.requests
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    # The body carries no client credential at all: exactly one style per request.
    assert request.form() == {"grant_type": ["refresh_token"], "refresh_token": [PRESENTED]}
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    raw_id, _, raw_secret = base64.b64decode(encoded).decode().partition(":")
    # RFC 6749 2.3.1: each half form-urlencoded before base64.
    assert raw_id == urllib.parse.quote_plus(client_id)
    assert raw_secret == urllib.parse.quote_plus(secret)


@pytest.mark.anyio
@pytest.mark.parametrize("auth_method", list(AuthMethod))
async def test_each_auth_style_is_accepted_by_the_fake_idp(auth_method: AuthMethod) -> None:
    # The FakeIdP refuses a request that mixes both styles, so success proves one style was used;
    # the odd characters prove the Basic encoding round-trips.
    client_id, secret = "odd client:1", "s3cr+t/ é:&%"
    async with serving_idp(clients={client_id: secret}) as idp:
        old = str(idp.issue("alice", client_id=client_id)["refresh_token"])
        provider = provider_for(
            idp.token_url, auth_method=auth_method, client_id=client_id, client_secret=secret
        )
        async with endpoint_for(provider) as ep:
            grant = await ep.refresh(Secret(old), timeout=3.0)
        assert grant.refresh_token is not None
        new = grant.refresh_token.reveal()
        assert new != old and idp.ledger.is_live(new)
        assert grant.access_token.reveal() in idp.ledger.issued_tokens()
        assert grant.token_type == "Bearer"
        assert grant.expires_in == 3600.0
        assert grant.scope == "openid offline_access"
        assert idp.ledger.invalid_clients == 0
        assert idp.ledger.requests == 1


@pytest.mark.anyio
async def test_fallback_to_the_other_auth_style_never_happens() -> None:
    # Basic is pinned; the IdP wants the secret in the body and answers invalid_client. A client
    # that retried with the other style would replay a possibly consumed token: one request only.
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(FaultKind.INVALID_CLIENT)
        provider = provider_for(idp.token_url, auth_method=AuthMethod.CLIENT_SECRET_BASIC)
        async with endpoint_for(provider) as ep:
            exc = await refresh_error(ep, old)
        assert isinstance(exc, ClientRejected)
        assert idp.ledger.requests == 1


# --------------------------------------------------------------------------- the FakeIdP's answers


@pytest.mark.anyio
async def test_reuse_idp_that_omits_refresh_token_gives_none() -> None:
    async with serving_idp(usage="reuse", reuse_returns_refresh_token=False) as idp:
        old = str(idp.issue("alice")["refresh_token"])
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            grant = await ep.refresh(Secret(old), timeout=3.0)
        assert grant.refresh_token is None  # keep the old one
        assert idp.ledger.is_live(old)


@pytest.mark.anyio
async def test_revoked_token_is_invalid_grant() -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.revoke(old)
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old)
    assert isinstance(exc, InvalidGrant)
    assert exc.failure.kind is FailureKind.INVALID_GRANT
    assert exc.failure.reason == "invalid_grant"
    assert exc.failure.status == 400
    assert "invalid_grant" in str(exc) and "revoked" in str(exc)


@pytest.mark.anyio
@pytest.mark.parametrize("token", ["grant", "invalid", "invalid_grant"])
async def test_invalid_grant_is_classified_before_a_token_inside_the_code_is_redacted(
    token: str,
) -> None:
    """A refresh token that is part of the error code (a short or test token) is redacted from
    the message only: the classification reads the code as the IdP sent it, so a revoked token
    is invalidated rather than retried as an oauth_error for ever."""
    async with serving_idp() as idp, endpoint_for(provider_for(idp.token_url)) as ep:
        with pytest.raises(EndpointError) as info:
            with anyio.fail_after(60):
                await ep.refresh(Secret(token), timeout=3.0)
        assert idp.ledger.invalid_grants == 1
    exc = info.value
    assert isinstance(exc, InvalidGrant)
    assert exc.failure.kind is FailureKind.INVALID_GRANT
    assert exc.failure.reason == "invalid_grant"  # the fixed vocabulary, not the IdP's text
    assert token not in str(exc) and token not in exc.failure.detail
    assert "[redacted]" in str(exc)


@pytest.mark.anyio
@pytest.mark.parametrize("token", ["client", "invalid"])
async def test_invalid_client_is_classified_before_a_token_inside_the_code_is_redacted(
    token: str,
) -> None:
    async with serving_idp() as idp:
        idp.set_client_secret(CLIENT_ID, "cs_rotated-at-the-idp")
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            with pytest.raises(EndpointError) as info:
                with anyio.fail_after(60):
                    await ep.refresh(Secret(token), timeout=3.0)
        assert idp.ledger.invalid_clients == 1
    exc = info.value
    assert isinstance(exc, ClientRejected)
    assert exc.failure.reason == "invalid_client"
    assert token not in str(exc) and token not in exc.failure.detail


@pytest.mark.anyio
async def test_wrong_client_secret_is_client_rejected() -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.set_client_secret(CLIENT_ID, "cs_rotated-at-the-idp")
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old, timeout=3.0)
        assert idp.ledger.invalid_clients == 1
        assert idp.ledger.is_live(old) and idp.ledger.refreshes == 0
    assert isinstance(exc, ClientRejected)
    assert exc.failure.reason == "invalid_client"
    assert exc.failure.status == 401
    assert "invalid_client" in str(exc)
    assert_no_secret(exc, "cs_rotated-at-the-idp")


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_rate_limited_with_the_delay(status: int) -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(FaultKind.RETRY_AFTER, status=status, retry_after=7)
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old)
        assert idp.ledger.refreshes == 0 and idp.ledger.is_live(old)
    assert isinstance(exc, RateLimited)
    assert exc.failure.kind is FailureKind.RATE_LIMITED
    assert exc.failure.retry_after == 7.0
    assert exc.failure.status == status
    assert str(status) in str(exc)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [FaultKind.SERVER_ERROR, FaultKind.ERROR_AFTER_ROTATE])
async def test_http_500_is_ambiguous_server_error(kind: FaultKind) -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(kind)
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old)
        # ERROR_AFTER_ROTATE really did consume the token: that is why a 500 is ambiguous.
        assert idp.ledger.refreshes == (1 if kind is FaultKind.ERROR_AFTER_ROTATE else 0)
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "server_error"
    assert exc.failure.status == 500
    assert "500" in str(exc)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [FaultKind.DROP_AFTER_ROTATE, FaultKind.RESET])
async def test_lost_connection_after_sending_is_ambiguous(kind: FaultKind) -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(kind)
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old)
        assert idp.ledger.requests == 1
    assert isinstance(exc, Ambiguous)
    assert exc.failure.kind is FailureKind.AMBIGUOUS
    assert exc.failure.reason == "network_error"
    assert "connection" in str(exc)


@pytest.mark.anyio
async def test_reset_on_a_kept_alive_connection_is_ambiguous_and_not_resent() -> None:
    # The second request reuses the first one's connection; the IdP resets it after reading.
    # aiohttp retries a request on a stale pooled connection for idempotent methods only: a
    # POST must surface as Ambiguous, once, never be sent again or be called NotSent.
    async with serving_idp() as idp:
        token = str(idp.issue("alice")["refresh_token"])
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            grant = await ep.refresh(Secret(token), timeout=3.0)
            assert grant.refresh_token is not None
            idp.faults.add(FaultKind.RESET)
            exc = await refresh_error(ep, grant.refresh_token.reveal())
        assert idp.ledger.connections == 1
        assert idp.ledger.requests == 2
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "network_error"


@pytest.mark.anyio
async def test_waiting_past_the_timeout_for_a_pooled_connection_is_not_sent() -> None:
    # max_connections is the provider's pool: with its one connection busy, the second
    # refresh waits for it, gives up, and has sent nothing.
    async with serving_idp() as idp:
        slow = str(idp.issue("alice")["refresh_token"])
        other = str(idp.issue("bob")["refresh_token"])
        idp.faults.add(FaultKind.SLOW, delay=3.0)
        provider = replace(provider_for(idp.token_url, timeout=5.0), max_connections=1)
        async with endpoint_for(provider) as ep, anyio.create_task_group() as tg:
            tg.start_soon(partial(ep.refresh, Secret(slow), timeout=5.0))
            await anyio.sleep(0.3)  # let the slow one take the only connection
            exc = await refresh_error(ep, other, timeout=0.5)
            assert idp.ledger.requests == 1
    assert isinstance(exc, NotSent)
    assert exc.failure.reason == "connect_error"
    assert idp.ledger.is_live(other)


@pytest.mark.anyio
async def test_concurrent_refreshes_share_at_most_max_connections() -> None:
    async with serving_idp() as idp:
        tokens = [str(idp.issue(f"user{i}")["refresh_token"]) for i in range(6)]
        idp.faults.add(FaultKind.SLOW, delay=0.2, times=6)
        provider = replace(provider_for(idp.token_url), max_connections=2)
        grants: list[Grant] = []

        async def one(token: str) -> None:
            grants.append(await ep.refresh(Secret(token), timeout=3.0))

        async with endpoint_for(provider) as ep, anyio.create_task_group() as tg:
            for token in tokens:
                tg.start_soon(one, token)
        assert len(grants) == 6
        assert idp.ledger.refreshes == 6
        assert idp.ledger.connections == 2


@pytest.mark.anyio
@pytest.mark.parametrize("process_first", [True, False])
async def test_slow_answer_beyond_the_timeout_is_ambiguous_timeout(process_first: bool) -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(FaultKind.SLOW, delay=5.0, process_first=process_first)
        async with endpoint_for(provider_for(idp.token_url, timeout=0.5)) as ep:
            exc = await refresh_error(ep, old, timeout=0.5)
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "timeout"
    assert "0.5s" in str(exc)


@pytest.mark.anyio
async def test_slow_answer_within_the_timeout_is_a_grant() -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(FaultKind.SLOW, delay=0.3)
        async with endpoint_for(provider_for(idp.token_url, timeout=10.0)) as ep:
            grant = await ep.refresh(Secret(old), timeout=10.0)
        assert grant.refresh_token is not None and idp.ledger.is_live(grant.refresh_token.reveal())


@pytest.mark.anyio
async def test_garbage_after_rotate_is_ambiguous_malformed_response() -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        idp.faults.add(FaultKind.GARBAGE_AFTER_ROTATE)
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            exc = await refresh_error(ep, old)
        assert idp.ledger.refreshes == 1
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert exc.failure.status == 200
    assert "JSON" in str(exc)


@pytest.mark.anyio
async def test_connection_refused_is_not_sent() -> None:
    url = f"http://127.0.0.1:{closed_port()}/connect/token"
    async with endpoint_for(provider_for(url)) as ep:
        exc = await refresh_error(ep, PRESENTED)
    assert isinstance(exc, NotSent)
    assert exc.failure.kind is FailureKind.NOT_SENT
    assert exc.failure.reason == "connect_error"
    assert exc.failure.status is None
    assert "connect" in str(exc)


@pytest.mark.anyio
async def test_unsupported_scheme_is_not_sent() -> None:
    async with endpoint_for(provider_for("ftp://127.0.0.1/connect/token")) as ep:
        exc = await refresh_error(ep, PRESENTED)
    assert isinstance(exc, NotSent)
    assert "protocol" in str(exc)


@pytest.mark.anyio
async def test_endpoint_keeps_working_across_requests_on_one_pool() -> None:
    # Keep-alive: a second refresh on the same endpoint (and connection pool) works too.
    async with serving_idp() as idp:
        token = str(idp.issue("alice")["refresh_token"])
        async with endpoint_for(provider_for(idp.token_url)) as ep:
            for _ in range(3):
                grant = await ep.refresh(Secret(token), timeout=3.0)
                assert grant.refresh_token is not None
                token = grant.refresh_token.reveal()
        assert idp.ledger.is_live(token)
        assert idp.ledger.refreshes == 3


# --------------------------------------------------------------------------- bad answers (raw)


@pytest.mark.anyio
async def test_html_200_is_ambiguous_malformed() -> None:
    html = b"<!DOCTYPE html><html><body>Gateway says hi</body></html>"
    exc, _ = await raw_refresh_error(canned(http_response(200, html, content_type="text/html")))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert "not valid JSON" in str(exc)
    assert "Gateway" not in str(exc)  # the body is never quoted


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"ok", "not valid JSON"),
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'"' + BODY_ACCESS.encode() + b'"', "not an object"),
        (b"null", "not an object"),
    ],
)
async def test_non_json_or_non_object_2xx_is_ambiguous_and_says_so(body: bytes, named: str) -> None:
    exc, _ = await raw_refresh_error(canned(http_response(200, body, content_type="text/plain")))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert named in str(exc)


@pytest.mark.anyio
async def test_2xx_without_access_token_is_ambiguous_and_names_the_field() -> None:
    exc, _ = await raw_refresh_error(canned(http_response(200, grant_json(access_token=...))))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert "access_token is required" in str(exc)


@pytest.mark.anyio
async def test_negative_expires_in_is_ambiguous_and_names_the_field() -> None:
    exc, _ = await raw_refresh_error(canned(http_response(200, grant_json(expires_in=-60))))
    assert isinstance(exc, Ambiguous)
    assert "expires_in must not be negative" in str(exc)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"access_token": 12345}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": [BODY_ACCESS]}, "access_token"),
        ({"token_type": ["Bearer"]}, "token_type"),
        ({"expires_in": "soon"}, "expires_in must be a number"),
        ({"expires_in": True}, "expires_in must be a number"),
        ({"expires_in": {"seconds": 1}}, "expires_in must be a number"),
        ({"expires_in": 10**400}, "expires_in"),
        ({"refresh_token": 42}, "refresh_token"),
        ({"refresh_token": ""}, "refresh_token"),
        ({"refresh_token": {"value": BODY_REFRESH}}, "refresh_token"),
        ({"scope": ["openid"]}, "scope"),
        ({"id_token": 7}, "id_token"),
    ],
)
async def test_wrong_types_are_ambiguous_and_name_the_field(
    overrides: dict[str, object], named: str
) -> None:
    exc, _ = await raw_refresh_error(canned(http_response(200, grant_json(**overrides))))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert named in str(exc)
    assert str(exc).startswith("HTTP 200: ")


@pytest.mark.anyio
async def test_duplicate_keys_are_ambiguous_and_named() -> None:
    # Which access token would be the real one? Neither: refuse the answer.
    body = (
        b'{"access_token": "at_first-of-two-xxxxxxxx", "access_token": "'
        + BODY_ACCESS.encode()
        + b'", "token_type": "Bearer", "expires_in": 3600}'
    )
    exc, _ = await raw_refresh_error(canned(http_response(200, body)))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert "'access_token' more than once" in str(exc)
    assert_no_secret(exc, "at_first-of-two-xxxxxxxx")


@pytest.mark.anyio
async def test_lone_surrogate_in_a_token_is_refused_before_it_reaches_storage() -> None:
    # JSON can spell a lone surrogate; SQLite (and the next form) could not encode it.
    body = b'{"access_token": "at_\\ud800x", "token_type": "Bearer", "expires_in": 60}'
    exc, _ = await raw_refresh_error(canned(http_response(200, body)))
    assert isinstance(exc, Ambiguous)
    assert "access_token must be valid Unicode text" in str(exc)


@pytest.mark.anyio
async def test_json_without_content_type_is_still_parsed() -> None:
    grant = await raw_refresh(canned(http_response(200, grant_json(), content_type=None)))
    assert grant.access_token.reveal() == BODY_ACCESS
    assert grant.refresh_token is not None and grant.refresh_token.reveal() == BODY_REFRESH
    assert grant.expires_in == 3600.0


@pytest.mark.anyio
async def test_201_with_a_grant_is_a_grant_and_defaults_apply() -> None:
    body = json.dumps({"access_token": BODY_ACCESS}).encode()
    grant = await raw_refresh(canned(http_response(201, body)))
    assert grant.access_token.reveal() == BODY_ACCESS
    assert grant.token_type == "Bearer"
    assert grant.expires_in is None
    assert grant.refresh_token is None


@pytest.mark.anyio
async def test_body_at_the_limit_is_read() -> None:
    prefix, suffix = grant_json()[:-1] + b', "padding": "', b'"}'
    padded = prefix + b"x" * (MAX_BODY_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(padded) == MAX_BODY_BYTES
    grant = await raw_refresh(canned(http_response(200, padded)))
    assert grant.access_token.reveal() == BODY_ACCESS


@pytest.mark.anyio
async def test_body_over_the_limit_by_content_length_is_ambiguous() -> None:
    async def respond(stream: anyio.abc.SocketStream, request: RawRequest) -> None:
        size = MAX_BODY_BYTES * 4
        head = http_response(200, b"", headers={"Content-Length": str(size)})
        await stream.send(head)
        chunk = b" " * 65536
        for _ in range(size // len(chunk)):  # until the client hangs up
            await stream.send(chunk)

    exc, _ = await raw_refresh_error(respond)
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert f"over {MAX_BODY_BYTES} bytes" in str(exc)


@pytest.mark.anyio
async def test_body_over_the_limit_chunked_is_ambiguous() -> None:
    async def respond(stream: anyio.abc.SocketStream, request: RawRequest) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await stream.send(head)
        chunk = b"[" * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while True:  # endless: only the client's limit ends this
            await stream.send(frame)

    exc, _ = await raw_refresh_error(respond)
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert f"over {MAX_BODY_BYTES} bytes" in str(exc)


@pytest.mark.anyio
async def test_truncated_json_in_a_complete_response_is_ambiguous_malformed() -> None:
    body = grant_json()[:40]
    exc, _ = await raw_refresh_error(canned(http_response(200, body)))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert "not valid JSON" in str(exc)


@pytest.mark.anyio
async def test_connection_closed_mid_body_is_ambiguous() -> None:
    body = grant_json()
    head = http_response(200, b"", headers={"Content-Length": str(len(body))})
    exc, _ = await raw_refresh_error(canned(head + body[: len(body) // 2]))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "network_error"


@pytest.mark.anyio
async def test_connection_closed_before_any_answer_is_ambiguous() -> None:
    exc, server = await raw_refresh_error(canned(b""))
    assert isinstance(exc, Ambiguous)
    assert len(server.requests) == 1  # it was sent: the IdP may have acted on it


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["body", "headers"])
async def test_server_trickling_bytes_forever_is_bounded_by_the_timeout(where: str) -> None:
    # Each byte arrives well inside the read timeout, so only an overall bound can end this.
    async def respond(stream: anyio.abc.SocketStream, request: RawRequest) -> None:
        if where == "body":
            await stream.send(http_response(200, b"", headers={"Content-Length": "500000"}))
        else:
            await stream.send(b"HTTP/1.1 200 OK\r\n")
        while True:
            await stream.send(b"{" if where == "body" else b"X-Slow: 1\r\n")
            await anyio.sleep(0.1)

    started = time.monotonic()
    exc, _ = await raw_refresh_error(respond, timeout=1.0)
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "timeout"
    assert time.monotonic() - started < 50  # ended by the endpoint, not by the test's guard


@pytest.mark.anyio
async def test_redirect_is_not_followed() -> None:
    async with serving_idp() as idp:
        old = str(idp.issue("alice")["refresh_token"])
        redirect = http_response(302, b"", headers={"Location": idp.token_url}, reason="Found")
        async with (
            raw_server(canned(redirect)) as server,
            endpoint_for(provider_for(server.url)) as ep,
        ):
            exc = await refresh_error(ep, old)
        assert len(server.requests) == 1
        assert idp.ledger.requests == 0  # the form never went to the redirect target
    assert isinstance(exc, OAuthError)
    assert exc.failure.kind is FailureKind.OAUTH_ERROR
    assert exc.failure.reason == "http_error"
    assert exc.failure.status == 302
    assert "redirect not followed" in str(exc)


@pytest.mark.anyio
async def test_redirect_with_an_oauth_error_body_is_still_only_a_redirect() -> None:
    body = json.dumps({"error": "invalid_grant"}).encode()
    exc, _ = await raw_refresh_error(
        canned(http_response(307, body, headers={"Location": "https://example.invalid/"}))
    )
    assert isinstance(exc, OAuthError)
    assert not isinstance(exc, InvalidGrant)  # never invalidate a token set on a redirect


@pytest.mark.anyio
async def test_bare_401_is_client_rejected() -> None:
    exc, _ = await raw_refresh_error(canned(http_response(401, b"", content_type=None)))
    assert isinstance(exc, ClientRejected)
    assert exc.failure.reason == "invalid_client"
    assert exc.failure.status == 401
    assert "401" in str(exc)


@pytest.mark.anyio
async def test_unauthorized_client_is_client_rejected() -> None:
    body = json.dumps({"error": "unauthorized_client", "error_description": "nope"}).encode()
    exc, _ = await raw_refresh_error(canned(http_response(400, body)))
    assert isinstance(exc, ClientRejected)
    assert exc.failure.reason == "unauthorized_client"
    assert "unauthorized_client" in str(exc) and "nope" in str(exc)


@pytest.mark.anyio
async def test_other_oauth_error_is_oauth_error_with_code_and_description() -> None:
    body = json.dumps({"error": "invalid_scope", "error_description": "too\nmuch\x00"}).encode()
    exc, _ = await raw_refresh_error(canned(http_response(400, body)))
    assert type(exc) is OAuthError
    assert exc.failure.reason == "oauth_error"
    assert exc.failure.status == 400
    assert "error=invalid_scope" in str(exc)
    assert "too?much?" in str(exc)  # printable only: no log-line injection


@pytest.mark.anyio
async def test_4xx_without_oauth_error_is_http_error() -> None:
    exc, _ = await raw_refresh_error(
        canned(http_response(403, b"<html>Forbidden</html>", content_type="text/html"))
    )
    assert type(exc) is OAuthError
    assert exc.failure.reason == "http_error"
    assert str(exc) == "HTTP 403"


@pytest.mark.anyio
async def test_idp_echoing_the_presented_token_in_its_error_does_not_leak_it() -> None:
    body = json.dumps(
        {
            "error": "invalid_grant",
            "error_description": f"refresh token {PRESENTED} is unknown to client {CLIENT_SECRET}",
        }
    ).encode()
    exc, _ = await raw_refresh_error(canned(http_response(400, body)))
    assert isinstance(exc, InvalidGrant)
    assert "[redacted]" in str(exc)  # assert_no_secret (in raw_refresh_error) did the rest


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 504])
async def test_other_5xx_are_ambiguous(status: int) -> None:
    exc, _ = await raw_refresh_error(canned(http_response(status, b"", content_type=None)))
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "server_error"
    assert exc.failure.status == status


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
async def test_429_and_503_without_retry_after_are_not_processed(status: int) -> None:
    exc, _ = await raw_refresh_error(canned(http_response(status, b"", content_type=None)))
    assert isinstance(exc, RateLimited)
    assert exc.failure.retry_after is None


@pytest.mark.anyio
async def test_retry_after_as_http_date() -> None:
    when = formatdate(time.time() + 600, usegmt=True)
    exc, _ = await raw_refresh_error(
        canned(http_response(503, b"", content_type=None, headers={"Retry-After": when}))
    )
    assert isinstance(exc, RateLimited)
    assert exc.failure.retry_after is not None
    assert 300 < exc.failure.retry_after <= 601


@pytest.mark.anyio
async def test_non_ascii_digit_in_retry_after_is_ignored_not_a_crash() -> None:
    # "\xb2" (superscript two) is a digit to str.isdigit() but not to float().
    head = b"HTTP/1.1 429 Too Many\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n"
    exc, _ = await raw_refresh_error(canned(head))
    assert isinstance(exc, RateLimited)
    assert exc.failure.retry_after is None


# --------------------------------------------------------------------------- parse_grant


def test_parse_grant_minimal_and_full() -> None:
    minimal = parse_grant(b'{"access_token": "a"}')
    assert minimal == Grant(access_token=Secret("a"), token_type="Bearer", expires_in=None)
    full = parse_grant(
        json.dumps(
            {
                "access_token": BODY_ACCESS,
                "token_type": "DPoP",
                "expires_in": "3600",
                "refresh_token": BODY_REFRESH,
                "scope": "a b",
                "id_token": "eyJ.x.y",
                "extra": {"ignored": True},
            }
        ).encode()
    )
    assert full.expires_in == 3600.0
    assert full.refresh_token == Secret(BODY_REFRESH)
    assert full.id_token == Secret("eyJ.x.y")
    assert full.scope == "a b" and full.token_type == "DPoP"
    for text in (repr(full), str(full)):
        assert BODY_ACCESS not in text and BODY_REFRESH not in text and "eyJ" not in text


def test_parse_grant_null_refresh_token_means_keep_the_old_one() -> None:
    grant = parse_grant(b'{"access_token": "a", "refresh_token": null}')
    assert grant.refresh_token is None


@pytest.mark.parametrize("value", [0, 1, 59.5, "60", " 60 ", 10 * 365 * 86400])
def test_parse_grant_accepts_expires_in(value: object) -> None:
    body = json.dumps({"access_token": "a", "expires_in": value}).encode()
    assert parse_grant(body).expires_in == float(str(value).strip())


@pytest.mark.parametrize(
    "raw",
    [
        "-1",
        "1e999",
        "NaN",
        "Infinity",
        "-Infinity",
        '"nan"',
        '"inf"',
        "true",
        "1" * 400,
        "315360001",
    ],
)
def test_parse_grant_refuses_expires_in(raw: str) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        parse_grant(b'{"access_token": "a", "expires_in": ' + raw.encode() + b"}")


def test_parse_grant_errors_never_quote_the_body() -> None:
    bodies = [
        b'{"access_token": 1, "refresh_token": "' + BODY_REFRESH.encode() + b'"}',
        b'{"refresh_token": "' + BODY_REFRESH.encode() + b'", "access_token": "',
        BODY_ACCESS.encode(),
        b'{"' + BODY_ACCESS.encode() + b'": 1, "' + BODY_ACCESS.encode() + b'": 2}',
    ]
    for body in bodies:
        with pytest.raises(ValueError) as info:
            parse_grant(body)
        assert_no_secret(info.value)


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_field_names = st.sampled_from(
    ["access_token", "token_type", "expires_in", "refresh_token", "scope", "id_token", "x"]
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff")
@example(b"[" * 100_000)
@example(b'{"access_token": "a", "expires_in": ' + b"9" * 5000 + b"}")
@example(b'{"access_token": "a", "expires_in": 1' + b"0" * 400 + b"}")
@example(b'{"access_token": "\\udfff"}')
def test_parse_grant_on_arbitrary_bytes_raises_only_value_error(body: bytes) -> None:
    try:
        grant = parse_grant(body)
    except ValueError:
        return
    assert grant.access_token.reveal()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.dictionaries(_field_names, _json_values, min_size=1))
def test_parse_grant_on_arbitrary_json_objects_raises_only_value_error(
    data: dict[str, Any],
) -> None:
    body = json.dumps(data).encode()
    try:
        grant = parse_grant(body)
    except ValueError:
        return
    # Whatever got through is exactly what was sent and usable downstream.
    assert grant.access_token.reveal() == data["access_token"]
    assert grant.access_token.reveal().encode("utf-8")
    if grant.expires_in is not None:
        assert 0 <= grant.expires_in <= 10 * 365 * 86400
    if grant.refresh_token is not None:
        assert grant.refresh_token.reveal() == data["refresh_token"]


# --------------------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("99999999999999999999999", MAX_RETRY_AFTER),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        ("\xb2", None),  # superscript two: isdigit() but not a number
        ("\u0661\u0662", None),  # Arabic-Indic digits: not RFC 9110 delay-seconds
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: now
        ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0),
        ("Mon, 01 Jan 0001 00:00:00 GMT", 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_future_http_date() -> None:
    delay = parse_retry_after(formatdate(time.time() + 120, usegmt=True))
    assert delay is not None and 30 < delay <= 121


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_parse_retry_after_never_raises_and_stays_bounded(value: str) -> None:
    delay = parse_retry_after(value)
    assert delay is None or 0.0 <= delay <= MAX_RETRY_AFTER


@pytest.mark.anyio
async def test_undecodable_content_encoding_is_ambiguous_malformed() -> None:
    body = b"this is not gzip at all"
    exc, _ = await raw_refresh_error(
        canned(http_response(200, body, headers={"Content-Encoding": "gzip"}))
    )
    assert isinstance(exc, Ambiguous)
    assert exc.failure.reason == "malformed_response"
    assert "Content-Encoding" in str(exc)


# ------------------------------------------------------------- code exchange, revocation

REDIRECT = "https://app.example/callback"


@pytest.mark.anyio
@pytest.mark.parametrize("auth_method", list(AuthMethod))
async def test_exchange_code_returns_the_grant_and_is_one_time(auth_method: AuthMethod) -> None:
    async with serving_idp() as idp:
        verifier = "verifier-" + "v" * 40
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        code = idp.authorize("u1", redirect_uri=REDIRECT, code_challenge=challenge)
        async with endpoint_for(provider_for(idp.token_url, auth_method=auth_method)) as endpoint:
            grant = await endpoint.exchange_code(
                Secret(code), redirect_uri=REDIRECT, code_verifier=Secret(verifier), timeout=5
            )
            assert grant.refresh_token is not None
            assert idp.ledger.is_live(grant.refresh_token.reveal())
            with pytest.raises(InvalidGrant) as info:
                await endpoint.exchange_code(
                    Secret(code), redirect_uri=REDIRECT, code_verifier=Secret(verifier), timeout=5
                )
            assert_no_secret(info.value, code, verifier)


@pytest.mark.anyio
async def test_exchange_code_failures_are_typed() -> None:
    async with serving_idp() as idp:
        code = idp.authorize(redirect_uri=REDIRECT)
        wrong = provider_for(idp.token_url, client_secret="not-the-secret")
        async with endpoint_for(wrong) as endpoint:
            with pytest.raises(ClientRejected) as rejected:
                await endpoint.exchange_code(
                    Secret(code), redirect_uri=REDIRECT, code_verifier=None, timeout=5
                )
            assert_no_secret(rejected.value, code, "not-the-secret")
        idp.faults.add(FaultKind.SERVER_ERROR)
        async with endpoint_for(provider_for(idp.token_url)) as endpoint:
            with pytest.raises(Ambiguous):
                await endpoint.exchange_code(
                    Secret(code), redirect_uri=REDIRECT, code_verifier=None, timeout=5
                )
    async with endpoint_for(provider_for(f"http://127.0.0.1:{closed_port()}/t")) as endpoint:
        with pytest.raises(NotSent):
            await endpoint.exchange_code(
                Secret("c"), redirect_uri=REDIRECT, code_verifier=None, timeout=5
            )


@pytest.mark.anyio
async def test_revoke_kills_the_refresh_token_at_the_idp() -> None:
    async with serving_idp() as idp:
        token = str(idp.issue()["refresh_token"])
        provider = replace(provider_for(idp.token_url), revocation_url=idp.revocation_url)
        async with endpoint_for(provider) as endpoint:
            await endpoint.revoke(Secret(token), timeout=5)
            assert not idp.ledger.is_live(token)
            assert idp.ledger.revocations == 1
        wrong = replace(provider, client_secret=Secret("nope"))
        async with endpoint_for(wrong) as endpoint:
            with pytest.raises(ClientRejected) as info:
                await endpoint.revoke(Secret(token), timeout=5)
            assert_no_secret(info.value, token, "nope")
        async with endpoint_for(provider_for(idp.token_url)) as endpoint:
            with pytest.raises(ValueError, match="no revocation_url"):
                await endpoint.revoke(Secret(token), timeout=5)
