"""The token API (/v1/*): applications get a valid access token on demand.

Routes are Starlette routes mounted on the one app of :mod:`refresherd.web.app`, behind the
bearer check of :mod:`refresherd.web.auth`. A GET of a
token that is due (``policy.access_decision``) joins the refresher's single-flight refresh and
waits for it, bounded by ``api.wait_timeout``; the refresh itself flies in the refresher's own
task group, so a client that gives up never cancels it. Errors are JSON with a stable ``error``
code (see ``openapi.json``). No token value is ever logged.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from refresherd import policy
from refresherd.clock import Clock
from refresherd.connect import connect_refusal, reconnect_hint
from refresherd.events import EventQueue
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.idp.failures import ClientRejected, EndpointError, InvalidGrant
from refresherd.intake import token_set_from_json
from refresherd.logs import exception_fields, get_logger
from refresherd.model import Secret, State, TokenSet, rfc3339, validate_token_set_id
from refresherd.refresh.grants import authorized_again
from refresherd.refresh.outcome import Outcome
from refresherd.refresh.providers import Providers
from refresherd.refresh.refresher import Refresher
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ApiConfig, ProviderConfig
from refresherd.store import (
    ClaimRefused,
    NewTokenSet,
    StoreError,
    TokenSetExists,
    TokenStore,
)
from refresherd.web.app import JSON, error, json_body
from refresherd.web.token_cache import ASKED, TokenCache, token_json

log = get_logger("refresherd.web.tokens")

# While another process holds the lease, look for its result at this pace.
LEASE_POLL: Final = 0.1
# POST /v1/tokens/{id}/refresh refreshes a set at most this often: an upstream API that refuses
# even a fresh token (its clocks, its caches) would otherwise turn every retry of every client
# into a rotation at the IdP.
FORCED_REFRESH_MIN_INTERVAL: Final = 30.0
# As web.app.JSON sends it: an answer that holds a token is never cached on the way.
_NO_STORE: Final = {"cache-control": "no-store"}


def openapi_document() -> bytes:
    """The API's OpenAPI document, as shipped in the package (refresherd/openapi.json)."""
    return resources.files("refresherd").joinpath("openapi.json").read_bytes()


def summary_json(ts_id: str, provider: str, next_refresh_at: float) -> dict[str, Any]:
    return {
        "id": ts_id,
        "provider": provider,
        "next_refresh_at": next_refresh_at,
        "next_refresh_at_rfc3339": rfc3339(next_refresh_at),
    }


