"""The sidecar's token API as an application reaches it: one ``GET /v1/tokens/{id}``, over TCP
or the daemon's unix socket, read into an :class:`AccessToken` or a :class:`TokenUnavailable`.

No caching here (that is :mod:`refresherd.client.tokens`). The API bearer is read from its
file at every request, so a rotated bearer is picked up; it and the access token never appear
in a repr or an exception.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx

# Longer than the daemon's default [api] wait_timeout (10 s): a GET of a due token waits for
# its refresh, and the daemon answers 504 "timeout" itself when that takes too long.
DEFAULT_TIMEOUT: Final = 30.0
# The host is not looked at on a unix socket; a name that says what is reached.
UNIX_SOCKET_URL: Final = "http://refresherd"

# What each of the API's stable error codes means for the application (README, "Token API").
_EXPLANATIONS: Final[Mapping[str, str]] = {
    "unknown_token_set": "is not known to refresherd",
    "invalidated": "is invalidated: the customer must authorize again",
    "provider_unavailable": "has no valid access token now: the identity provider cannot "
    "refresh it (refresherd keeps retrying)",
    "storage_unavailable": "cannot be read now: refresherd's database is not answering",
    "timeout": "was being refreshed and the refresh did not finish in time; it continues, "
    "ask again",
    "refreshed_recently": "was refreshed moments ago and is not refreshed again yet",
    "unauthorized": "was not served: refresherd refused the API bearer (is it the one in "
    "[api] bearer_token_file?)",
}


class TokenUnavailable(Exception):
    """refresherd did not give an access token for a token set.

    ``str()`` names the token set and what refresherd said; never a token or the API bearer.
    ``status`` and ``code`` are the API's HTTP status and stable error code (``None`` when
    there was no answer), ``reason`` its ``reason`` field (why a set is invalidated, why the
    provider failed), ``detail`` its human message, ``retry_after`` its Retry-After in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        token_set: str,
        status: int | None = None,
        code: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.token_set = token_set
        self.status = status
        self.code = code
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class SidecarUnreachable(TokenUnavailable):
    """No answer from the sidecar at all: connection refused, no socket, a timeout."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One answer of the sidecar. ``value`` is the secret: left out of the repr."""

    token_set: str
    value: str = field(repr=False)
    token_type: str
    # As refresherd said: Unix seconds (None when the IdP gave no expiry).
    expires_at: float | None
    # Seconds it was valid for when refresherd answered (``expires_in``), counted from
    # ``fetched_at``: the local monotonic clock, so neither a clock step here nor a skew
    # between this host and the sidecar's moves it.
    lifetime: float | None
    # time.monotonic() when the request was sent (before the answer: on the safe side).
    fetched_at: float


