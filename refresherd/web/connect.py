"""Connecting a customer over HTTP: the link (``POST /v1/tokens/{id}/connect``, behind the
bearer) and the IdP's answer (``GET`` and ``POST /connect/{provider}/callback``, public: the
customer's browser has no bearer).

The decisions are :mod:`refresherd.connect`'s; this module draws the secrets, keeps and takes
the state in the database (so any daemon of a fleet can answer the callback), exchanges the
code at the provider's token endpoint and stores the grant the way every grant is stored
(``Refresher.add_granted``: held in memory and retried while the database refuses it, never
dropped), queues ``token_set.connected``, counts ``refresherd_connections_total`` and sends
the browser on with ``303 See Other`` (a form_post answer becomes a GET) to an allow-listed
return address carrying the outcome and the token-set id only. A callback that cannot be tied
to a link of ours (no state, an unknown, used or foreign one) gets a small page of its own and
no redirect: there is nowhere trusted to send it. No code, state, verifier or token is logged,
put in a metric label or in a URL we send the browser to.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from refresherd import connect
from refresherd.clock import Clock
from refresherd.connect import Exchange, Finish, LinkRefused, Outcome, PendingConnection, Refusal
from refresherd.events import EventQueue
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.idp.failures import EndpointError
from refresherd.intake import token_set_from_json
from refresherd.logs import exception_fields, get_logger
from refresherd.metrics import Metrics
from refresherd.model import Grant, rfc3339
from refresherd.refresh.grants import authorized_again
from refresherd.refresh.providers import Providers
from refresherd.refresh.refresher import Refresher
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ApiConfig, ProviderConfig
from refresherd.store import NewTokenSet, StoreError, TokenStore
from refresherd.web.app import JSON, error, json_body

log = get_logger("refresherd.web.connect")

# An answer posted by the IdP (form_post) is a code and a state: a few kilobytes at most.
MAX_FORM: Final = 16 * 1024
# Headers of every page and redirect of the callback: nothing cached, the callback's URL (which
# holds the code and state) never sent on as a Referer, no script, no framing.
_PAGE_HEADERS: Final = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
}


async def issue_link(
    store: TokenStore, provider: ProviderConfig, request: connect.LinkRequest, *, now: float
) -> connect.Link:
    """A link for ``request``: its state and PKCE verifier drawn from :mod:`secrets`, its
    pending connection kept in the database. :class:`LinkRefused` says why there is none;
    StoreError when the database does not answer (nothing is kept then)."""
    current = await store.get(request.token_set_id)
    link = connect.plan_link(
        provider,
        request,
        current=current,
        state=secrets.token_urlsafe(connect.STATE_BYTES),
        verifier=secrets.token_urlsafe(connect.VERIFIER_BYTES),
        now=now,
    )
    await store.add_connect_state(link.pending)
    return link


def link_json(link: connect.Link) -> dict[str, object]:
    """What the API answers for a link (the CLI prints the same)."""
    pending = link.pending
    return {
        "authorization_url": link.url,
        "id": pending.token_set_id,
        "provider": pending.provider,
        "reconnect": link.reconnect,
        "redirect_uri": pending.redirect_uri,
        "return_url": pending.return_url,
        "expires_at": pending.expires_at,
        "expires_at_rfc3339": rfc3339(pending.expires_at),
    }


class ConnectRoutes:
    """The link (for the token API's routes) and the public callback; see the module
    docstring."""

    def __init__(
        self,
        *,
        store: TokenStore,
        refresher: Refresher,
        providers: Providers,
        storage: StorageWatch,
        events: EventQueue,
        metrics: Metrics,
        config: ApiConfig,
        clock: Clock,
        wake: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.refresher = refresher
        self.providers = providers
        self.storage = storage
        self.events = events
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.wake = wake
        self.rng = rng or random.Random()

    def link_routes(self) -> list[BaseRoute]:
        """Behind the bearer, with the token API."""
        return [Route("/v1/tokens/{id}/connect", self.link, methods=["POST"])]

    def callback_routes(self) -> list[BaseRoute]:
        """Public: the browser comes back here from the IdP."""
        return [Route(connect.callback_path("{provider}"), self.callback, methods=["GET", "POST"])]

    # ---- POST /v1/tokens/{id}/connect ------------------------------------------------------

    async def link(self, request: Request) -> Response:
        data = await json_body(request)
        if isinstance(data, Response):
            return data
        try:
            asked = connect.link_request_from_json(data, token_set_id=request.path_params["id"])
        except LinkRefused as exc:
            return error(400, exc.code, exc.message)
        provider = self.providers.config(asked.provider)
        if provider is None:
            known = ", ".join(sorted(self.providers))
            return error(
                400,
                "unknown_provider",
                f"provider {asked.provider!r} is not configured (known: {known})",
            )
        try:
            made = await issue_link(self.store, provider, asked, now=self.clock.wall())
        except LinkRefused as exc:
            return error(409 if exc.code == "exists" else 400, exc.code, exc.message)
        except StoreError:
            return error(503, "storage_unavailable", "the database is not answering")
        self.metrics.connect_links.labels(provider.name).inc()
        log.info(
            "connect link issued",
            token_set=asked.token_set_id,
            provider=provider.name,
            reconnect=made.reconnect,
            expires_at=rfc3339(made.pending.expires_at),
        )
        return JSON(link_json(made), 201)

    # ---- GET|POST /connect/{provider}/callback ---------------------------------------------

    async def callback(self, request: Request) -> Response:
        provider = self.providers.config(request.path_params["provider"])
        if provider is None or provider.connect is None:
            return _page(404, "Not found", "There is no such connection here.")
        pairs = await _answer_pairs(request)
        answer = (
            connect.read_callback(pairs)
            if pairs is not None
            else connect.Refused(Refusal.UNREADABLE)
        )
        if isinstance(answer, connect.Refused):
            return self._refused(provider, answer.reason)
        if self.storage.paused:
            # Nothing is taken, so nothing is lost: the same answer works once the database
            # takes writes again (a reload of the page sends it again).
            self.metrics.connections.labels(provider.name, "storage_unavailable").inc()
            return _page(
                503,
                "Try again",
                "The connection cannot be saved right now. Nothing was used: reload this page "
                "in a minute.",
            )
        digest = connect.lookup_digest(answer)
        try:
            pending = await self.store.take_connect_state(digest) if digest else None
        except StoreError as exc:
            self.storage.failed(exc, during="connect callback")
            self.metrics.connections.labels(provider.name, "storage_unavailable").inc()
            return _page(
                503, "Try again", "The connection cannot be checked right now. Reload this page."
            )
        decision = connect.decide_callback(
            answer, pending, provider=provider, now=self.clock.wall()
        )
        if isinstance(decision, connect.Refused):
            return self._refused(provider, decision.reason)
        assert pending is not None
        if isinstance(decision, Finish):
            self._count(provider, decision.outcome, pending, decision.detail)
            return self._send_back(pending, provider, decision.outcome)
        return await self._exchange(pending, provider, decision)

    def _refused(self, provider: ProviderConfig, reason: Refusal) -> Response:
        self.metrics.connections.labels(provider.name, reason.value).inc()
        log.warning("connect callback refused", provider=provider.name, reason=reason.value)
        return _page(*connect.refusal_page(reason))

    def _count(
        self, provider: ProviderConfig, outcome: Outcome, pending: PendingConnection, detail: str
    ) -> None:
        """The one metric and log line of a connection's end (connected ones are logged where
        they are stored)."""
        self.metrics.connections.labels(provider.name, outcome.value).inc()
        if outcome not in connect.CONNECTED_OUTCOMES:
            log.warning(
                "customer not connected",
                token_set=pending.token_set_id,
                provider=provider.name,
                outcome=outcome.value,
                detail=detail,
            )

    def _send_back(
        self, pending: PendingConnection, provider: ProviderConfig, outcome: Outcome
    ) -> Response:
        destination = connect.return_destination(pending, provider)
        if destination is None:
            return _page(*connect.outcome_page(outcome), outcome=outcome)
        url = connect.finish_url(destination, outcome, pending.token_set_id)
        return RedirectResponse(url, status_code=303, headers=_PAGE_HEADERS)

    async def _exchange(
        self, pending: PendingConnection, provider: ProviderConfig, exchange: Exchange
    ) -> Response:
        endpoint = self.providers.endpoint(provider.name)
        if endpoint is None:  # a reload dropped it between the two lookups
            self._count(provider, Outcome.PROVIDER_UNAVAILABLE, pending, "provider removed")
            return self._send_back(pending, provider, Outcome.PROVIDER_UNAVAILABLE)
        job = _Job(pending=pending, provider=provider, endpoint=endpoint, exchange=exchange)
        # The exchange and the grant's storage run where the browser cannot cancel them: once
        # the code is spent, a browser that goes away must not cost the grant.
        if not self.refresher.detach(
            functools.partial(self._run, job), name=f"connect {pending.token_set_id}"
        ):
            self._count(provider, Outcome.PROVIDER_UNAVAILABLE, pending, "shutting down")
            return self._send_back(pending, provider, Outcome.PROVIDER_UNAVAILABLE)
        job.waiting = True
        try:
            # The provider's answer is waited for (bounded by its request_timeout); its
            # storage, for wait_timeout: after that the grant is held and the outcome pending.
            await job.exchanged.wait()
            with anyio.move_on_after(self.config.wait_timeout):
                await job.done.wait()
        except BaseException:
            if job.error is not None:
                _log_failure(job, job.error)
            raise
        finally:
            job.waiting = False
        if job.error is not None:
            raise job.error  # logged once, scrubbed, by web.app.HandlerFailures
        return self._send_back(pending, provider, job.outcome or Outcome.PENDING)

    async def _run(self, job: _Job) -> None:
        """In the refresher's flight group: shutdown waits for it (the provider's
        request_timeout, then the grant's hold, refresh.grants.PERSIST_DEADLINE)."""
        try:
            with anyio.CancelScope(shield=True):
                job.outcome = await self._exchange_and_store(job)
        except Exception as exc:
            if job.waiting:
                job.error = exc
            else:
                _log_failure(job, exc)
        finally:
            job.exchanged.set()
            job.done.set()

    async def _exchange_and_store(self, job: _Job) -> Outcome:
        pending, provider = job.pending, job.provider
        try:
            grant = await job.endpoint.exchange_code(
                job.exchange.code,
                redirect_uri=job.exchange.redirect_uri,
                code_verifier=job.exchange.code_verifier,
                timeout=provider.request_timeout,
            )
        except EndpointError as exc:
            outcome = connect.exchange_failure_outcome(exc.kind)
            self._count(provider, outcome, pending, f"{exc.failure.reason}: {exc.failure.detail}")
            return outcome
        now = self.clock.wall()
        try:
            new = self._new_token_set(grant, pending, provider, now)
        except ValueError as exc:
            self._count(provider, Outcome.EXCHANGE_FAILED, pending, f"token response: {exc}")
            return Outcome.EXCHANGE_FAILED
        job.exchanged.set()
        try:
            stored = await self.refresher.add_granted(new, now=now, reauthorize=True)
        except StoreError:
            # Held for as long as a running daemon could (Refresher.add_granted): lost, said so.
            self._count(provider, Outcome.STORAGE_ERROR, pending, "the database refused it")
            return Outcome.STORAGE_ERROR
        if stored is None:
            # Another set took the id meanwhile (not an invalidated one of this provider): it
            # is kept, ours discarded and not revoked (web.tokens explains why).
            self._count(
                provider,
                Outcome.EXISTS,
                pending,
                "a token set with this id was added meanwhile; the new grant is discarded, its "
                "refresh token stays live at the provider, unused, until it expires",
            )
            return Outcome.EXISTS
        outcome = Outcome.RECONNECTED if authorized_again(stored, now) else Outcome.CONNECTED
        self.wake()
        self._count(provider, outcome, pending, "")
        log.info(
            "customer connected",
            token_set=stored.id,
            provider=provider.name,
            outcome=outcome.value,
            version=stored.version,
        )
        # The customer's browser first: it waits on the outcome, not on the hook's queue.
        job.outcome = outcome
        job.done.set()
        await self.events.enqueue(
            "token_set.connected",
            stored.id,
            provider.name,
            reconnected=outcome is Outcome.RECONNECTED,
            version=stored.version,
            via="link",
        )
        return outcome

    def _new_token_set(
        self, grant: Grant, pending: PendingConnection, provider: ProviderConfig, now: float
    ) -> NewTokenSet:
        """The grant as a token response, read by the parser `tokens add` uses. Its absolute
        refresh-token expiry is fixed now where the provider states a lifetime: a new
        authorization counts from now, also for a set authorized again in place (whose
        created_at stays)."""
        response: dict[str, object] = {
            "access_token": grant.access_token.reveal(),
            "token_type": grant.token_type,
            "refresh_token": grant.refresh_token.reveal() if grant.refresh_token else None,
        }
        if grant.expires_in is not None:
            response["expires_in"] = grant.expires_in
        if grant.scope is not None:
            response["scope"] = grant.scope
        if grant.refresh_expires_in is not None:
            response["refresh_token_expires_in"] = grant.refresh_expires_in
        new = token_set_from_json(
            response,
            token_set_id=pending.token_set_id,
            provider=provider.name,
            now=now,
            schedule=self.providers.schedule,
            rand=self.rng.random(),
        )
        if new.refresh_expires_at is None and provider.refresh_token_lifetime is not None:
            new = dataclasses.replace(new, refresh_expires_at=now + provider.refresh_token_lifetime)
        return new


