"""One token set's access token, cached until shortly before it expires.

Thread-safe and task-safe: concurrent callers whose cache is empty or stale cause one request
to the sidecar (a lock for threads, an anyio lock for the tasks of an event loop: asyncio or
trio), and so do concurrent renewals after a 401 from the upstream API.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Final

import anyio

from refresherd.client.sidecar import AccessToken, Sidecar, TokenUnavailable

DEFAULT_MARGIN: Final = 60.0
DEFAULT_MARGIN_SHARE: Final = 0.5
DEFAULT_TTL_WITHOUT_EXPIRY: Final = 60.0
# The token API's answer to a forced refresh of a set refreshed moments ago (HTTP 429).
REFRESHED_RECENTLY: Final = "refreshed_recently"


def use_until(
    token: AccessToken, *, margin: float, margin_share: float, ttl_without_expiry: float
) -> float:
    """Until when (``time.monotonic()``) ``token`` is handed out without asking again.

    Its expiry minus ``margin`` seconds, or minus ``margin_share`` of its lifetime when that
    is less: a token with 30 s left is still used for 15 s rather than not at all. A token
    without an expiry is used for ``ttl_without_expiry``.
    """
    if token.lifetime is None:
        return token.fetched_at + ttl_without_expiry
    return token.fetched_at + token.lifetime - min(margin, margin_share * token.lifetime)


class SidecarTokens:
    """The access token of ``token_set``, from ``sidecar``, cached (see :func:`use_until`).

    :meth:`get` / :meth:`aget` hand out the cached token or fetch one; after the upstream API
    refused a token with a 401, :meth:`renew` / :meth:`arenew` ask the sidecar again (once for
    any number of callers that were refused meanwhile). Both raise
    :class:`~refresherd.client.TokenUnavailable` with refresherd's reason. Make one per token
    set and share it: the cache and the lock are per object.
    """

    def __init__(
        self,
        sidecar: Sidecar,
        token_set: str,
        *,
        margin: float = DEFAULT_MARGIN,
        margin_share: float = DEFAULT_MARGIN_SHARE,
        ttl_without_expiry: float = DEFAULT_TTL_WITHOUT_EXPIRY,
    ) -> None:
        if not isinstance(token_set, str) or not token_set:
            raise ValueError("SidecarTokens: token_set must be a non-empty string")
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"SidecarTokens: margin must be >= 0 seconds, got {margin}")
        if not 0 <= margin_share < 1:
            raise ValueError(
                f"SidecarTokens: margin_share must be at least 0 and below 1, got {margin_share}"
            )
        if not (ttl_without_expiry >= 0 and math.isfinite(ttl_without_expiry)):
            raise ValueError(
                f"SidecarTokens: ttl_without_expiry must be >= 0 seconds, got {ttl_without_expiry}"
            )
        self.sidecar = sidecar
        self.token_set = token_set
        self.margin = margin
        self.margin_share = margin_share
        self.ttl_without_expiry = ttl_without_expiry
        # The token and its use-by time, swapped as one reference: readers take no lock.
        self._entry: tuple[AccessToken, float] | None = None
        self._lock = threading.Lock()
        # Made at the first async use, inside the event loop it serves (anyio before 4.5 can
        # make none outside one).
        self._async_lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return (
            f"SidecarTokens({self.sidecar!r}, {self.token_set!r}, margin={self.margin:g}, "
            f"margin_share={self.margin_share:g})"
        )

    @property
    def cached(self) -> AccessToken | None:
        """The token handed out now without asking the sidecar, if any."""
        entry = self._entry
        return entry[0] if entry is not None and time.monotonic() < entry[1] else None

    def get(self) -> str:
        """The access token: cached, or fetched (one fetch for all threads that wait)."""
        if (token := self.cached) is not None:
            return token.value
        with self._lock:
            if (token := self.cached) is not None:
                return token.value  # fetched by the thread we waited for
            return self._keep(self.sidecar.fetch(self.token_set))

    def renew(self, rejected: str) -> str:
        """The access token after the upstream API refused ``rejected``: refresherd refreshes
        the set now (``POST /v1/tokens/{id}/refresh``), unless another caller renewed since or
        refresherd's current token is another one already. The same value back means there is
        nothing newer."""
        asked = time.monotonic()
        with self._lock:
            if (fresh := self._renewed_since(rejected, asked)) is not None:
                return fresh
            try:
                return self._keep(self.sidecar.refresh(self.token_set, rejected))
            except TokenUnavailable as exc:
                if exc.code != REFRESHED_RECENTLY:
                    raise
                return rejected  # refreshed moments ago: nothing newer to try

    async def aget(self) -> str:
        """:meth:`get` for asyncio and trio: one fetch in flight for all tasks that wait."""
        if (token := self.cached) is not None:
            return token.value
        async with self._get_async_lock():
            if (token := self.cached) is not None:
                return token.value
            return self._keep(await self.sidecar.afetch(self.token_set))

    async def arenew(self, rejected: str) -> str:
        """:meth:`renew` for asyncio and trio."""
        asked = time.monotonic()
        async with self._get_async_lock():
            if (fresh := self._renewed_since(rejected, asked)) is not None:
                return fresh
            try:
                return self._keep(await self.sidecar.arefresh(self.token_set, rejected))
            except TokenUnavailable as exc:
                if exc.code != REFRESHED_RECENTLY:
                    raise
                return rejected

    # ---- internals ---------------------------------------------------------------------------

    def _renewed_since(self, rejected: str, asked: float) -> str | None:
        """The cached token if it answers a renewal asked at ``asked``: another one than the
        refused (someone renewed already) or fetched after ``asked`` (on our behalf)."""
        entry = self._entry
        if entry is None or time.monotonic() >= entry[1]:
            return None
        token = entry[0]
        return token.value if token.value != rejected or token.fetched_at >= asked else None

    def _keep(self, token: AccessToken) -> str:
        until = use_until(
            token,
            margin=self.margin,
            margin_share=self.margin_share,
            ttl_without_expiry=self.ttl_without_expiry,
        )
        self._entry = (token, until)
        return token.value

    def _get_async_lock(self) -> anyio.Lock:
        # No await between the test and the assignment: tasks of one loop cannot race here.
        if self._async_lock is None:
            self._async_lock = anyio.Lock()
        return self._async_lock
