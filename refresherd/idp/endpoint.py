"""A provider's token endpoint: one token request, one typed outcome.

Three requests: refresh (``grant_type=refresh_token``), the authorization-code exchange the
token API offers, and RFC 7009 revocation. The client authenticates by its provider's pinned
method; the HTTP is :mod:`refresherd.idp.transport`'s, the reading of a token response
:mod:`refresherd.idp.token_response`'s.

Every failure raises an :class:`~refresherd.idp.failures.EndpointError` subclass whose
``failure`` says, above all, whether the IdP may have consumed the refresh token (DESIGN.md's
failure table). No token or client secret ever appears in an exception message.
"""

from __future__ import annotations

import time
from base64 import b64encode
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import quote_plus, urlencode

from refresherd.idp.failures import (
    Ambiguous,
    ClientRejected,
    EndpointError,
    FailureReason,
    InvalidGrant,
    OAuthError,
    RateLimited,
)
from refresherd.idp.token_response import error_fields, parse_grant
from refresherd.idp.transport import Transport
from refresherd.model import AuthMethod, Grant, Secret
from refresherd.settings import ProviderConfig

REDACTED: Final = "[redacted]"
MAX_RETRY_AFTER: Final = 24 * 3600.0


def _safe_text(value: object, limit: int = 200, secrets: tuple[Secret, ...] = ()) -> str:
    """An IdP-supplied string fit for a log line: printable, bounded, and without the secrets
    we sent (an IdP that echoes the presented refresh token must not put it in our logs)."""
    text = str(value)
    for secret in secrets:
        if secret:
            text = text.replace(secret.reveal(), REDACTED)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:limit]


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
        return OAuthError(
            FailureReason.HTTP_ERROR, f"HTTP {status}: redirect not followed", status=status
        )
    raw_code, description = error_fields(body) if 400 <= status < 500 else (None, None)
    # Classified on the raw code, redacted only for the message: a refresh token that happens
    # to be part of "invalid_grant" ("grant") must not turn a revocation into endless retries.
    code_text = _safe_text(raw_code, 60, secrets) if raw_code is not None else None
    detail = f"HTTP {status}" + (f" error={code_text}" if code_text else "")
    if description is not None:
        detail += f" ({_safe_text(description, secrets=secrets)})"
    if raw_code == "invalid_grant":
        return InvalidGrant(FailureReason.INVALID_GRANT, detail, status=status)
    if raw_code in ("invalid_client", "unauthorized_client"):
        return ClientRejected(FailureReason(raw_code), detail, status=status)
    if status == 401 and raw_code is None:
        # A bare 401 from a token endpoint is about client authentication.
        return ClientRejected(FailureReason.INVALID_CLIENT, detail, status=status)
    if raw_code is not None and 400 <= status < 500:
        return OAuthError(FailureReason.OAUTH_ERROR, detail, status=status)
    return OAuthError(FailureReason.HTTP_ERROR, detail, status=status)


def pool_size(provider: ProviderConfig) -> int:
    """The provider's connection pool: ``max_connections``, or with "auto" as many as its
    refreshes in flight (0: no limit of the pool's own). Those are bounded by the adaptive
    limit within [daemon] concurrency and by ``max_concurrent_refreshes``, so a pool of a
    fixed size would only be a second, silent limit below them (issue #18: the old default of
    20 held a 1M-set daemon to 380 refreshes/s)."""
    if provider.max_connections != "auto":
        return provider.max_connections
    return provider.max_concurrent_refreshes or 0


class TokenEndpoint:
    """A provider's token endpoint, with its own connection pool and pinned auth method."""

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        self._transport = Transport(
            max_connections=pool_size(provider), connect_timeout=provider.connect_timeout
        )
        # (form fields, headers) that authenticate the client: see _client_auth.
        self._auth: tuple[str, dict[str, str]] | None = None
        # A refresh's form body around its refresh token: see _refresh_request.
        self._refresh_form: tuple[str, str] | None = None

    async def aclose(self) -> None:
        await self._transport.aclose()

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

    def _refresh_request(self, refresh_token: str) -> tuple[bytes, dict[str, str]]:
        """A refresh's body and headers, as _client_request makes them for the form
        ``grant_type``, ``refresh_token`` (and the provider's ``scope``): only the token is
        encoded per request, the rest once per endpoint (it is sent on every refresh)."""
        if self._refresh_form is None:
            fields, _ = self._client_auth()
            scope = self.provider.scope
            tail = ("&" + urlencode({"scope": scope}) if scope else "") + fields
            self._refresh_form = ("grant_type=refresh_token&refresh_token=", tail)
        head, tail = self._refresh_form
        body = (head + quote_plus(refresh_token) + tail).encode("ascii")
        return body, dict(self._client_auth()[1])

    async def refresh(
        self, refresh_token: Secret, *, timeout: float, leave_by: float | None = None
    ) -> Grant:
        """POST grant_type=refresh_token. Returns the grant or raises an EndpointError.

        ``leave_by``: seconds within which the request must get its connection and leave, or
        not go at all (NotSent): a one-time token's send that waited for a pooled connection
        past its grace window would arrive as a reuse."""
        form, form_headers = self._refresh_request(refresh_token.reveal())
        status, headers, body = await self._transport.post(
            self.provider.token_url, form, form_headers, timeout=timeout, leave_by=leave_by
        )
        if 200 <= status < 300:
            try:
                return parse_grant(body)
            except ValueError as exc:
                # The IdP said yes and may have rotated; we cannot read the new token.
                raise Ambiguous(
                    FailureReason.MALFORMED_RESPONSE, f"HTTP {status}: {exc}", status=status
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
                    FailureReason.MALFORMED_RESPONSE, f"HTTP {status}: {exc}", status=status
                ) from None
            if grant.refresh_token is None:
                # Nothing to keep fresh: refresherd exists for the refresh token.
                raise OAuthError(
                    FailureReason.NO_REFRESH_TOKEN,
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
                FailureReason.RATE_LIMITED, f"HTTP {status}", status=status, retry_after=retry_after
            )
        if status >= 500:
            return Ambiguous(FailureReason.SERVER_ERROR, f"HTTP {status}", status=status)
        return _oauth_error(status, body, secrets)

    async def _send(
        self, url: str, form: dict[str, str], timeout: float, *, leave_by: float | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        body, headers = self._client_request(form)
        return await self._transport.post(url, body, headers, timeout=timeout, leave_by=leave_by)