@dataclass(slots=True)
class _Job:
    """One callback's exchange, from the request to the task that runs it."""

    pending: PendingConnection
    provider: ProviderConfig
    endpoint: TokenEndpoint
    exchange: Exchange
    outcome: Outcome | None = None
    error: Exception | None = None
    waiting: bool = False
    exchanged: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


def _log_failure(job: _Job, exc: Exception) -> None:
    """An unexpected error of an exchange no request waits for any more, scrubbed."""
    verifier = job.exchange.code_verifier
    log.error(
        "connect exchange failed",
        token_set=job.pending.token_set_id,
        provider=job.provider.name,
        **exception_fields(
            exc, [job.exchange.code.reveal(), verifier.reveal() if verifier else ""]
        ),
    )


async def _answer_pairs(request: Request) -> list[tuple[str, str]] | None:
    """The IdP's answer: the query of a GET, the form of a POST (form_post); None when a POST
    is not a small urlencoded form."""
    if request.method == "GET":
        return list(request.query_params.multi_items())
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return None
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):  # not UTF-8, or too many fields
        return None


def _page(status: int, title: str, text: str, *, outcome: Outcome | None = None) -> Response:
    """A small page of refresherd's own where the browser cannot be sent back."""
    meta = (
        f'<meta name="refresherd-outcome" content="{outcome.value}">' if outcome is not None else ""
    )
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(text)}</p></body></html>\n"
    )
    return HTMLResponse(body, status_code=status, headers=_PAGE_HEADERS)
