"""An ``httpx.Auth`` that sends a token set's access token, from the refresherd sidecar.

For ``httpx.Client`` and ``httpx.AsyncClient`` alike (on asyncio and trio). On a 401 from the
upstream API it asks the sidecar once more and, if that gives another token, sends the request
once more with it; a second 401 is the answer. A body httpx cannot send twice (a stream, a
multipart upload) is not re-sent: its 401 is the answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from refresherd.client.tokens import SidecarTokens


class SidecarAuth(httpx.Auth):
    """``httpx.Client(auth=SidecarAuth(tokens))``: ``Authorization: Bearer`` from ``tokens``."""

    def __init__(self, tokens: SidecarTokens) -> None:
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"SidecarAuth({self.tokens!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        token = self.tokens.get()
        _authorize(request, token)
        response = yield request
        if response.status_code != 401 or not _resendable(request):
            return
        fresh = self.tokens.renew(token)
        if fresh == token:
            return  # refresherd has nothing newer: the 401 is the answer
        _authorize(request, fresh)
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.tokens.aget()
        _authorize(request, token)
        response = yield request
        if response.status_code != 401 or not _resendable(request):
            return
        fresh = await self.tokens.arenew(token)
        if fresh == token:
            return
        _authorize(request, fresh)
        yield request


def _authorize(request: httpx.Request, token: str) -> None:
    request.headers["Authorization"] = f"Bearer {token}"


def _resendable(request: httpx.Request) -> bool:
    # A body given as bytes, text, JSON or a form is held in memory (a ByteStream); an
    # iterator's is gone once sent.
    return isinstance(request.stream, httpx.ByteStream)
