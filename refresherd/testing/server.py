"""A fake OAuth 2.0 identity provider that speaks real HTTP/1.1 on loopback.

It behaves like the token endpoints of Visma Connect, IdentityServer and Keycloak (one-time
tokens with a grace period answered with a sibling or the same pair, reuse detection that
revokes a family or a user, re-use tokens, absolute and sliding lifetimes, a per-user cap) and
can misbehave on purpose: drop, reset, delay, stall or garble a connection after or instead of
doing the work, or refuse connections for a while. It is built on anyio + h11 rather than an
ASGI server because an ASGI app cannot close a socket without answering or reset it; that is
exactly what fault injection needs.

What it issued and saw is in its :class:`~refresherd.testing.ledger.Ledger`
(``FakeIdP.ledger``); what it does wrong, in its :class:`~refresherd.testing.faults.FaultPlan`
(``FakeIdP.faults``).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import http
import itertools
import json
import logging
import math
import secrets
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import h11

from refresherd.testing.faults import HUGE_BODY_BYTES, FaultKind, FaultPlan
from refresherd.testing.ledger import (
    Code,
    Family,
    GraceAnswer,
    Ledger,
    Policy,
    ReuseRevokes,
    Usage,
    token_status,
)

logger = logging.getLogger("refresherd.testing")

TOKEN_PATH: Final = "/connect/token"
REVOCATION_PATH: Final = "/connect/revocation"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
MAX_BODY: Final = 64 * 1024
_FORM: Final = "application/x-www-form-urlencoded"
_DEFAULT_CLIENTS: Final[Mapping[str, str]] = {"refresherd": "refresherd-secret"}
_HTML_BODY: Final = (
    b"<!DOCTYPE html>\n<html><head><title>Gateway</title></head>"
    b"<body><h1>Something went wrong</h1><p>Please try again later.</p></body></html>\n"
)


# --------------------------------------------------------------------------- HTTP replies


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def _json_reply(status: int, payload: Mapping[str, object], **headers: str) -> _Reply:
    hdrs = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("Pragma", "no-cache"),
    ]
    hdrs.extend((k.replace("_", "-"), v) for k, v in headers.items())
    return _Reply(status, json.dumps(payload).encode(), hdrs)


def _oauth_error(status: int, error: str, description: str, **headers: str) -> _Reply:
    return _json_reply(status, {"error": error, "error_description": description}, **headers)


def _text_reply(status: int, content_type: str, body: bytes, **headers: str) -> _Reply:
    hdrs = [("Content-Type", content_type)]
    hdrs.extend((k.replace("_", "-"), v) for k, v in headers.items())
    return _Reply(status, body, hdrs)


_SPOILT_REPLIES: Final = frozenset(
    {
        FaultKind.TRUNCATED_AFTER_ROTATE,
        FaultKind.HUGE_AFTER_ROTATE,
        FaultKind.WRONG_TYPES_AFTER_ROTATE,
        FaultKind.DUPLICATE_KEYS_AFTER_ROTATE,
        FaultKind.NO_CONTENT_TYPE,
    }
)


def _spoil(kind: FaultKind, reply: _Reply) -> _Reply:
    """``reply`` (a processed token request) spoilt as ``kind`` says. Only a successful grant
    is spoilt: an error reply goes out as it is."""
    if reply.status != 200:
        return reply
    body = reply.body
    headers = list(reply.headers)
    if kind is FaultKind.TRUNCATED_AFTER_ROTATE:
        body = body[: len(body) // 2]
    elif kind is FaultKind.HUGE_AFTER_ROTATE:
        padding = HUGE_BODY_BYTES - len(body)
        body = body[:-1] + b', "padding": "' + b"x" * max(padding, 0) + b'"}'
    elif kind is FaultKind.WRONG_TYPES_AFTER_ROTATE:
        payload = json.loads(body)
        payload.update(access_token=12345, expires_in="soon", token_type=["Bearer"])
        body = json.dumps(payload).encode()
    elif kind is FaultKind.DUPLICATE_KEYS_AFTER_ROTATE:
        body = (
            body[:-1] + b', "refresh_token": "rt-duplicate-' + secrets.token_hex(8).encode() + b'"}'
        )
    else:  # NO_CONTENT_TYPE
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
    return _Reply(reply.status, body, headers, reply.close)


class _BadRequest(Exception):
    """A request error that maps straight to one OAuth error reply."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _parse_form(request: h11.Request, body: bytes) -> dict[str, str]:
    content_type = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
    if content_type != _FORM:
        raise _BadRequest(_oauth_error(400, "invalid_request", f"Content-Type must be {_FORM}"))
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest(_oauth_error(400, "invalid_request", "malformed form body")) from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            # RFC 6749 3.2: parameters must not be included more than once.
            raise _BadRequest(_oauth_error(400, "invalid_request", f"repeated parameter {name}"))
        if value:  # RFC 6749 3.1: a parameter without a value counts as omitted
            form[name] = value
    return form