class TokenApi:
    def __init__(
        self,
        *,
        store: TokenStore,
        refresher: Refresher,
        providers: Providers,
        storage: StorageWatch,
        events: EventQueue,
        config: ApiConfig,
        clock: Clock,
        wake: Callable[[], None],
        rng: random.Random | None = None,
        cache: TokenCache | None = None,
    ) -> None:
        self.store = store
        # Fresh answers of GET in memory, kept true by the database's change feed; None: off.
        self.cache = cache
        self.refresher = refresher
        # Which providers exist, their endpoints (exchange, revocation) and the schedule a
        # registered set is planned by: live, a reload replaces them.
        self.providers = providers
        # Paused storage: a code is not spent while the database refuses writes.
        self.storage = storage
        # token_set.connected, for a set an exchange stored or authorized again.
        self.events = events
        self.config = config
        self.clock = clock
        self.wake = wake
        self.rng = rng or random.Random()
        # Ids with a code exchange under way here, from its check to its insert.
        self._exchanging: set[str] = set()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/openapi.json", self.openapi, methods=["GET", "HEAD"]),
            Route("/v1/tokens", self.register, methods=["POST"]),
            Route("/v1/tokens/{id}", self.get_token, methods=["GET"]),
            Route("/v1/tokens/{id}", self.delete_token, methods=["DELETE"]),
            Route("/v1/tokens/{id}/exchange", self.exchange, methods=["POST"]),
            Route("/v1/tokens/{id}/refresh", self.force_refresh, methods=["POST"]),
        ]

    async def openapi(self, request: Request) -> Response:
        return Response(openapi_document(), media_type="application/json")

    # ---- GET /v1/tokens/{id} ---------------------------------------------------------------

    async def get_token(self, request: Request) -> Response:
        token_set_id = request.path_params["id"]
        cache = self.cache
        generation = 0
        if cache is not None:
            # Asked already (FreshReads) and missed; else ask now.
            if not request.scope.get(ASKED):
                body = await cache.answer(token_set_id, self.clock.wall())
                if body is not None:
                    return Response(body, media_type="application/json", headers=_NO_STORE)
            generation = cache.generation
        try:
            ts = await self.store.read(token_set_id)
        except StoreError:
            return _storage_unavailable()
        if ts is None:
            return _unknown(token_set_id)
        now = self.clock.wall()
        decision = policy.access_decision(ts, now=now)
        if cache is not None:
            cache.remember(ts, generation, now)
        if isinstance(decision, policy.RefreshFirst):
            return await self._refresh_within_wait(ts)
        return self._answer(ts, decision, now)

    # ---- POST /v1/tokens/{id}/refresh ------------------------------------------------------

    async def force_refresh(self, request: Request) -> Response:
        """The upstream API refused the access token (a 401): refresh now and answer the new one.

        ``{"rejected": "<the access token refused>"}`` (optional, recommended): when the set's
        current access token is another one, someone refreshed since the caller fetched: that
        one is answered and nothing is sent to the IdP. A set refreshed less than
        FORCED_REFRESH_MIN_INTERVAL ago is not refreshed again: 429 with Retry-After (its
        fresh token was refused too; another rotation would not help). Concurrent calls share
        one refresh (single-flight)."""
        data: dict[str, Any] = {}
        if await request.body():
            body = await json_body(request)
            if isinstance(body, Response):
                return body
            data = body
        rejected = data.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            return _invalid("rejected must be a string: the access token the upstream refused")
        token_set_id = request.path_params["id"]
        try:
            ts = await self.store.get(token_set_id)
        except StoreError:
            return _storage_unavailable()
        if ts is None:
            return _unknown(token_set_id)
        now = self.clock.wall()
        decision = policy.access_decision(ts, now=now)
        if isinstance(decision, policy.NeedsAuthorization):
            return self._answer(ts, decision, now)
        if (
            rejected is not None
            and ts.access_token is not None
            and ts.access_token != Secret(rejected)
        ):
            return self._answer(ts, decision, now)
        if ts.last_refresh_at is not None:
            again_at = ts.last_refresh_at + FORCED_REFRESH_MIN_INTERVAL
            if now < again_at:
                return error(
                    429,
                    "refreshed_recently",
                    f"token set {ts.id!r} was refreshed {now - ts.last_refresh_at:.0f}s ago; "
                    f"a forced refresh is taken at most every "
                    f"{FORCED_REFRESH_MIN_INTERVAL:g}s",
                    retry_at=again_at,
                    headers={"retry-after": str(max(int(again_at - now) + 1, 1))},
                )
        return await self._refresh_within_wait(ts)

    async def _refresh_within_wait(self, ts: TokenSet) -> Response:
        """Refresh and answer, bounded by ``[api] wait_timeout`` (504 past it: the refresh
        goes on in the refresher's own task group)."""
        with anyio.move_on_after(self.config.wait_timeout):
            return await self._refresh_and_answer(ts)
        return error(
            504,
            "timeout",
            f"the refresh did not finish within {self.config.wait_timeout:g}s; "
            "it continues, ask again",
        )

    async def _refresh_and_answer(self, ts: TokenSet) -> Response:
        while True:
            result = await self.refresher.refresh(ts.id)
            if result.outcome is Outcome.LEASED:
                # Another daemon on this database is refreshing it: wait for its result.
                current = await self._wait_for_other_owner(ts)
                if current is None:
                    return _unknown(ts.id)
                if current.version != ts.version or current.state is State.INVALIDATED:
                    ts = current
                    break
                continue
            if result.outcome is Outcome.NOT_FOUND:
                return _unknown(ts.id)
            # A refresh this request joined may have been the scheduler's, which stores its
            # grant without reading the row back: then the row is read here.
            current_or_none = (
                result.token_set
                if result.ok and result.token_set is not None
                else await self._reread(ts.id, fallback=ts)
            )
            if current_or_none is None:
                return _unknown(ts.id)
            ts = current_or_none
            if not result.ok and ts.state is not State.INVALIDATED:
                now = self.clock.wall()
                if ts.access_token is not None and (ts.expires_at is None or ts.expires_at > now):
                    # The refresh failed but the token still works: better than nothing.
                    return JSON(token_json(ts, now))
                return error(
                    503,
                    "provider_unavailable",
                    "the identity provider could not refresh this token set now; "
                    "refresherd keeps retrying",
                    reason=result.reason,
                )
            break
        now = self.clock.wall()
        return self._answer(ts, policy.access_decision(ts, now=now), now)

    async def _wait_for_other_owner(self, ts: TokenSet) -> TokenSet | None:
        while True:
            await anyio.sleep(LEASE_POLL)
            current = await self._reread(ts.id, fallback=ts)
            if current is None:
                return None
            lease_free = current.lease_owner is None or (
                current.lease_until is not None and current.lease_until <= self.clock.wall()
            )
            if current.version != ts.version or current.state is State.INVALIDATED or lease_free:
                return current

    async def _reread(self, token_set_id: str, *, fallback: TokenSet) -> TokenSet | None:
        try:
            return await self.store.read(token_set_id)
        except StoreError:
            return fallback

    def _answer(self, ts: TokenSet, decision: policy.AccessDecision, now: float) -> Response:
        if isinstance(decision, policy.NeedsAuthorization):
            # The way back, where the provider is set up for connecting (refresherd.connect).
            hint = reconnect_hint(ts.id, self.providers.config(ts.provider))
            return error(
                409,
                "invalidated",
                "the identity provider refused this token set's refresh token: the customer "
                "must authorize again ("
                + (
                    "POST /v1/tokens/{id}/connect for a link"
                    if hint
                    else "then POST /v1/tokens/{id}/exchange with the new code"
                )
                + ")",
                reason=decision.reason,
                **({"reconnect": hint} if hint else {}),
            )
        if isinstance(decision, policy.Unavailable):
            return error(
                503,
                "provider_unavailable",
                "the access token has expired and refreshes are failing; refresherd retries "
                f"at {rfc3339(decision.retry_at)}",
                retry_at=decision.retry_at,
                headers={"retry-after": str(max(int(decision.retry_at - now) + 1, 1))},
            )
        expired = ts.access_token is None or (ts.expires_at is not None and ts.expires_at <= now)
        if isinstance(decision, policy.RefreshFirst) and expired:
            # Just refreshed and still expired: the IdP handed out a token already dead.
            return error(503, "provider_unavailable", "no valid access token after refresh")
        # Still inside the margin after a refresh: a lifetime shorter than the margin; serve.
        return JSON(token_json(ts, now))

    # ---- POST /v1/tokens -------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        data = await json_body(request)
        if isinstance(data, Response):
            return data
        token_set_id, provider = data.get("id"), data.get("provider")
        if not isinstance(token_set_id, str) or not isinstance(provider, str):
            return _invalid("id and provider are required strings")
        if provider not in self.providers:
            return _unknown_provider(provider, self.providers)
        if (busy := self._busy(token_set_id)) is not None:
            return busy
        now = self.clock.wall()
        try:
            new = self._new_token_set(data, token_set_id, provider, now)
        except ValueError as exc:
            return _invalid(str(exc))
        if (refused := await self._add(new, now, via="api")) is not None:
            return refused
        return JSON(summary_json(new.id, provider, new.next_refresh_at), 201)

    def _new_token_set(
        self, response: dict[str, Any], token_set_id: str, provider: str, now: float
    ) -> NewTokenSet:
        """A token response parsed as `tokens add` parses it; ValueError names what is wrong."""
        return token_set_from_json(
            response,
            token_set_id=token_set_id,
            provider=provider,
            now=now,
            schedule=self.providers.schedule,
            rand=self.rng.random(),
        )

    async def _add(self, new: NewTokenSet, now: float, *, via: str) -> Response | None:
        """Store a new set and wake the scheduler: None when stored, else the error answer."""
        try:
            await self.store.add(new, now=now)
        except TokenSetExists:
            return _exists(new.id)
        except StoreError:
            return _storage_unavailable()
        self.wake()
        log.info("token set registered", token_set=new.id, provider=new.provider, via=via)
        return None

    # ---- DELETE /v1/tokens/{id} ------------------------------------------------------------

    async def delete_token(self, request: Request) -> Response:
        token_set_id = request.path_params["id"]
        revoke_param = request.query_params.get("revoke", "false")
        if revoke_param not in ("true", "false"):
            return _invalid("revoke must be true or false")
        try:
            ts = await self.store.get(token_set_id)
        except StoreError:
            return _storage_unavailable()
        if ts is None:
            return _unknown(token_set_id)
        if revoke_param == "false":
            return await self._remove(ts, revoked=False)
        provider = self.providers.config(ts.provider)
        endpoint = self.providers.endpoint(ts.provider)
        if provider is None or endpoint is None or not provider.revocation_url:
            return error(
                400,
                "revocation_unsupported",
                f"provider {ts.provider!r} has no revocation_url; delete without "
                "?revoke=true, or configure one",
            )
        # Held against every refresh while revoking: a rotation meanwhile would leave the new
        # refresh token alive at the IdP after we revoked the old one and forgot the set.
        try:
            async with self.refresher.exclusive(token_set_id) as held:
                if isinstance(held, ClaimRefused):
                    if held.reason == "not_found":
                        return _unknown(token_set_id)
                    if held.reason == "leased":
                        return error(
                            409,
                            "busy",
                            "another refresherd process is refreshing this token set; try again",
                        )
                    # Invalidated: the IdP refuses this refresh token already.
                    return await self._remove(ts, revoked=False)
                try:
                    await endpoint.revoke(held.refresh_token, timeout=provider.request_timeout)
                except EndpointError as exc:
                    # Kept: a set deleted here but alive at the IdP would be lost to both.
                    log.warning(
                        "revocation failed, token set kept",
                        token_set=ts.id,
                        provider=ts.provider,
                        reason=exc.failure.reason,
                        detail=exc.failure.detail,
                    )
                    return error(
                        503,
                        "provider_unavailable",
                        "the revocation endpoint did not confirm; the token set is kept, try again",
                        reason=exc.failure.reason,
                    )
                return await self._remove(ts, revoked=True)
        except StoreError:
            return _storage_unavailable()

    async def _remove(self, ts: TokenSet, *, revoked: bool) -> Response:
        try:
            removed = await self.store.remove(ts.id)
        except StoreError:
            return _storage_unavailable()
        if not removed:
            return _unknown(ts.id)
        log.info("token set removed", token_set=ts.id, provider=ts.provider, revoked=revoked)
        return JSON({"id": ts.id, "removed": True, "revoked": revoked})

    # ---- POST /v1/tokens/{id}/exchange -----------------------------------------------------

    async def exchange(self, request: Request) -> Response:
        token_set_id = request.path_params["id"]
        try:
            validate_token_set_id(token_set_id)
        except ValueError as exc:
            return _invalid(str(exc))
        data = await json_body(request)
        if isinstance(data, Response):
            return data
        provider_name, code = data.get("provider"), data.get("code")
        redirect_uri, verifier = data.get("redirect_uri"), data.get("code_verifier")
        if not all(isinstance(v, str) and v for v in (provider_name, code, redirect_uri)):
            return _invalid("provider, code and redirect_uri are required non-empty strings")
        if verifier is not None and (not isinstance(verifier, str) or not verifier):
            return _invalid("code_verifier must be a non-empty string when given")
        assert isinstance(provider_name, str) and isinstance(code, str)
        assert isinstance(redirect_uri, str)
        provider = self.providers.config(provider_name)
        endpoint = self.providers.endpoint(provider_name)
        if provider is None or endpoint is None:
            return _unknown_provider(provider_name, self.providers)
        # Everything that can refuse the exchange does so before the code is spent: a code is
        # good only once.
        if (busy := self._busy(token_set_id)) is not None:
            return busy
        if self.storage.paused:
            # The grant would only be held in memory until the database takes writes again.
            return error(
                503,
                "storage_unavailable",
                "the database refuses writes; the code is not spent, try again later",
            )
        job = _Exchange(
            id=token_set_id,
            provider=provider,
            endpoint=endpoint,
            code=Secret(code),
            redirect_uri=redirect_uri,
            verifier=Secret(verifier) if isinstance(verifier, str) else None,
        )
        # Reserved from the check to the insert, so a second exchange of this id here (a double
        # submit) is refused before its code is spent; the job releases it when it ends.
        self._exchanging.add(token_set_id)
        started = False
        try:
            try:
                current = await self.store.get(token_set_id)
            except StoreError:
                return _storage_unavailable()
            # A new id, or one invalidated under this provider: the exchange authorizes it
            # again in place, as a connect link does (its id, history and created_at stay).
            if (refused := connect_refusal(current, provider_name)) is not None:
                return error(409, refused.code, f"{refused.message}; the code is not spent")
            # The exchange and the insert run where the request cannot cancel them: a client
            # that disconnects once the code is spent must not cost the grant.
            started = self.refresher.detach(
                functools.partial(self._run_exchange, job), name=f"exchange {token_set_id}"
            )
        finally:
            if not started:
                self._exchanging.discard(token_set_id)
        if not started:
            return error(
                503,
                "provider_unavailable",
                "refresherd is shutting down; the code is not spent, try again",
                reason="shutdown",
            )
        # The provider's answer is waited for (bounded by its request_timeout), so that every
        # refusal reaches the client; storing it, only for wait_timeout.
        job.waiting = True
        try:
            await job.exchanged.wait()
            with anyio.move_on_after(self.config.wait_timeout):
                await job.done.wait()
        except BaseException:
            if job.error is not None:  # it failed, for us to say, and we are cancelled
                _log_exchange_failure(job, job.error)
            raise
        finally:
            job.waiting = False
        if job.error is not None:
            # An unexpected error of the exchange fails this request: logged once, as every
            # handler's is (web.app.HandlerFailures), with the request's secrets scrubbed.
            raise job.error
        if job.answer is not None:
            return job.answer
        return JSON(
            {
                "id": token_set_id,
                "provider": provider_name,
                "held": True,
                "message": "the provider issued the grant; the database has not taken it yet, "
                "so refresherd holds it in memory and keeps trying (refresherd_unpersisted_grants)"
                ". GET /v1/tokens/{id} answers as before until it is stored (404 for a new "
                "set, 409 invalidated for one being authorized again). The code is spent: do "
                "not send it again.",
            },
            202,
        )

    def _busy(self, token_set_id: str) -> Response | None:
        if token_set_id not in self._exchanging:
            return None
        return error(
            409,
            "busy",
            f"an authorization code exchange for {token_set_id!r} is in progress (its grant may "
            "be held until the database takes it); nothing was done",
        )

    async def _run_exchange(self, job: _Exchange) -> None:
        """In the refresher's flight group (Refresher.detach): exchange the code, store the
        grant, put the answer in ``job``. Shielded: shutdown waits for it, bounded by the
        provider's request_timeout and the hold of the grant (refresh.grants.PERSIST_DEADLINE)."""
        try:
            with anyio.CancelScope(shield=True):
                job.answer = await self._exchange_and_store(job)
        except Exception as exc:
            if job.waiting:
                job.error = exc  # the request raises it
            else:
                _log_exchange_failure(job, exc)
        finally:
            self._exchanging.discard(job.id)
            job.exchanged.set()
            job.done.set()

    async def _exchange_and_store(self, job: _Exchange) -> Response:
        provider_name = job.provider.name
        try:
            grant = await job.endpoint.exchange_code(
                job.code,
                redirect_uri=job.redirect_uri,
                code_verifier=job.verifier,
                timeout=job.provider.request_timeout,
            )
        except EndpointError as exc:
            failure = exc.failure
            log.warning(
                "authorization code exchange failed",
                token_set=job.id,
                provider=provider_name,
                reason=failure.reason,
                detail=failure.detail,
            )
            if isinstance(exc, InvalidGrant):
                return error(
                    400,
                    "invalid_grant",
                    "the provider refused the code (used, expired, or redirect_uri or "
                    "code_verifier do not match)",
                )
            if isinstance(exc, ClientRejected):
                return error(
                    503, "provider_unavailable", "the provider refused our client credentials"
                )
            if failure.reason in ("oauth_error", "no_refresh_token"):
                return error(400, "exchange_refused", failure.detail)
            return error(
                503,
                "provider_unavailable",
                "the provider did not answer the exchange usably",
                reason=failure.reason,
            )
        # The grant as a token response, read by the same parser as `tokens add`.
        response: dict[str, Any] = {
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
        now = self.clock.wall()
        try:
            new = self._new_token_set(response, job.id, provider_name, now)
        except ValueError as exc:
            return error(502, "exchange_refused", f"the provider's token response: {exc}")
        job.exchanged.set()
        try:
            stored = await self.refresher.add_granted(new, now=now, reauthorize=True)
        except StoreError:
            # Held for as long as a running daemon could (Refresher.add_granted): lost, said so.
            return error(
                503,
                "storage_unavailable",
                "the database refused the new token set for too long; the code is spent: the "
                "customer must authorize again",
            )
        if stored is None:
            # Another set of this id was added between our check and our insert (another
            # daemon on this database, `tokens add`): it is as new as ours and may be in use
            # already, so it is kept, and ours is not stored. Nor is ours revoked: at IdPs that
            # revoke a user's whole grant or session with any one of its tokens (Google's
            # consent, Keycloak's client sessions), that would kill the kept set too, and one
            # id most likely means one user. Unused, ours lives out its own lifetime at the IdP,
            # like the spare token of a rotation whose answer was lost. Not silently: the client
            # and the log are told.
            log.warning(
                "exchanged grant discarded: a token set with this id was added meanwhile; its "
                "refresh token stays live at the provider, unused, until it expires",
                token_set=job.id,
                provider=provider_name,
            )
            return error(
                409,
                "exists",
                f"token set {job.id!r} was added or authorized again by someone else while the "
                "code was exchanged; "
                "that set is kept and the new grant discarded (the code is spent)",
                grant_discarded=True,
            )
        self.wake()
        reauthorized = authorized_again(stored, now)
        log.info(
            "token set authorized again" if reauthorized else "token set registered",
            token_set=job.id,
            provider=provider_name,
            via="exchange",
            version=stored.version,
        )
        body = summary_json(stored.id, provider_name, stored.next_refresh_at)
        body.update(token_json(stored, now))
        body["reauthorized"] = reauthorized
        # The answer first: the client waits on it, not on the hook's queue.
        job.answer = JSON(body, 200 if reauthorized else 201)
        job.done.set()
        await self.events.enqueue(
            "token_set.connected",
            stored.id,
            provider_name,
            reconnected=reauthorized,
            version=stored.version,
            via="exchange",
        )
        return job.answer


@dataclass(slots=True)
class _Exchange:
    """One code exchange, from the request that asked for it to the task that runs it."""

    id: str
    provider: ProviderConfig
    endpoint: TokenEndpoint
    code: Secret
    redirect_uri: str
    verifier: Secret | None
    answer: Response | None = None
    # An unexpected error, for the request that waits to raise.
    error: Exception | None = None
    # Whether the request still waits for the answer.
    waiting: bool = False
    # Set once the provider has answered (and the grant is being stored), then when done.
    exchanged: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


def _log_exchange_failure(job: _Exchange, exc: Exception) -> None:
    """An unexpected error of an exchange no request waits for any more."""
    secrets = [job.code.reveal(), job.verifier.reveal() if job.verifier else ""]
    log.error(
        "code exchange failed",
        token_set=job.id,
        provider=job.provider.name,
        **exception_fields(exc, secrets),
    )


def _invalid(message: str) -> Response:
    return error(400, "invalid_request", message)


def _unknown(token_set_id: str) -> Response:
    return error(404, "unknown_token_set", f"no token set with id {token_set_id!r}")


def _exists(token_set_id: str) -> Response:
    return error(409, "exists", f"token set {token_set_id!r} exists already (delete it first)")


def _unknown_provider(name: str, providers: Iterable[str]) -> Response:
    known = ", ".join(sorted(providers))
    return error(400, "unknown_provider", f"provider {name!r} is not configured (known: {known})")


def _storage_unavailable() -> Response:
    return error(503, "storage_unavailable", "the database is not answering")
