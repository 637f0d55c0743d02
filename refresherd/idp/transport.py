"""The HTTP under a token endpoint: one provider's aiohttp session and where a request stopped.

HTTP is aiohttp's: at the 20-60 requests in flight that 1M token sets need against an IdP
50-150 ms away, httpx's pool costs 6-30x more CPU per request (docs/benchmarks.md). Its
exceptions are classified here, not by an adapter: whether the request may have left
(:class:`NotSent` vs :class:`Ambiguous`) must follow from where aiohttp failed, and nothing
else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError

from refresherd import deadlines
from refresherd.idp.failures import Ambiguous, FailureReason, NotSent

MAX_BODY_BYTES: Final = 1024 * 1024
USER_AGENT: Final = "refresherd/0.1"
# How much sooner than the request's deadline a wait for a connection gives up (NotSent).
CONNECT_MARGIN: Final = 0.25


class Transport:
    """One provider's pool of at most ``max_connections`` connections to its IdP (0: no limit
    of its own), and one POST at a time through it: the status, headers and body of the
    answer, or :class:`NotSent` / :class:`Ambiguous` saying whether the request may have
    left."""

    def __init__(self, *, max_connections: int, connect_timeout: float) -> None:
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        # Made at first use: an aiohttp session belongs to the event loop that runs it.
        self._session: aiohttp.ClientSession | None = None
        # A request's aiohttp timeouts by its timeout, where no leave_by shortens them: the
        # same few values for every refresh, made once (they are immutable).
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the token endpoint is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
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
                # Ours is the only overall deadline (deadlines.fail_after in post).
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        timeout: float,
        leave_by: float | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """POST ``body`` and read the whole answer within ``timeout`` seconds. ``leave_by``:
        seconds within which the request must get its connection and leave, or not go at all
        (NotSent)."""
        if leave_by is None:
            client_timeout = self._timeouts.get(timeout)
            if client_timeout is None:
                if len(self._timeouts) > 64:  # timeouts come from config: a handful
                    self._timeouts.clear()
                client_timeout = self._timeouts[timeout] = self._client_timeout(timeout, None)
        elif leave_by <= 0:
            raise NotSent(
                FailureReason.CONNECT_ERROR, "no time left to send inside the grace window"
            )
        else:
            client_timeout = self._client_timeout(timeout, leave_by)
        session = self._open()
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
            raise NotSent(
                FailureReason.CONNECT_ERROR, f"cannot connect: {type(exc).__name__}"
            ) from None
        except (aiohttp.NonHttpUrlClientError, aiohttp.InvalidUrlClientError):
            raise NotSent(
                FailureReason.CONNECT_ERROR, "unsupported protocol in token_url"
            ) from None
        except _BodyTooLarge:
            raise Ambiguous(
                FailureReason.MALFORMED_RESPONSE, f"response body over {MAX_BODY_BYTES} bytes"
            ) from None
        except TimeoutError:
            raise Ambiguous(FailureReason.TIMEOUT, f"no answer within {timeout:.1f}s") from None
        except _Undecodable:
            raise Ambiguous(
                FailureReason.MALFORMED_RESPONSE,
                "cannot decode the response body (Content-Encoding)",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Anything else once the request may have left: unknown outcome.
            raise Ambiguous(
                FailureReason.NETWORK_ERROR, f"connection failed: {type(exc).__name__}"
            ) from None

    def _client_timeout(self, timeout: float, leave_by: float | None) -> aiohttp.ClientTimeout:
        connect = max(timeout - CONNECT_MARGIN, timeout / 2)
        if leave_by is not None:
            connect = min(connect, leave_by)
        return aiohttp.ClientTimeout(
            total=None,
            # aiohttp's "connect" covers waiting for a pooled connection too; both end before
            # anything is sent, so it ends a little before the overall deadline (or when the
            # request may no longer leave): a wait that sent nothing is then NotSent, not
            # Ambiguous.
            connect=connect,
            sock_connect=min(self.connect_timeout, timeout, connect),
            # No read timeout of aiohttp's own: see the deadline below.
            sock_read=None,
        )

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