class Sidecar:
    """Where the refresherd sidecar answers, and its API bearer.

    ``url`` (``http://127.0.0.1:9469``) or ``unix_socket`` (the daemon's ``[api]
    unix_socket``); ``bearer_file`` (read at every request: a rotated bearer is picked up) or
    ``bearer``. Each request uses a short-lived client that ignores the proxy environment (the
    sidecar is local); pass ``client`` / ``async_client`` to use your own (TLS settings, event
    hooks); they must reach the sidecar at ``url``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        unix_socket: str | os.PathLike[str] | None = None,
        bearer: str | None = None,
        bearer_file: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
    ) -> None:
        if url is None and unix_socket is None:
            raise ValueError(
                "Sidecar: give the sidecar's url (e.g. 'http://127.0.0.1:9469') or unix_socket"
            )
        if url is None:
            url = UNIX_SOCKET_URL
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"Sidecar: url must be http(s)://host[:port], got {url!r}")
        if parsed.userinfo:
            # The bearer is the credential; a password in the URL would end up in reprs.
            raise ValueError("Sidecar: url must not carry a user or password")
        if (bearer is None) == (bearer_file is None):
            raise ValueError("Sidecar: give the API bearer as bearer= or bearer_file=, one of them")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(
                f"Sidecar: timeout must be a positive number of seconds, got {timeout}"
            )
        self.url = url.rstrip("/")
        self.unix_socket = os.fspath(unix_socket) if unix_socket is not None else None
        self.bearer_file = Path(bearer_file) if bearer_file is not None else None
        self.timeout = timeout
        self._bearer = bearer.strip() if bearer is not None else None
        self._client = client
        self._async_client = async_client
        self._bearer_value()  # a wrong path or an empty bearer fails here, not at the first call

    def __repr__(self) -> str:
        where = f"unix_socket={self.unix_socket!r}" if self.unix_socket else f"url={self.url!r}"
        bearer = f"bearer_file={str(self.bearer_file)!r}" if self.bearer_file else "bearer=<hidden>"
        return f"Sidecar({where}, {bearer})"

    @property
    def where(self) -> str:
        """The address, for messages: the socket's path or the URL."""
        return f"unix socket {self.unix_socket}" if self.unix_socket else self.url

    def fetch(self, token_set: str) -> AccessToken:
        """The token set's current access token (refresherd refreshes it first if it is due).

        Raises :class:`TokenUnavailable` with refresherd's reason, :class:`SidecarUnreachable`
        when there is no answer."""
        return self._ask(token_set, self._request(token_set))

    async def afetch(self, token_set: str) -> AccessToken:
        """:meth:`fetch` for asyncio and trio (through httpx's async client)."""
        return await self._aask(token_set, self._request(token_set))

    def refresh(self, token_set: str, rejected: str) -> AccessToken:
        """A fresh access token after the upstream API refused ``rejected``
        (``POST /v1/tokens/{id}/refresh``): refresherd refreshes now unless its current token
        is another one already (then that one is answered). A set refreshed moments ago is not
        refreshed again: :class:`TokenUnavailable` with code ``refreshed_recently``."""
        return self._ask(token_set, self._request(token_set, rejected=rejected))

    async def arefresh(self, token_set: str, rejected: str) -> AccessToken:
        """:meth:`refresh` for asyncio and trio."""
        return await self._aask(token_set, self._request(token_set, rejected=rejected))

    # ---- internals ---------------------------------------------------------------------------

    def _bearer_value(self) -> str:
        if self.bearer_file is None:
            assert self._bearer is not None
            value = self._bearer
            where = "bearer="
        else:
            where = f"bearer_file {self.bearer_file}"
            try:
                value = self.bearer_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"Sidecar: the API bearer cannot be read from {where}: {exc.strerror}"
                ) from None
        if not value:
            raise ValueError(f"Sidecar: the API bearer in {where} is empty")
        return value

    def _request(self, token_set: str, *, rejected: str | None = None) -> httpx.Request:
        """GET the token, or (with ``rejected``) POST a forced refresh. Its bearer header is
        the one place the bearer goes: the request never reaches an exception or a log."""
        url = f"{self.url}/v1/tokens/{quote(token_set, safe='')}"
        try:
            bearer = self._bearer_value()
        except ValueError as exc:
            raise TokenUnavailable(
                f"token set {token_set!r} was not asked for: {exc}", token_set=token_set
            ) from None
        headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
        if rejected is None:
            return httpx.Request("GET", url, headers=headers)
        return httpx.Request("POST", f"{url}/refresh", headers=headers, json={"rejected": rejected})

    def _ask(self, token_set: str, request: httpx.Request) -> AccessToken:
        asked_at = time.monotonic()
        try:
            if self._client is not None:
                request.extensions["timeout"] = httpx.Timeout(self.timeout).as_dict()
                response = self._client.send(request)
            else:
                with httpx.Client(**self._client_options()) as client:
                    response = client.send(request)
        except httpx.HTTPError as exc:
            # Not chained: the exception holds the request, and with it the bearer.
            raise self._unreachable(token_set, exc) from None
        return self._read(token_set, response, asked_at)

    async def _aask(self, token_set: str, request: httpx.Request) -> AccessToken:
        asked_at = time.monotonic()
        try:
            if self._async_client is not None:
                request.extensions["timeout"] = httpx.Timeout(self.timeout).as_dict()
                response = await self._async_client.send(request)
            else:
                async with httpx.AsyncClient(**self._client_options(asynchronous=True)) as client:
                    response = await client.send(request)
        except httpx.HTTPError as exc:
            raise self._unreachable(token_set, exc) from None
        return self._read(token_set, response, asked_at)

    @staticmethod
    def _read(token_set: str, response: httpx.Response, asked_at: float) -> AccessToken:
        return read_answer(
            token_set,
            response.status_code,
            response.content,
            retry_after=response.headers.get("retry-after"),
            fetched_at=asked_at,
            now=time.time(),
        )

    def _client_options(self, *, asynchronous: bool = False) -> dict[str, Any]:
        # Plain HTTP or a unix socket needs no TLS: not loading the CA bundle saves ~20 ms per
        # client, which is one per fetch.
        verify = self.url.startswith("https://")
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport
        if asynchronous:
            transport = httpx.AsyncHTTPTransport(uds=self.unix_socket, verify=verify)
        else:
            transport = httpx.HTTPTransport(uds=self.unix_socket, verify=verify)
        return {"transport": transport, "timeout": self.timeout, "trust_env": False}

    def _unreachable(self, token_set: str, exc: httpx.HTTPError) -> SidecarUnreachable:
        what = type(exc).__name__
        said = str(exc)
        return SidecarUnreachable(
            f"token set {token_set!r}: no answer from refresherd at {self.where} "
            f"({what}{': ' + said if said else ''})",
            token_set=token_set,
        )


