"""What ``GET /v1/tokens/ID`` answers, kept in memory and kept true by the database.

A read of a token set that is fresh costs no database round trip: its answer (the JSON body
but for ``expires_in``, which is worked out per request) is kept here, per process, at most
``[api] cache_size`` of them (least recently read first out). The store's change feed
(:class:`refresherd.store.ChangeFeed`) keeps them true: the database itself records every
change to what GET answers, whoever makes it (this process's refresher, API or storage code,
a worker, another daemon of a fleet, the CLI, an operator's SQL), so there is no write path
to forget. Before an answer leaves memory:

- the feed is asked whether anything can have been committed since its last catch-up
  (SQLite: ``PRAGMA data_version``, no round trip); if so, a catch-up reads which token sets
  changed, and drops them, before any waiting read answers. Reads arriving together share one
  catch-up; a read waits for one that began after it arrived, so a commit that came before
  the read is always seen;
- the entry must still be servable now: before its planned refresh and its expiry, exactly
  where ``policy.access_decision`` says Serve. Anything else (due, expired, failing,
  invalidated, unknown) goes the way it always went: the database, the refresher.

A read that went to the database remembers what it read, unless a catch-up that dropped that
token set was applied while it read (it may have read the old row). docs/architecture.md
("Token API") has the whole argument. Token values here are bytes of a JSON body; neither an
entry nor the cache shows them in a repr.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any, Final

import anyio
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from refresherd import policy
from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import TokenSet, rfc3339
from refresherd.store import ChangeFeed, StoreError
from refresherd.web.app import render_json
from refresherd.web.auth import BearerCheck

log = get_logger("refresherd.web.token_cache")

DEFAULT_SIZE: Final = 10_000
# Catch-ups remembered for reads that were under way while they were applied (a read takes
# milliseconds; more catch-ups than this meanwhile, and its row is not kept).
RECENT_CATCH_UPS: Final = 64
# Stands for expires_in in a rendered body, split out to put the number in per request.
_MARK: Final = "\x00expires_in\x00"
_MARK_JSON: Final = json.dumps(_MARK).encode()


def token_json(ts: TokenSet, now: float) -> dict[str, Any]:
    """What GET returns: the access token and its expiry (never the refresh token)."""
    return {
        "id": ts.id,
        "provider": ts.provider,
        "access_token": ts.access_token.reveal() if ts.access_token is not None else None,
        "token_type": ts.token_type or "Bearer",
        "scope": ts.scope,
        "expires_at": ts.expires_at,
        "expires_at_rfc3339": rfc3339(ts.expires_at),
        "expires_in": max(int(ts.expires_at - now), 0) if ts.expires_at is not None else None,
        "state": ts.state.value,
    }


class CachedAnswer:
    """One token set's answer: the body around ``expires_in``, and until when it may be
    served (its planned refresh and its expiry). ``version`` and ``state`` are the stored
    set's, for tests and debugging."""

    __slots__ = (
        "_body",
        "_expires_in",
        "expires_at",
        "head",
        "next_refresh_at",
        "state",
        "tail",
        "version",
    )

    def __init__(self, ts: TokenSet) -> None:
        body = token_json(ts, 0.0)
        if ts.expires_at is not None:
            body["expires_in"] = _MARK
        rendered = render_json(body)
        head, _, tail = rendered.partition(_MARK_JSON)
        if ts.expires_at is not None and _MARK_JSON in tail:
            raise ValueError("the mark is in a value")  # cannot be, unless a token holds it
        self.head = head
        self.tail = tail
        self.expires_at = ts.expires_at
        self.next_refresh_at = ts.next_refresh_at
        self.version = ts.version
        self.state = ts.state
        # The last body made, and its expires_in: the next second's reads send it as it is.
        self._expires_in = -1
        self._body = head

    def __repr__(self) -> str:
        return f"<CachedAnswer version={self.version} state={self.state.value}>"

    def servable(self, now: float) -> bool:
        """policy.access_decision's Serve for the set as stored, at ``now``."""
        return now < self.next_refresh_at and (self.expires_at is None or now < self.expires_at)

    def body(self, now: float) -> bytes:
        if self.expires_at is None:
            return self.head
        expires_in = max(int(self.expires_at - now), 0)
        if expires_in != self._expires_in:
            self._body = self.head + str(expires_in).encode() + self.tail
            self._expires_in = expires_in
        return self._body


class _ReadCounts(Collector):
    """refresherd_api_token_reads_total{result}: the cache's own counts, at each scrape."""

    def __init__(self, cache: TokenCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "refresherd_api_token_reads",
            "GET /v1/tokens/ID answers looked up in memory (the token cache), by whether "
            "memory had a fresh answer (hit) or the database was read (miss).",
            labels=["result"],
        )
        family.add_metric(["hit"], self._cache.hits)
        family.add_metric(["miss"], self._cache.misses)
        yield family


