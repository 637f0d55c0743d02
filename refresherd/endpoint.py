"""The only module that speaks HTTP to an IdP: one token request, one typed outcome.

Three requests: refresh (``grant_type=refresh_token``), the authorization-code exchange the
token API offers, and RFC 7009 revocation.

Every failure raises an :class:`EndpointError` subclass whose ``failure`` says, above all,
whether the IdP may have consumed the refresh token (DESIGN.md's failure table). No token or
client secret ever appears in an exception message.
"""

from __future__ import annotations

import json
import math
import time
from base64 import b64encode
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote_plus, urlencode

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError

from refresherd import deadlines
from refresherd.model import AuthMethod, Failure, FailureKind, Grant, Secret
from refresherd.settings import ProviderConfig

MAX_BODY_BYTES: Final = 1024 * 1024
_KNOWN_FIELDS: Final = frozenset(
    {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "id_token",
        "error",
        "error_description",
        "error_uri",
    }
)
REDACTED: Final = "[redacted]"
MAX_RETRY_AFTER: Final = 24 * 3600.0
USER_AGENT: Final = "refresherd/0.1"
# How much sooner than the request's deadline a wait for a connection gives up (NotSent).
CONNECT_MARGIN: Final = 0.25


class EndpointError(Exception):
    """A token request that did not yield a grant. ``failure`` is safe to log."""

    kind: FailureKind = FailureKind.OAUTH_ERROR

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.failure = Failure(
            kind=self.kind, reason=reason, detail=detail, status=status, retry_after=retry_after
        )


class NotSent(EndpointError):
    """Connect, DNS or TLS failure: the IdP never saw the refresh token."""

    kind = FailureKind.NOT_SENT


class Ambiguous(EndpointError):
    """Sent, but the answer was lost or unusable: the IdP may have rotated the token."""

    kind = FailureKind.AMBIGUOUS


class RateLimited(EndpointError):
    kind = FailureKind.RATE_LIMITED


class InvalidGrant(EndpointError):
    kind = FailureKind.INVALID_GRANT


class ClientRejected(EndpointError):
    kind = FailureKind.CLIENT_REJECTED


class OAuthError(EndpointError):
    kind = FailureKind.OAUTH_ERROR


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # The key is IdP-supplied text: name it only if it is one we know.
            shown = repr(key) if key in _KNOWN_FIELDS else "a key"
            raise _DuplicateKey(f"the JSON object has {shown} more than once")
        result[key] = value
    return result