def read_answer(
    token_set: str,
    status: int,
    body: bytes,
    *,
    retry_after: str | None,
    fetched_at: float,
    now: float,
) -> AccessToken:
    """An answer of ``GET /v1/tokens/{id}`` as an :class:`AccessToken`, or the
    :class:`TokenUnavailable` it means. The body of a 200 holds the token: never quoted."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    fields: dict[str, Any] = data if isinstance(data, dict) else {}
    if status == 200:
        value = fields.get("access_token")
        if not isinstance(value, str) or not value:
            raise TokenUnavailable(
                f"token set {token_set!r}: refresherd answered 200 without an access token",
                token_set=token_set,
                status=status,
                code="bad_answer",
            )
        expires_in = _number(fields.get("expires_in"))
        expires_at = _number(fields.get("expires_at"))
        lifetime = expires_in
        if lifetime is None and expires_at is not None:
            lifetime = expires_at - now
        token_type = fields.get("token_type")
        return AccessToken(
            token_set=token_set,
            value=value,
            token_type=token_type if isinstance(token_type, str) else "Bearer",
            expires_at=expires_at,
            lifetime=max(lifetime, 0.0) if lifetime is not None else None,
            fetched_at=fetched_at,
        )
    code = _text(fields.get("error"))
    reason = _text(fields.get("reason"))
    detail = _text(fields.get("message"))
    explanation = _EXPLANATIONS.get(code or "")
    if explanation is None:
        explanation = f"was not served: {detail}" if detail else "was not served"
    said = (
        f"HTTP {status}" + (f" {code}" if code else "") + (f", reason {reason}" if reason else "")
    )
    wait = _retry_after(retry_after)
    if wait is not None:
        said += f", retry after {wait:g}s"
    raise TokenUnavailable(
        f"token set {token_set!r} {explanation} (refresherd: {said})",
        token_set=token_set,
        status=status,
        code=code,
        reason=reason,
        detail=detail,
        retry_after=wait,
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (refresherd sends seconds, never an HTTP date)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