class TokenCache:
    """See the module docstring. One per process, with the store's change feed."""

    def __init__(
        self, feed: ChangeFeed, *, size: int = DEFAULT_SIZE, metrics: Metrics | None = None
    ) -> None:
        self._feed = feed
        self._size = size
        metrics = metrics or Metrics()
        # Counted here, shown by _ReadCounts: a Counter's lock per GET was a tenth of its cost.
        self.hits = 0
        self.misses = 0
        metrics.registry.register(_ReadCounts(self))
        self._catch_ups = metrics.api_token_cache_catch_ups
        self._answers: OrderedDict[str, CachedAnswer] = OrderedDict()
        # Catch-ups numbered as they start; the last one finished; the one under way.
        self._started = 0
        self._finished = 0
        self._running: anyio.Event | None = None
        # Bumped for every catch-up that dropped something, with what it dropped (None: all).
        self._generation = 0
        self._recent: deque[frozenset[str] | None] = deque(maxlen=RECENT_CATCH_UPS)

    def __repr__(self) -> str:
        return f"<TokenCache {len(self._answers)}/{self._size} answers>"

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def generation(self) -> int:
        """Taken before a read of the database, handed back to :meth:`remember` after it."""
        return self._generation

    async def answer(self, token_set_id: str, now: float) -> bytes | None:
        """The body to answer with from memory, or None: go to the database. Reflects every
        commit that came before this turn of the event loop began (before the request that
        asks was read; SqliteChangeFeed.quiet)."""
        if self._size <= 0:
            return None
        if not self._feed.quiet():
            await self._catch_up()
        entry = self._answers.get(token_set_id)
        if entry is None or not entry.servable(now):
            self.misses += 1
            return None
        self._answers.move_to_end(token_set_id)
        self.hits += 1
        return entry.body(now)

    def remember(self, ts: TokenSet, generation: int, now: float) -> None:
        """Keep the answer of ``ts``, read from the database after :attr:`generation` was
        ``generation``, if it is one to serve from memory and nothing dropped it meanwhile."""
        if self._size <= 0 or not isinstance(policy.access_decision(ts, now=now), policy.Serve):
            return
        since = self._generation - generation
        if since:
            if since > len(self._recent):
                return
            for dropped in list(self._recent)[-since:]:
                if dropped is None or ts.id in dropped:
                    return
        try:
            entry = CachedAnswer(ts)
        except ValueError:
            return
        self._answers[ts.id] = entry
        self._answers.move_to_end(ts.id)
        while len(self._answers) > self._size:
            self._answers.popitem(last=False)

    async def _catch_up(self) -> None:
        """Return once a catch-up that began after the call has been applied (or has failed,
        and the cache is empty)."""
        ticket = self._started
        while self._finished <= ticket:
            if self._running is not None:
                await self._running.wait()
                # Nothing committed since that catch-up began, so none since this read came.
                if self._feed.quiet():
                    return
                continue
            self._started += 1
            number = self._started
            self._running = done = anyio.Event()
            try:
                # Shielded: a reader that gives up must not leave the others waiting on a
                # catch-up nobody finishes, nor a feed half moved on.
                with anyio.CancelScope(shield=True):
                    try:
                        changed = await self._feed.catch_up()
                    except StoreError as exc:
                        log.warning(
                            "token cache emptied: the database did not answer", error=str(exc)
                        )
                        changed = None
                    self._drop(changed)
                    self._catch_ups.inc()
            finally:
                self._finished = number
                self._running = None
                done.set()

    def _drop(self, changed: frozenset[str] | None) -> None:
        if changed is None:
            self._answers.clear()
        elif not changed:
            return
        else:
            for token_set_id in changed:
                self._answers.pop(token_set_id, None)
        self._generation += 1
        self._recent.append(changed)


# The route of GET /v1/tokens/{id}, as Starlette matches it: an id is one path segment.
TOKEN_PATH: Final = "/v1/tokens/"
# What web.app.JSON sends with a body (content-length is added per body).
_HEADERS: Final = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
# Set in a request's scope once memory was asked: the route does not ask again.
ASKED: Final = "refresherd.token_cache.asked"


class FreshReads:
    """ASGI middleware in front of the whole app: a GET of a token set that memory answers is
    answered here, past the router and the rest of the stack, by the same bearer check
    (:class:`~refresherd.web.auth.BearerCheck`) and with the same bytes and headers as the
    route would send; everything else, a refused request included, goes on to ``app``."""

    def __init__(
        self, app: ASGIApp, *, cache: TokenCache, check: BearerCheck, clock: Clock
    ) -> None:
        self.app = app
        self.cache = cache
        self.check = check
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            token_set_id = path[len(TOKEN_PATH) :]
            if (
                path.startswith(TOKEN_PATH)
                and token_set_id
                and "/" not in token_set_id
                and self.check.refusal(scope) is None
            ):
                try:
                    body = await self.cache.answer(token_set_id, self.clock.wall())
                except Exception:
                    # Not expected: the route asks again inside HandlerFailures, which logs
                    # it scrubbed and answers the API's 500.
                    await self.app(scope, receive, send)
                    return
                if body is not None:
                    headers = [(b"content-length", str(len(body)).encode()), *_HEADERS]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
                scope[ASKED] = True
        await self.app(scope, receive, send)