def _load_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ValueError saying why not (HTML, truncated, a list...).

    The messages never quote the body: it may hold tokens.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    if not text.strip():
        raise ValueError("the body is empty")
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise ValueError(str(exc)) from None
    except json.JSONDecodeError as exc:
        # exc.msg is json's own wording ("Expecting value", ...), never the document.
        raise ValueError(f"the body is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except (ValueError, RecursionError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"the body is JSON but not an object (a {_json_type(value)})")
    return value


def _json_type(value: object) -> str:
    match value:
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case str():
            return "string"
        case list():
            return "list"
        case None:
            return "null"
        case _:
            return "object"


def _load_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None if it is not one."""
    try:
        return _load_json(body)
    except ValueError:
        return None


def _safe_text(value: object, limit: int = 200, secrets: tuple[Secret, ...] = ()) -> str:
    """An IdP-supplied string fit for a log line: printable, bounded, and without the secrets
    we sent (an IdP that echoes the presented refresh token must not put it in our logs)."""
    text = str(value)
    for secret in secrets:
        if secret:
            text = text.replace(secret.reveal(), REDACTED)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:limit]


def parse_grant(body: bytes) -> Grant:
    """Validate a 2xx token response. Raises ValueError naming the field that is wrong."""
    data = _load_json(body)
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise ValueError("access_token is missing or not a non-empty string")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type:
        raise ValueError("token_type is not a non-empty string")
    expires_in = _parse_expires_in(data.get("expires_in"))
    refresh = data.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise ValueError("refresh_token is present but not a non-empty string")
    scope = data.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise ValueError("scope is not a string")
    id_token = data.get("id_token")
    if id_token is not None and not isinstance(id_token, str):
        raise ValueError("id_token is not a string")
    # JSON escapes can spell lone surrogates, which neither SQLite nor the next request's form
    # can encode: such a grant would fail only later, on the way to disk.
    for name in ("access_token", "token_type", "refresh_token", "scope", "id_token"):
        value = data.get(name)
        if isinstance(value, str) and not _encodable(value):
            raise ValueError(f"{name} is not valid Unicode text")
    return Grant(
        access_token=Secret(access),
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=Secret(refresh) if refresh else None,
        scope=scope,
        id_token=Secret(id_token) if id_token else None,
        refresh_expires_in=_informational_seconds(
            data.get("refresh_token_expires_in", data.get("refresh_expires_in"))
        ),
    )


def _informational_seconds(value: object) -> float | None:
    """A lifetime we only report (the refresh token's): anything unusable is ignored, never a
    reason to distrust a grant that carries a rotated token. 0 means "does not expire"
    (Keycloak's offline tokens)."""
    try:
        seconds = _parse_expires_in(value)
    except ValueError:
        return None
    return seconds if seconds else None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_expires_in(value: object) -> float | None:
    if value is None:
        return None
    # Some IdPs send the number as a string ("3600"); accept digits, refuse anything else.
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("expires_in is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expires_in is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond any float
        raise ValueError("expires_in is out of range") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("expires_in is negative or not finite")
    if number > 10 * 365 * 86400:
        raise ValueError("expires_in is larger than ten years")
    return number


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as delay-seconds (RFC 9110); an HTTP date is converted, garbage ignored."""
    if value is None:
        return None
    value = value.strip()
    # isdigit() alone also accepts "²" and other non-ASCII digits, which float() refuses.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC without a claim about local time
            when = when.replace(tzinfo=UTC)
        delay = when.timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


def _oauth_error(status: int, body: bytes, secrets: tuple[Secret, ...] = ()) -> EndpointError:
    """Classify a non-2xx answer that reached us in full."""
    if 300 <= status < 400:
        # Not followed: the form holds the refresh token and the client secret, and a token
        # endpoint that redirects is misconfigured. The request was not processed here.
        return OAuthError("http_error", f"HTTP {status}: redirect not followed", status=status)
    data = _load_json_object(body) if 400 <= status < 500 else None
    code = data.get("error") if data else None
    description = data.get("error_description") if data else None
    # Classified on the raw code, redacted only for the message: a refresh token that happens
    # to be part of "invalid_grant" ("grant") must not turn a revocation into endless retries.
    raw_code = code if isinstance(code, str) else None
    code_text = _safe_text(code, 60, secrets) if raw_code is not None else None
    detail = f"HTTP {status}" + (f" error={code_text}" if code_text else "")
    if isinstance(description, str):
        detail += f" ({_safe_text(description, secrets=secrets)})"
    if raw_code == "invalid_grant":
        return InvalidGrant("invalid_grant", detail, status=status)
    if raw_code in ("invalid_client", "unauthorized_client"):
        return ClientRejected(raw_code, detail, status=status)
    if status == 401 and raw_code is None:
        # A bare 401 from a token endpoint is about client authentication.
        return ClientRejected("invalid_client", detail, status=status)
    if raw_code is not None and 400 <= status < 500:
        return OAuthError("oauth_error", detail, status=status)
    return OAuthError("http_error", detail, status=status)


class TokenEndpoint:
    """A provider's token endpoint, with its own connection pool and pinned auth method.

    HTTP is aiohttp's: at the 20-60 requests in flight that 1M token sets need against an IdP
    50-150 ms away, httpx's pool costs 6-30x more CPU per request (docs/benchmarks.md). Its
    exceptions are classified here, not by an adapter: whether the request may have left
    (NotSent vs Ambiguous) must follow from where aiohttp failed, and nothing else.
    """

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        # Made at first use: an aiohttp session belongs to the event loop that runs it.
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # (form fields, headers) that authenticate the client: see _client_auth.
        self._auth: tuple[str, dict[str, str]] | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the token endpoint is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.provider.max_connections,
                limit_per_host=0,
                keepalive_timeout=30.0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # identity: a token response is small, and a compressed one could expand past
                # the body limit in memory before the limit is checked.
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                },
                trust_env=False,
                # A token endpoint has no use for cookies, and a jar only grows.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Ours is the only overall deadline (deadlines.fail_after in _send).
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def _client_auth(self) -> tuple[str, dict[str, str]]:
        """The client's authentication by the pinned method, encoded once per endpoint: the
        form fields to append (``&client_id=…``, or nothing) and the request headers."""
        if self._auth is None:
            p = self.provider
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            fields = ""
            if p.auth_method is AuthMethod.CLIENT_SECRET_BASIC:
                # RFC 6749 2.3.1: id and secret are form-urlencoded before the Basic encoding.
                pair = f"{quote_plus(p.client_id)}:{quote_plus(p.client_secret.reveal())}"
                headers["Authorization"] = "Basic " + b64encode(pair.encode()).decode("ascii")
            else:
                fields = "&" + urlencode(
                    {"client_id": p.client_id, "client_secret": p.client_secret.reveal()}
                )
            self._auth = (fields, headers)
        return self._auth

    def _client_request(self, form: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """A form body and headers with the client authenticated by the pinned method.
        Encoded here: aiohttp's FormData path costs more CPU than the request."""
        fields, headers = self._client_auth()
        # A copy: aiohttp is handed a dict of its own for each request.
        return (urlencode(form) + fields).encode("ascii"), dict(headers)

    async def refresh(
        self, refresh_token: Secret, *, timeout: float, leave_by: float | None = None
    ) -> Grant:
        """POST grant_type=refresh_token. Returns the grant or raises an EndpointError.

        ``leave_by``: seconds within which the request must get its connection and leave, or
        not go at all (NotSent): a one-time token's send that waited for a pooled connection
        past its grace window would arrive as a reuse."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
        if self.provider.scope:
            form["scope"] = self.provider.scope
        status, headers, body = await self._send(
            self.provider.token_url, form, timeout, leave_by=leave_by
        )
        if 200 <= status < 300:
            try:
                return parse_grant(body)
            except ValueError as exc:
                # The IdP said yes and may have rotated; we cannot read the new token.
                raise Ambiguous(
                    "malformed_response", f"HTTP {status}: {exc}", status=status
                ) from None
        raise self._failure(status, headers, body, (refresh_token, self.provider.client_secret))

    async def exchange_code(
        self,
        code: Secret,
        *,
        redirect_uri: str,
        code_verifier: Secret | None,
        timeout: float,
    ) -> Grant:
        """POST grant_type=authorization_code (RFC 6749 4.1.3, RFC 7636 4.5).

        Raises the same typed errors as :meth:`refresh`; an authorization code is single-use,
        so an :class:`Ambiguous` answer means the user must authorize again.
        """
        form = {
            "grant_type": "authorization_code",
            "code": code.reveal(),
            "redirect_uri": redirect_uri,
        }
        if code_verifier is not None:
            form["code_verifier"] = code_verifier.reveal()
        status, headers, body = await self._send(self.provider.token_url, form, timeout)
        secrets = tuple(s for s in (code, code_verifier, self.provider.client_secret) if s)
        if 200 <= status < 300:
            try:
                grant = parse_grant(body)
            except ValueError as exc:
                raise Ambiguous(
                    "malformed_response", f"HTTP {status}: {exc}", status=status
                ) from None
            if grant.refresh_token is None:
                # Nothing to keep fresh: refresherd exists for the refresh token.
                raise OAuthError(
                    "no_refresh_token",
                    f"HTTP {status}: the token response has no refresh_token "
                    "(does the client ask for offline_access?)",
                    status=status,
                )
            return grant
        raise self._failure(status, headers, body, secrets)

    async def revoke(self, token: Secret, *, timeout: float) -> None:
        """RFC 7009: revoke a refresh token at the provider's revocation endpoint.

        200 means revoked (or unknown to the IdP, which is as good). Raises the typed errors
        otherwise; ``ValueError`` if the provider has no revocation endpoint.
        """
        url = self.provider.revocation_url
        if not url:
            raise ValueError(f"provider {self.provider.name!r} has no revocation_url")
        form = {"token": token.reveal(), "token_type_hint": "refresh_token"}
        status, headers, body = await self._send(url, form, timeout)
        if 200 <= status < 300:
            return
        raise self._failure(status, headers, body, (token, self.provider.client_secret))

    @staticmethod
    def _failure(
        status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[Secret, ...]
    ) -> EndpointError:
        # 503 says the server could not handle the request (RFC 9110 15.6.4): not processed,
        # with or without Retry-After, as 429 is. 502/504 come from a gateway whose upstream
        # may have processed it, so they stay ambiguous.
        if status in (429, 503):
            retry_after = parse_retry_after(headers.get("retry-after"))
            return RateLimited(
                "rate_limited", f"HTTP {status}", status=status, retry_after=retry_after
            )
        if status >= 500:
            return Ambiguous("server_error", f"HTTP {status}", status=status)
        return _oauth_error(status, body, secrets)

    async def _send(
        self, url: str, form: dict[str, str], timeout: float, *, leave_by: float | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        connect = max(timeout - CONNECT_MARGIN, timeout / 2)
        if leave_by is not None:
            if leave_by <= 0:
                raise NotSent("connect_error", "no time left to send inside the grace window")
            connect = min(connect, leave_by)
        session = self._open()
        body, headers = self._client_request(form)
        client_timeout = aiohttp.ClientTimeout(
            total=None,
            # aiohttp's "connect" covers waiting for a pooled connection too; both end before
            # anything is sent, so it ends a little before the overall deadline (or when the
            # request may no longer leave): a wait that sent nothing is then NotSent, not
            # Ambiguous.
            connect=connect,
            sock_connect=min(self.provider.connect_timeout, timeout, connect),
            # No read timeout of aiohttp's own: see the deadline below.
            sock_read=None,
        )
        # One bound for the whole exchange (a server that trickles bytes included); if it fires,
        # the request was sent and the outcome is unknown. It is deadlines.fail_after, not
        # anyio's: after a SIGSTOP or a frozen VM the answer may be waiting, with a rotated
        # refresh token in it, and must be read rather than timed out at once.
        try:
            async with (
                deadlines.fail_after(timeout),
                session.post(
                    url, data=body, headers=headers, allow_redirects=False, timeout=client_timeout
                ) as response,
            ):
                content = await self._read_bounded(response)
                return response.status, response.headers, content
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Raised only by the connector, before a byte of the request is written (aiohttp
            # never retries a POST, so no later failure is relabelled as one of these).
            raise NotSent("connect_error", f"cannot connect: {type(exc).__name__}") from None
        except (aiohttp.NonHttpUrlClientError, aiohttp.InvalidUrlClientError):
            raise NotSent("connect_error", "unsupported protocol in token_url") from None
        except _BodyTooLarge:
            raise Ambiguous(
                "malformed_response", f"response body over {MAX_BODY_BYTES} bytes"
            ) from None
        except TimeoutError:
            raise Ambiguous("timeout", f"no answer within {timeout:.1f}s") from None
        except _Undecodable:
            raise Ambiguous(
                "malformed_response", "cannot decode the response body (Content-Encoding)"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Anything else once the request may have left: unknown outcome.
            raise Ambiguous("network_error", f"connection failed: {type(exc).__name__}") from None

    @staticmethod
    async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            response.close()  # never back into the pool with a body unread
            raise _BodyTooLarge()
        encoding = response.headers.get("content-encoding", "").strip().lower()
        chunks: list[bytes] = []
        size = 0
        try:
            if declared is not None and declared.isdigit() and encoding in ("", "identity"):
                # The declared length (checked above) is all there is to read, and nothing is
                # decoded that could grow past it: one read rather than a loop of chunks.
                return await response.read()
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    response.close()
                    raise _BodyTooLarge()
                chunks.append(chunk)
        except aiohttp.ClientPayloadError as exc:
            # Told apart here, while the cause is still attached (the deadline's task group
            # re-raises without it).
            if isinstance(exc.__cause__, ContentEncodingError):
                raise _Undecodable() from None
            raise
        return b"".join(chunks)


class _Undecodable(Exception):
    """A body its declared Content-Encoding cannot decode."""


class _BodyTooLarge(Exception):
    def __init__(self) -> None:
        super().__init__(f"response body over {MAX_BODY_BYTES} bytes")
