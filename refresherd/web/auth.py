"""The token API's bearer check: an ASGI middleware in front of every route of the one app."""

from __future__ import annotations

import hmac
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from refresherd.model import Secret
from refresherd.web.app import JSON, error

API_PREFIX: Final = "/v1/"
_SCHEME: Final = b"bearer"


class BearerCheck:
    """Who may use the API: ``Authorization: Bearer <token>``, and over TCP only if ``tcp``.

    The scheme is matched case-insensitively (``bearer``, ``BEARER``: RFC 9110 §11.1), followed
    by one or more spaces (§11.4); the token is compared in constant time. With ``tcp = false``
    the API is answered only on the unix socket (404 over TCP).
    """

    def __init__(self, *, bearer: Secret, tcp: bool) -> None:
        self._expected = bearer.reveal().encode()
        self._tcp = tcp

    def refusal(self, scope: Scope) -> JSON | None:
        """The answer that refuses this /v1 request, or None if it may go on."""
        server = scope.get("server")
        over_tcp = server is not None and server[1] is not None
        if over_tcp and not self._tcp:
            return error(404, "not_found", "the API is served on the unix socket only")
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if not self._accepts(given):
            return error(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer ...' header is required",
                headers={"www-authenticate": 'Bearer realm="refresherd"'},
            )
        return None

    def _accepts(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        # The token is compared whatever the scheme, so that the time taken says nothing
        # about which part was wrong.
        token_ok = hmac.compare_digest(token.lstrip(b" "), self._expected)
        return scheme.lower() == _SCHEME and token_ok


class BearerAuth:
    """ASGI middleware: every /v1 request passes :class:`BearerCheck` (``check``) or is
    refused. /metrics, /healthz, /readyz and /openapi.json stay open."""

    def __init__(self, app: ASGIApp, *, check: BearerCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            refusal = self.check.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