def _pkce_ok(challenge: str, method: str, verifier: str | None) -> bool:
    if verifier is None:
        return False
    if method == "plain":
        return hmac.compare_digest(challenge.encode(), verifier.encode())
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=")
    return hmac.compare_digest(challenge.encode(), computed)


def _reset(stream: anyio.abc.SocketStream) -> None:
    """Make the coming close() a TCP RST: SO_LINGER with a zero timeout."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _peek_refresh_token(request: h11.Request, body: bytes) -> str | None:
    try:
        return _parse_form(request, body).get("refresh_token")
    except _BadRequest:
        return None


# --------------------------------------------------------------------------- the IdP


class FakeIdP:
    """A fake OAuth 2.0 IdP serving ``/connect/token`` and ``/connect/revocation``.

    The token endpoint takes ``refresh_token`` and ``authorization_code`` grants; codes come
    from :meth:`authorize`, standing in for the user's consent at the authorization endpoint.

    Run it with ``await task_group.start(idp.serve)`` or, from synchronous code,
    ``with running_in_thread(idp):``. The token settings (``usage``, ``grace_period``,
    lifetimes, ``reuse_returns_refresh_token``, ``grace_answer``, ``reuse_revokes``) are public
    attributes; like a real IdP, changing one affects only authorizations issued afterwards.

    ``grace_answer``: a one-time token re-sent inside its grace period gets a new ``"sibling"``
    refresh token, the earlier successors staying live (IdentityServer, Auth0; the default), or
    the ``"same_pair"`` its first use returned, refresh and access token alike
    (django-oauth-toolkit).

    ``reuse_revokes``: what presenting a consumed token after its grace period costs besides
    the ``invalid_grant``. ``"family"`` (the default) revokes every token of that authorization,
    as RFC 9700 (4.14.2) recommends and Auth0's and Okta's reuse detection do: the realistic
    price, so that a test sees a late re-send as the loss it is in production. ``"user"``
    revokes every token of that user and client, other authorizations (companies) included;
    ``"none"`` revokes nothing (Duende IdentityServer's default).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clients: Mapping[str, str] | None = None,
        usage: Usage = "one_time",
        grace_period: float = 5.0,
        access_token_lifetime: float = 3600.0,
        refresh_token_lifetime: float | None = None,
        refresh_token_idle_lifetime: float | None = None,
        max_refresh_tokens_per_user: int | None = None,
        reuse_returns_refresh_token: bool = True,
        grace_answer: GraceAnswer = "sibling",
        reuse_revokes: ReuseRevokes = "family",
        latency: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if usage not in ("one_time", "reuse"):
            raise ValueError("usage must be 'one_time' or 'reuse'")
        if grace_answer not in ("sibling", "same_pair"):
            raise ValueError("grace_answer must be 'sibling' or 'same_pair'")
        if reuse_revokes not in ("none", "family", "user"):
            raise ValueError("reuse_revokes must be 'none', 'family' or 'user'")
        if max_refresh_tokens_per_user is not None and max_refresh_tokens_per_user < 1:
            raise ValueError("max_refresh_tokens_per_user must be >= 1")
        self._host = host
        self._port = port
        self._clients: dict[str, str] = dict(_DEFAULT_CLIENTS if clients is None else clients)
        if not self._clients:
            raise ValueError("at least one client is needed")
        self.usage: Usage = usage
        self.grace_period = grace_period
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_lifetime = refresh_token_lifetime
        self.refresh_token_idle_lifetime = refresh_token_idle_lifetime
        self.max_refresh_tokens_per_user = max_refresh_tokens_per_user
        self.reuse_returns_refresh_token = reuse_returns_refresh_token
        self.grace_answer: GraceAnswer = grace_answer
        self.reuse_revokes: ReuseRevokes = reuse_revokes
        if latency < 0:
            raise ValueError("latency must be >= 0")
        # Seconds each token request waits before it is handled: a distant IdP's round trip,
        # for benchmarks (bench/) that need requests in flight the way production has them.
        self.latency = latency
        self._clock = clock
        self.faults = FaultPlan()
        self.ledger = Ledger(clock)
        self._lock = self.ledger._lock  # one lock for all token state
        self._user_seq = itertools.count(1)
        self._bound: tuple[str, int] | None = None
        # Open unless a test holds token requests (hold_requests) to build up concurrency.
        self._gate = threading.Event()
        self._gate.set()
        self._held = 0
        self._requests_in_flight = 0
        # refuse_connections(): the listener is closed until then (time.monotonic()).
        self._refuse_until = 0.0
        self._listening: anyio.CancelScope | None = None
        self._listener_closed: anyio.Event | None = None
        self._loop: tuple[int, anyio.lowlevel.EventLoopToken] | None = None  # (thread, token)

    def __repr__(self) -> str:
        where = self.url if self._bound else "not serving"
        return f"<FakeIdP {where} usage={self.usage}>"

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._bound is None:
            raise RuntimeError("FakeIdP is not serving yet: start serve() first")
        host, port = self._bound
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def revocation_url(self) -> str:
        return self.url + REVOCATION_PATH

    # -- the test's side --------------------------------------------------------------------

    def issue(
        self,
        user: str | None = None,
        *,
        client_id: str | None = None,
        scope: str = "openid offline_access",
    ) -> dict[str, object]:
        """Authorize ``user`` (a new token family) and return the token response for it."""
        with self._lock:
            client_id, user = self._client_and_user(client_id, user)
            family = self.ledger._new_family(user, client_id, scope, self._policy())
            token = self.ledger._mint_refresh(family, self.max_refresh_tokens_per_user)
            self.ledger._event("issue", family=family.id, user=user)
            return self._token_response(family, token.value, family.scope)

    def _client_and_user(self, client_id: str | None, user: str | None) -> tuple[str, str]:
        """The client (default: the first registered) and user (default: a new one) of an
        authorization; the caller holds the lock."""
        if client_id is None:
            client_id = next(iter(self._clients))
        elif client_id not in self._clients:
            raise KeyError(f"unknown client {client_id!r}")
        if user is None:
            user = f"user-{next(self._user_seq)}"
        return client_id, user

    def authorize(
        self,
        user: str | None = None,
        *,
        redirect_uri: str,
        client_id: str | None = None,
        scope: str = "openid offline_access",
        code_challenge: str | None = None,
        code_challenge_method: str = "S256",
        code_lifetime: float = 60.0,
    ) -> str:
        """What the authorization endpoint does when ``user`` consents: a one-time code for
        ``client_id``, bound to ``redirect_uri`` and, with PKCE (RFC 7636), to
        ``code_challenge``. The client exchanges it with ``grant_type=authorization_code``."""
        if code_challenge_method not in ("S256", "plain"):
            raise ValueError("code_challenge_method must be 'S256' or 'plain'")
        with self._lock:
            client_id, user = self._client_and_user(client_id, user)
            code = "code_" + secrets.token_urlsafe(24)
            self.ledger._codes[code] = Code(
                user=user,
                client_id=client_id,
                redirect_uri=redirect_uri,
                scope=scope,
                code_challenge=code_challenge,
                code_challenge_method=code_challenge_method,
                expires_at=self._clock() + code_lifetime,
            )
            self.ledger._event("authorize", user=user)
            return code

    def revoke(self, refresh_token: str) -> None:
        """Revoke one token (refresh or access). Raises KeyError for a value never minted."""
        with self._lock:
            token = self.ledger._tokens.get(refresh_token)
            if token is None and refresh_token not in self.ledger._access:
                raise KeyError("not a token minted by this IdP")
            self._revoke_value(refresh_token)
            self.ledger._count("revocations")

    def revoke_user(self, user: str) -> None:
        """Kill every refresh token of ``user``, as a password change or a lock-out does."""
        with self._lock:
            for family in self.ledger._families.values():
                if family.user == user:
                    for token in family.tokens:
                        token.revoke("user")
            self.ledger._count("revocations")
            self.ledger._event("revoke_user", user=user)

    def hold_requests(self) -> None:
        """Token requests from now on wait, unanswered, until :meth:`release_requests`: a test
        can then see how many requests a client made at once (:attr:`held_requests`)."""
        self._gate.clear()

    def release_requests(self) -> None:
        self._gate.set()

    @property
    def held_requests(self) -> int:
        """Token requests waiting at the gate of :meth:`hold_requests`."""
        with self._lock:
            return self._held

    def set_client_secret(self, client_id: str, secret: str) -> None:
        """Rotate (or add) a client's secret; the old one then gets ``invalid_client``."""
        with self._lock:
            self._clients[client_id] = secret

    # -- serving ----------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[FakeIdP] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report ``self`` through ``task_status``, then serve until cancelled."""
        listener: anyio.abc.Listener[anyio.abc.SocketStream]
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        address = listener.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
        assert isinstance(address, tuple)  # TCP: (host, port) or (host, port, flow, scope)
        self._bound = (str(address[0]), int(address[1]))
        self._loop = (threading.get_ident(), anyio.lowlevel.current_token())
        logger.debug("fake IdP listening on %s", self.url)
        task_status.started(self)
        # Connections live in their own task group, so that closing the listener for an outage
        # (refuse_connections) leaves the requests in flight alone.
        async with anyio.create_task_group() as connections:
            while True:
                self._listener_closed = closed = anyio.Event()
                async with listener:
                    with anyio.CancelScope() as self._listening:
                        if time.monotonic() < self._refuse_until:
                            self._listening.cancel()
                        await listener.serve(self._handle_connection, task_group=connections)
                closed.set()
                # A deadline, not an event: another thread may extend it meanwhile.
                while (left := self._refuse_until - time.monotonic()) > 0:  # noqa: ASYNC110
                    await anyio.sleep(left)
                listener = await self._listen_again()

    async def _listen_again(self) -> anyio.abc.Listener[anyio.abc.SocketStream]:
        """The listener again, on the port it had (SO_REUSEADDR: TIME_WAIT is no obstacle)."""
        assert self._bound is not None
        while True:
            try:
                return await anyio.create_tcp_listener(
                    local_host=self._bound[0], local_port=self._bound[1]
                )
            except OSError:  # someone took the port meanwhile: unlikely on loopback, retry
                await anyio.sleep(0.05)

    def refuse_connections(self, seconds: float) -> None:
        """An outage, as of an IdP process that died: for ``seconds`` the listener is closed,
        so new connections are refused (ECONNREFUSED: the client knows nothing was sent), and
        a request arriving on an open keep-alive connection is reset unread. Nothing is
        processed. Thread-safe; a call during an outage extends it. From another thread it
        returns once the listener is closed; from the serving event loop's own thread, the
        listener closes at its next checkpoint."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        if self._loop is None:
            raise RuntimeError("FakeIdP is not serving yet: start serve() first")
        with self._lock:
            self._refuse_until = max(self._refuse_until, time.monotonic() + seconds)
            self.ledger._count("outages")
            self.ledger._event("outage", seconds=seconds)
        thread, token = self._loop
        if threading.get_ident() == thread:
            self._stop_listening()
        else:
            anyio.from_thread.run(self._close_listener, token=token)

    def _stop_listening(self) -> None:
        if self._listening is not None:
            self._listening.cancel()

    async def _close_listener(self) -> None:
        self._stop_listening()
        if self._listener_closed is not None:
            await self._listener_closed.wait()

    async def _handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        with self._lock:
            self.ledger._count("connections")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                keep_open = await self._serve_one(conn, stream)
                if not keep_open or conn.our_state is not h11.DONE:
                    break
                if conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reply = _text_reply(exc.error_status_hint, "text/plain", b"Bad Request\n")
                reply.close = True
                with suppress(h11.LocalProtocolError, anyio.BrokenResourceError):
                    await self._send(conn, stream, reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away; nothing to answer
        except Exception:
            # A bug in one connection must not take the whole IdP (and the test's other
            # connections) down with it; the log and the ledger say what happened.
            logger.exception("fake IdP: connection handler failed")
            with self._lock:
                self.ledger._event("handler_error")
        finally:
            await stream.aclose()

    async def _next_event(
        self, conn: h11.Connection, stream: anyio.abc.SocketStream
    ) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # mypy cannot narrow a sentinel class
            if conn.they_are_waiting_for_100_continue:
                continue_ = h11.InformationalResponse(status_code=100, headers=[])
                await stream.send(conn.send(continue_) or b"")
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)

    async def _serve_one(self, conn: h11.Connection, stream: anyio.abc.SocketStream) -> bool:
        """Read one request and answer it. False: the connection is to be closed."""
        event = await self._next_event(conn, stream)
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed (an idle keep-alive ended) or nothing to do
        request = event
        if time.monotonic() < self._refuse_until:
            with self._lock:
                self.ledger._faults["outage"] = self.ledger._faults.get("outage", 0) + 1
                self.ledger._event("not_processed", fault="outage")
            _reset(stream)
            return False
        length = _header(request, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            await self._refuse_too_large(conn, stream)
            return False
        body = bytearray()
        while True:
            event = await self._next_event(conn, stream)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._refuse_too_large(conn, stream)
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False  # the client closed mid-body
        return await self._route(conn, stream, request, bytes(body))

    async def _refuse_too_large(self, conn: h11.Connection, stream: anyio.abc.SocketStream) -> None:
        reply = _oauth_error(413, "invalid_request", f"request body over {MAX_BODY} bytes")
        reply.close = True
        await self._send(conn, stream, reply)
        # Closing with unread input makes the kernel send RST, which can destroy the 413 before
        # the client reads it: half-close, then drain briefly.
        await stream.send_eof()
        with anyio.move_on_after(1.0):
            try:
                while await stream.receive(65536):
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def _route(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        method = request.method.decode("ascii", "replace")
        path = urllib.parse.urlsplit(request.target.decode("ascii", "replace")).path
        allowed = {TOKEN_PATH: "POST", REVOCATION_PATH: "POST", DISCOVERY_PATH: "GET"}
        if path not in allowed:
            reply = _text_reply(404, "text/plain; charset=utf-8", b"Not Found\n")
        elif method != allowed[path] and not (path == DISCOVERY_PATH and method == "HEAD"):
            reply = _text_reply(405, "text/plain; charset=utf-8", b"", Allow=allowed[path])
        elif path == TOKEN_PATH:
            return await self._token_endpoint(conn, stream, request, body)
        elif path == REVOCATION_PATH:
            reply = self._revocation(request, body)
        else:
            discovery = json.dumps(self._discovery()).encode()
            reply = _Reply(200, discovery, [("Content-Type", "application/json")])
        await self._send(conn, stream, reply, head=method == "HEAD")
        return True

    async def _send(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        reply: _Reply,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            *reply.headers,
            ("Content-Length", str(len(reply.body))),
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Server", "refresherd-fake-idp"),
        ]
        if reply.close:
            headers.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(reply.status).phrase
        except ValueError:
            reason = ""
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
        if not head:
            data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send(data)

    # -- token endpoint -------------------------------------------------------------------

    async def _token_endpoint(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        with self._lock:
            self._requests_in_flight += 1
            counts = self.ledger._counts
            if self._requests_in_flight > counts["peak_requests_in_flight"]:
                counts["peak_requests_in_flight"] = self._requests_in_flight
        try:
            return await self._token_request(conn, stream, request, body)
        finally:
            with self._lock:
                self._requests_in_flight -= 1

    async def _token_request(
        self,
        conn: h11.Connection,
        stream: anyio.abc.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        if not self._gate.is_set():
            with self._lock:
                self._held += 1
            try:
                # A threading.Event: released from the test's thread, not this loop's.
                while not self._gate.is_set():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            finally:
                with self._lock:
                    self._held -= 1
        if self.latency:
            await anyio.sleep(self.latency)
        presented = _peek_refresh_token(request, body)
        fault = self.faults._draw(presented)
        kind = fault.kind if fault is not None else None
        with self._lock:
            self.ledger._count("requests")
            self.ledger._presented(presented)
            if kind is not None:
                self.ledger._faults[kind.value] = self.ledger._faults.get(kind.value, 0) + 1
        with self.ledger._flight(presented):
            if fault is None:
                await self._send(conn, stream, self._process_token(request, body, None))
                return True
            assert kind is not None
            if kind is FaultKind.RESET:
                self._record_fault_only(kind)
                _reset(stream)
                return False
            if kind is FaultKind.UNAVAILABLE:
                self._record_fault_only(kind)
                await self._send(conn, stream, _text_reply(503, "text/html", _HTML_BODY))
                return True
            if kind is FaultKind.RETRY_AFTER:
                self._record_fault_only(kind)
                phrase = http.HTTPStatus(fault.status).phrase
                retry = str(math.ceil(fault.retry_after))
                reply = _text_reply(
                    fault.status, "text/plain", phrase.encode() + b"\n", Retry_After=retry
                )
                await self._send(conn, stream, reply)
                return True
            if kind is FaultKind.INVALID_CLIENT:
                self._record_fault_only(kind)
                reply = _oauth_error(
                    401,
                    "invalid_client",
                    "client authentication failed",
                    WWW_Authenticate='Basic realm="fake-idp"',
                )
                await self._send(conn, stream, reply)
                return True
            if kind is FaultKind.SERVER_ERROR:
                self._record_fault_only(kind)
                await self._send(conn, stream, self._internal_error())
                return True
            if kind is FaultKind.SLOW and not fault.process_first:
                await anyio.sleep(fault.delay)
            reply = self._process_token(request, body, kind)
            if kind is FaultKind.SLOW or kind is FaultKind.STALL:
                if kind is FaultKind.STALL:
                    await anyio.sleep(fault.stall)
                elif fault.process_first:
                    await anyio.sleep(fault.delay)
                await self._send(conn, stream, reply)
                return True
            if kind is FaultKind.DROP_AFTER_ROTATE:
                await stream.send_eof()
                return False
            if kind is FaultKind.ERROR_AFTER_ROTATE:
                await self._send(conn, stream, self._internal_error())
                return True
            if kind in _SPOILT_REPLIES:
                await self._send(conn, stream, _spoil(kind, reply))
                return True
            # GARBAGE_AFTER_ROTATE: a 200 that is not JSON, as from a misconfigured proxy.
            await self._send(conn, stream, _text_reply(200, "text/html; charset=utf-8", _HTML_BODY))
            return True

    @staticmethod
    def _internal_error() -> _Reply:
        return _text_reply(500, "text/html; charset=utf-8", _HTML_BODY)

    def _record_fault_only(self, kind: FaultKind) -> None:
        with self._lock:
            self.ledger._event("not_processed", fault=kind.value)

    def _process_token(self, request: h11.Request, body: bytes, fault: FaultKind | None) -> _Reply:
        """Do the token endpoint's work. Synchronous, so a request is atomic under the lock."""
        fault_name = fault.value if fault is not None else None
        with self._lock:
            try:
                form = _parse_form(request, body)
                client_id = self._authenticate(request, form)
            except _BadRequest as exc:
                self.ledger._event(f"rejected_{exc.reply.status}", fault=fault_name)
                return exc.reply
            grant_type = form.get("grant_type")
            if grant_type is None:
                self.ledger._event("invalid_request", fault=fault_name)
                return _oauth_error(400, "invalid_request", "grant_type is missing")
            if grant_type == "authorization_code":
                return self._exchange_code(client_id, form, fault_name)
            if grant_type != "refresh_token":
                self.ledger._event("unsupported_grant_type", fault=fault_name)
                return _oauth_error(
                    400,
                    "unsupported_grant_type",
                    "only refresh_token and authorization_code are supported",
                )
            presented = form.get("refresh_token")
            if presented is None:
                self.ledger._event("invalid_request", fault=fault_name)
                return _oauth_error(400, "invalid_request", "refresh_token is missing")
            return self._refresh(client_id, presented, form.get("scope"), fault_name)

    def _refresh(
        self, client_id: str, presented: str, scope: str | None, fault: str | None
    ) -> _Reply:
        ledger = self.ledger
        now = self._clock()
        token = ledger._tokens.get(presented)
        if token is None or token.family.client_id != client_id:
            # A token of another client is as unknown to this client as a made-up one.
            ledger._count("invalid_grants")
            ledger._event("invalid_grant", reason="unknown", fault=fault)
            return _oauth_error(400, "invalid_grant", "invalid refresh token")
        family = token.family
        status = token_status(token, now)
        if status in ("revoked", "expired", "used"):
            ledger._count("invalid_grants")
            ledger._event("invalid_grant", reason=status, family=family.id, fault=fault)
            if status == "used":
                ledger._count("reuses_outside_grace")
                ledger._revoke_for_reuse(token)
            return _oauth_error(400, "invalid_grant", f"refresh token {status}")
        granted = family.scope
        if scope is not None:
            wanted = set(scope.split())
            if not wanted <= set(family.scope.split()):
                ledger._event("invalid_scope", family=family.id, fault=fault)
                return _oauth_error(400, "invalid_scope", "scope exceeds the granted scope")
            granted = " ".join(s for s in family.scope.split() if s in wanted)
        ledger._count("refreshes")
        if family.policy.usage == "reuse":
            token.last_activity = now
            if token.first_used_at is None:
                token.first_used_at = now
            returned = token.value if family.policy.reuse_returns_refresh_token else None
            ledger._event("refreshed", family=family.id, fault=fault)
            return _json_reply(200, self._token_response(family, returned, granted))
        if status == "grace":
            ledger._count("reuses_in_grace")
            if family.policy.grace_answer == "same_pair" and token.answer is not None:
                # django-oauth-toolkit: the pair of the first use again, nothing minted.
                ledger._event("refreshed_in_grace", family=family.id, fault=fault, same_pair=True)
                return _json_reply(200, token.answer)
        else:
            token.first_used_at = now
        successor = ledger._mint_refresh(family, self.max_refresh_tokens_per_user)
        token.successors.append(successor)
        response = self._token_response(family, successor.value, granted)
        if token.answer is None:
            token.answer = response
        outcome = "refreshed_in_grace" if status == "grace" else "refreshed"
        ledger._event(outcome, family=family.id, fault=fault)
        return _json_reply(200, response)

    def _exchange_code(self, client_id: str, form: Mapping[str, str], fault: str | None) -> _Reply:
        """RFC 6749 4.1.3 with RFC 7636 4.6: a code is good once, for its client, its
        redirect_uri and (with PKCE) the verifier of its challenge."""
        ledger = self.ledger
        value, redirect_uri = form.get("code"), form.get("redirect_uri")
        if value is None or redirect_uri is None:
            ledger._event("invalid_request", fault=fault)
            return _oauth_error(400, "invalid_request", "code and redirect_uri are required")
        code = ledger._codes.get(value)
        problem = None
        if code is None or code.client_id != client_id:
            problem = "unknown"
        elif code.used:
            problem = "used"
        elif self._clock() >= code.expires_at:
            problem = "expired"
        elif code.redirect_uri != redirect_uri:
            problem = "redirect_uri_mismatch"
        elif code.code_challenge is not None and not _pkce_ok(
            code.code_challenge, code.code_challenge_method, form.get("code_verifier")
        ):
            problem = "pkce_failed"
        if problem is not None or code is None:
            if code is not None and problem != "unknown":
                code.used = True  # a failed redemption burns the code too
            ledger._count("invalid_grants")
            ledger._event("invalid_grant", reason=f"code_{problem}", fault=fault)
            return _oauth_error(400, "invalid_grant", f"authorization code {problem}")
        code.used = True
        family = ledger._new_family(code.user, client_id, code.scope, self._policy())
        token = ledger._mint_refresh(family, self.max_refresh_tokens_per_user)
        ledger._count("code_exchanges")
        ledger._event("code_exchanged", family=family.id, user=code.user, fault=fault)
        return _json_reply(200, self._token_response(family, token.value, family.scope))

    def _token_response(
        self, family: Family, refresh_token: str | None, scope: str
    ) -> dict[str, object]:
        response: dict[str, object] = {
            "access_token": self.ledger._mint_access(family),
            "token_type": "Bearer",
            "expires_in": int(self.access_token_lifetime),
            "scope": scope,
        }
        if refresh_token is not None:
            response["refresh_token"] = refresh_token
        return response

    def _policy(self) -> Policy:
        return Policy(
            usage=self.usage,
            grace_period=self.grace_period,
            refresh_token_lifetime=self.refresh_token_lifetime,
            refresh_token_idle_lifetime=self.refresh_token_idle_lifetime,
            reuse_returns_refresh_token=self.reuse_returns_refresh_token,
            grace_answer=self.grace_answer,
            reuse_revokes=self.reuse_revokes,
        )

    def _authenticate(self, request: h11.Request, form: Mapping[str, str]) -> str:
        """Return the authenticated client id, or raise _BadRequest with 400/401."""
        basic = self._basic_credentials(request)
        body_id, body_secret = form.get("client_id"), form.get("client_secret")
        secret: str | None
        if basic is not None:
            if body_secret is not None or (body_id is not None and body_id != basic[0]):
                raise _BadRequest(
                    _oauth_error(400, "invalid_request", "use one client authentication method")
                )
            client_id, secret = basic
        else:
            client_id, secret = body_id or "", body_secret
        expected = self._clients.get(client_id)
        if (
            expected is None
            or secret is None
            or not hmac.compare_digest(expected.encode(), secret.encode())
        ):
            self.ledger._count("invalid_clients")
            # RFC 6749 5.2: a client that tried Basic gets a challenge back.
            extra = {"WWW_Authenticate": 'Basic realm="fake-idp"'} if basic is not None else {}
            raise _BadRequest(
                _oauth_error(401, "invalid_client", "client authentication failed", **extra)
            )
        return client_id

    def _basic_credentials(self, request: h11.Request) -> tuple[str, str] | None:
        value = _header(request, b"authorization")
        if value is None:
            return None
        scheme, _, param = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            # A broken Basic header is a failed authentication attempt, not a missing one.
            return ("", "")
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            return ("", "")
        # RFC 6749 2.3.1: both halves are form-urlencoded before base64.
        return urllib.parse.unquote_plus(raw_id), urllib.parse.unquote_plus(raw_secret)

    # -- revocation and discovery -----------------------------------------------------------

    def _revocation(self, request: h11.Request, body: bytes) -> _Reply:
        with self._lock:
            try:
                form = _parse_form(request, body)
                client_id = self._authenticate(request, form)
            except _BadRequest as exc:
                return exc.reply
            value = form.get("token")
            if value is None:
                return _oauth_error(400, "invalid_request", "token is missing")
            self.ledger._count("revocations")
            family = self._family_of_any(value)
            # RFC 7009 2.2: unknown tokens get 200 too. A token of another client is left
            # alone and answered alike, so the endpoint reveals nothing (as IdentityServer).
            if family is not None and family.client_id == client_id:
                self._revoke_value(value)
            else:
                self.ledger._event("revocation_ignored")
            return _Reply(200, b"", [("Cache-Control", "no-store")])

    def _family_of_any(self, value: str) -> Family | None:
        token = self.ledger._tokens.get(value)
        if token is not None:
            return token.family
        return self.ledger._access.get(value)

    def _revoke_value(self, value: str) -> None:
        token = self.ledger._tokens.get(value)
        if token is not None:
            token.revoke("revocation")
            self.ledger._event("revoked", family=token.family.id)
        elif value in self.ledger._access:
            # Access tokens are not checked anywhere here; record the revocation only.
            self.ledger._event("access_token_revoked", family=self.ledger._access[value].id)

    def _discovery(self) -> dict[str, object]:
        return {
            "issuer": self.url,
            "token_endpoint": self.token_url,
            "revocation_endpoint": self.revocation_url,
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256", "plain"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "revocation_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
            ],
        }


@contextmanager
def running_in_thread(idp: FakeIdP) -> Iterator[FakeIdP]:
    """Serve ``idp`` from a background thread for the duration of the ``with`` block.

    Returns once the listener is bound (``idp.url`` is valid); stops the server and joins
    the thread on exit.
    """
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(idp.serve)
        try:
            yield idp
        finally:
            future.cancel()
