"""What the fake IdP issued and saw: token families and their policies, rotations, reuses,
revocations, and the figures a reliability report is made of.

The :class:`Ledger` records every token and every outcome so that a test can assert the
promise refresherd makes: no token lost, no double spend; and what each rotation cost
(:meth:`Ledger.rotation_stats`, :meth:`Ledger.loss_causes`). The server
(:class:`~refresherd.testing.FakeIdP`) writes to it through its underscored methods, under its
lock.
"""

from __future__ import annotations

import itertools
import math
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Literal

Usage = Literal["one_time", "reuse"]
# How a one-time token re-sent inside its grace period is answered: "sibling" mints another
# live refresh token, the earlier successors staying live (IdentityServer, Auth0); "same_pair"
# returns exactly the refresh and access token its first use returned (django-oauth-toolkit).
GraceAnswer = Literal["sibling", "same_pair"]
# What a consumed one-time token presented after its grace period costs: "family" revokes every
# token of its authorization, "user" every token of that user and client, "none" nothing but
# the request itself.
ReuseRevokes = Literal["none", "family", "user"]
# Why the IdP refuses a refresh token a client holds (Ledger.loss_causes).
LossCause = Literal[
    "missed_window", "revoked_reuse", "revoked_cap", "revoked", "expired", "unknown"
]


@dataclass(frozen=True)
class Policy:
    """IdP settings frozen into a family when it is authorized.

    Real IdPs apply new client settings only to authorizations made after the change; the
    tokens already out there keep the rules they were issued under.
    """

    usage: Usage
    grace_period: float
    refresh_token_lifetime: float | None
    refresh_token_idle_lifetime: float | None
    reuse_returns_refresh_token: bool
    grace_answer: GraceAnswer = "sibling"
    reuse_revokes: ReuseRevokes = "family"


@dataclass
class Family:
    id: str
    user: str
    client_id: str
    scope: str
    authorized_at: float
    policy: Policy
    tokens: list[_RefreshToken] = field(default_factory=list)


@dataclass(eq=False)
class _RefreshToken:
    value: str
    family: Family
    seq: int  # global mint order: the cap revokes the lowest
    minted_at: float
    last_activity: float  # the sliding lifetime counts from here
    first_used_at: float | None = None
    revoked: bool = False
    # Why it was revoked: "revocation" (endpoint or revoke()), "user" (revoke_user), "cap",
    # "reuse" (a consumed token of its family or user presented after its grace period).
    revoked_by: str | None = None
    sends: int = 0  # token requests that presented it, faulted and refused ones included
    # One-time: the refresh tokens minted in answer to it (more than one: grace siblings), and
    # the first answer, which a "same_pair" IdP repeats to a grace re-send.
    successors: list[_RefreshToken] = field(default_factory=list)
    answer: dict[str, object] | None = None

    def revoke(self, why: str) -> None:
        if not self.revoked:
            self.revoked = True
            self.revoked_by = why


_TokenStatus = Literal["live", "grace", "used", "revoked", "expired"]


def token_status(token: _RefreshToken, now: float) -> _TokenStatus:
    family = token.family
    policy = family.policy
    if token.revoked:
        return "revoked"
    absolute = policy.refresh_token_lifetime
    if absolute is not None and now >= family.authorized_at + absolute:
        return "expired"
    if policy.usage == "one_time" and token.first_used_at is not None:
        return "grace" if now < token.first_used_at + policy.grace_period else "used"
    idle = policy.refresh_token_idle_lifetime
    if idle is not None and now >= token.last_activity + idle:
        return "expired"
    return "live"


_COUNTERS: Final = (
    "connections",
    "requests",
    "refreshes",
    "reuses_in_grace",
    "reuses_outside_grace",
    "concurrent_uses",
    "invalid_grants",
    "invalid_clients",
    "revocations",
    "cap_revocations",
    "reuse_revoked_families",
    "code_exchanges",
    "outages",
    # Not a count: the most token requests the IdP was handling at once (its latency included).
    "peak_requests_in_flight",
)


@dataclass
class Code:
    """A one-time authorization code, as the authorization endpoint would have sent it."""

    user: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str
    expires_at: float
    used: bool = False


class _Flight:
    """One request presenting a refresh token, while the IdP handles it."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = False


@dataclass(frozen=True)
class RotationStats:
    """What the rotations of one-time refresh tokens cost, for a reliability report.

    A rotation is one consumed refresh token. ``sends_*``: token requests that presented it
    (median, 99th percentile by nearest rank, maximum). ``siblings``: refresh tokens minted in
    answer to grace re-sends beyond the first successor, each one more live token against the
    per-user cap. The last three are the ledger's counters of the same names.
    """

    rotations: int
    sends_median: float
    sends_p99: int
    sends_max: int
    siblings: int
    siblings_max: int
    rotations_with_siblings: int
    reuses_outside_grace: int
    reuse_revoked_families: int
    cap_revocations: int


def _nearest_rank(ordered: Sequence[int], q: float) -> int:
    """The ``q`` quantile of an ascending sequence by the nearest-rank method (0 if empty)."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Ledger:
    """Every token the IdP minted and every outcome, for assertions in tests.

    Thread-safe: the IdP may serve in another thread than the test that reads this.
    Token values never appear in :attr:`events`.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._tokens: dict[str, _RefreshToken] = {}
        self._access: dict[str, Family] = {}
        self._families: dict[str, Family] = {}
        self._by_user: dict[tuple[str, str], list[_RefreshToken]] = {}
        self._seq = itertools.count(1)
        self._family_seq = itertools.count(1)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._faults: dict[str, int] = {}
        self._events: list[dict[str, object]] = []
        self._in_flight: dict[str, list[_Flight]] = {}
        self._codes: dict[str, Code] = {}

    # -- queries ------------------------------------------------------------------------

    def is_live(self, refresh_token: str) -> bool:
        """Would the IdP accept this refresh token right now (grace reuse included)?"""
        with self._lock:
            token = self._tokens.get(refresh_token)
            return token is not None and token_status(token, self._clock()) in ("live", "grace")

    def live_refresh_tokens(
        self, user: str | None = None, *, family: str | None = None
    ) -> set[str]:
        """Refresh tokens the IdP would accept now, optionally of one user or family only."""
        with self._lock:
            now = self._clock()
            return {
                t.value
                for t in self._tokens.values()
                if (user is None or t.family.user == user)
                and (family is None or t.family.id == family)
                and token_status(t, now) in ("live", "grace")
            }

    def family_of(self, refresh_token: str) -> str:
        """The family (one authorization and all its rotations) a refresh token belongs to.

        Raises KeyError for a value the IdP never minted as a refresh token.
        """
        with self._lock:
            token = self._tokens.get(refresh_token)
            if token is None:
                raise KeyError("not a refresh token minted by this IdP")
            return token.family.id

    def families(self, user: str | None = None) -> set[str]:
        with self._lock:
            return {f.id for f in self._families.values() if user is None or f.user == user}

    def family_has_live_token(self, family: str) -> bool:
        """False means the authorization is lost: the user must log in again."""
        with self._lock:
            now = self._clock()
            return any(
                token_status(t, now) in ("live", "grace") for t in self._families[family].tokens
            )

    def issued_tokens(self) -> set[str]:
        """Every access and refresh token value ever minted (to scan logs for leaks)."""
        with self._lock:
            return set(self._tokens) | set(self._access) | set(self._codes)

    @property
    def access_tokens(self) -> list[str]:
        """Every access token minted, oldest first (for one family: its grants in order)."""
        with self._lock:
            return list(self._access)

    @property
    def events(self) -> list[dict[str, object]]:
        """A copy of the outcome log: small dicts with ``t`` (monotonic), ``kind`` and more."""
        with self._lock:
            return [dict(e) for e in self._events]

    @property
    def faults_injected(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    def snapshot(self) -> dict[str, object]:
        """All counters at one instant."""
        with self._lock:
            snap: dict[str, object] = dict(self._counts)
            snap["faults_injected"] = dict(self._faults)
            return snap

    # Counters, one property each so that mypy and editors know them.
    @property
    def connections(self) -> int:
        """TCP connections accepted (keep-alive shows as fewer connections than requests)."""
        return self._counts["connections"]

    @property
    def requests(self) -> int:
        """Requests that reached the token endpoint, faulted ones included."""
        return self._counts["requests"]

    @property
    def peak_requests_in_flight(self) -> int:
        """The most token requests handled at once, from arrival to answer (latency included):
        what a client's concurrency looks like from the IdP's side."""
        return self._counts["peak_requests_in_flight"]

    @property
    def refreshes(self) -> int:
        """Successful refresh grants (even if a fault then kept the answer from the client)."""
        return self._counts["refreshes"]

    @property
    def reuses_in_grace(self) -> int:
        return self._counts["reuses_in_grace"]

    @property
    def reuses_outside_grace(self) -> int:
        return self._counts["reuses_outside_grace"]

    @property
    def concurrent_uses(self) -> int:
        """Requests that overlapped in time with another request presenting the same token."""
        return self._counts["concurrent_uses"]

    @property
    def invalid_grants(self) -> int:
        return self._counts["invalid_grants"]

    @property
    def invalid_clients(self) -> int:
        """Genuine client authentication failures (an INVALID_CLIENT fault is not counted)."""
        return self._counts["invalid_clients"]

    @property
    def revocations(self) -> int:
        """Revocation requests at the endpoint plus revoke() and revoke_user() calls."""
        return self._counts["revocations"]

    @property
    def code_exchanges(self) -> int:
        """Authorization codes exchanged for tokens (grant_type=authorization_code)."""
        return self._counts["code_exchanges"]

    @property
    def cap_revocations(self) -> int:
        """Refresh tokens revoked because the per-user cap was exceeded."""
        return self._counts["cap_revocations"]

    @property
    def reuse_revoked_families(self) -> int:
        """Families (authorizations) revoked because a consumed token was presented after its
        grace period (``reuse_revokes``); a user-wide revocation counts each family it hit."""
        return self._counts["reuse_revoked_families"]

    @property
    def outages(self) -> int:
        """Calls of :meth:`FakeIdP.refuse_connections`."""
        return self._counts["outages"]

    # -- statistics -----------------------------------------------------------------------

    def sends_per_window(self) -> list[int]:
        """For each consumed one-time refresh token (one rotation each), how many token
        requests presented it: the first send, retries, grace re-sends and late reuses, faulted
        and unprocessed ones included. In mint order."""
        with self._lock:
            return [t.sends for t in self._consumed()]

    def siblings_per_rotation(self) -> list[int]:
        """For each consumed one-time refresh token, how many refresh tokens were minted in
        answer to it beyond the first: grace re-sends answered with a new sibling (always 0
        for a ``same_pair`` family). In mint order."""
        with self._lock:
            return [max(0, len(t.successors) - 1) for t in self._consumed()]

    def rotation_stats(self) -> RotationStats:
        """The figures of :class:`RotationStats`, taken at one instant."""
        with self._lock:
            sends = sorted(self.sends_per_window())
            siblings = self.siblings_per_rotation()
            return RotationStats(
                rotations=len(sends),
                sends_median=statistics.median(sends) if sends else 0.0,
                sends_p99=_nearest_rank(sends, 0.99),
                sends_max=sends[-1] if sends else 0,
                siblings=sum(siblings),
                siblings_max=max(siblings, default=0),
                rotations_with_siblings=sum(1 for n in siblings if n),
                reuses_outside_grace=self._counts["reuses_outside_grace"],
                reuse_revoked_families=self._counts["reuse_revoked_families"],
                cap_revocations=self._counts["cap_revocations"],
            )

    def loss_cause(self, refresh_token: str) -> LossCause | None:
        """Why the IdP would refuse ``refresh_token`` now, or None if it would accept it.

        ``missed_window``: a one-time token consumed, its grace period over (the client kept a
        token it had spent, and no successor), even if revoked since: the reuse revocation that
        usually follows is a consequence. Otherwise ``expired`` (absolute or sliding lifetime),
        the reason it was revoked (``revoked_reuse``: a reuse revoked its family or user;
        ``revoked_cap``: the per-user cap; ``revoked``: an explicit revocation) or ``unknown``
        (never minted here).
        """
        with self._lock:
            token = self._tokens.get(refresh_token)
            if token is None:
                return "unknown"
            now = self._clock()
            status = token_status(token, now)
            if status in ("live", "grace"):
                return None
            if status == "expired":
                return "expired"
            policy = token.family.policy
            used = token.first_used_at
            if (
                policy.usage == "one_time"
                and used is not None
                and now >= used + policy.grace_period
            ):
                return "missed_window"
            if status == "revoked":
                if token.revoked_by == "reuse":
                    return "revoked_reuse"
                return "revoked_cap" if token.revoked_by == "cap" else "revoked"
            return "missed_window"  # "used": consumed, grace over

    def loss_causes(self, stored: Iterable[str]) -> dict[str, int]:
        """How many of the refresh tokens a client ``stored`` (one per token set) the IdP would
        refuse, by :meth:`loss_cause`; causes with no token are left out."""
        with self._lock:
            causes: dict[str, int] = {}
            for value in stored:
                cause = self.loss_cause(value)
                if cause is not None:
                    causes[cause] = causes.get(cause, 0) + 1
            return causes

    def missed_windows(self, stored: Iterable[str]) -> int:
        """Grace windows missed: stored refresh tokens that were consumed, with the window
        closed and no successor stored instead (the chaos judge knows what the client stored)."""
        return self.loss_causes(stored).get("missed_window", 0)

    def _consumed(self) -> list[_RefreshToken]:
        return [
            t
            for t in self._tokens.values()
            if t.family.policy.usage == "one_time" and t.first_used_at is not None
        ]

    # -- internal: called by FakeIdP under self._lock -------------------------------------

    def _count(self, name: str, by: int = 1) -> None:
        self._counts[name] += by

    def _event(self, kind: str, **details: object) -> None:
        self._events.append({"t": time.monotonic(), "kind": kind, **details})

    def _new_family(self, user: str, client_id: str, scope: str, policy: Policy) -> Family:
        family = Family(
            id=f"fam-{next(self._family_seq)}",
            user=user,
            client_id=client_id,
            scope=scope,
            authorized_at=self._clock(),
            policy=policy,
        )
        self._families[family.id] = family
        return family

    def _mint_refresh(self, family: Family, cap: int | None) -> _RefreshToken:
        now = self._clock()
        token = _RefreshToken(
            value="rt_" + secrets.token_urlsafe(32),
            family=family,
            seq=next(self._seq),
            minted_at=now,
            last_activity=now,
        )
        self._tokens[token.value] = token
        family.tokens.append(token)
        owned = self._by_user.setdefault((family.user, family.client_id), [])
        owned.append(token)
        if cap is not None:
            self._enforce_cap(owned, cap, now)
        return token

    def _enforce_cap(self, owned: list[_RefreshToken], cap: int, now: float) -> None:
        # Only unused live tokens are stored grants; a used token in its grace window is
        # a recovery path, not a grant of its own, so it does not count against the cap.
        live = [t for t in owned if token_status(t, now) == "live"]
        live.sort(key=lambda t: t.seq)
        for victim in live[: max(0, len(live) - cap)]:
            victim.revoke("cap")
            self._count("cap_revocations")
            self._event("cap_revoked", family=victim.family.id, user=victim.family.user)
        owned[:] = [t for t in owned if token_status(t, now) in ("live", "grace")]

    def _presented(self, refresh_token: str | None) -> None:
        """Count one token request presenting ``refresh_token`` (sends per window)."""
        token = self._tokens.get(refresh_token) if refresh_token is not None else None
        if token is not None:
            token.sends += 1

    def _revoke_for_reuse(self, token: _RefreshToken) -> None:
        """``token``, consumed and past its grace period, was presented: revoke what its
        family's policy says (RFC 9700 4.14.2: the server cannot tell the legitimate client
        from an attacker, so it revokes the grant)."""
        family = token.family
        scope = family.policy.reuse_revokes
        if scope == "none":
            return
        hit = [family]
        if scope == "user":
            hit = [
                f
                for f in self._families.values()
                if f.user == family.user and f.client_id == family.client_id
            ]
        for victim in hit:
            alive = [t for t in victim.tokens if not t.revoked]
            for t in alive:
                t.revoke("reuse")
            if alive:
                self._count("reuse_revoked_families")
                self._event("reuse_revoked", family=victim.id, scope=scope, tokens=len(alive))

    def _mint_access(self, family: Family) -> str:
        value = "at_" + secrets.token_urlsafe(32)
        self._access[value] = family
        return value

    @contextmanager
    def _flight(self, refresh_token: str | None) -> Iterator[None]:
        """Track one request presenting ``refresh_token`` for as long as it is handled."""
        if refresh_token is None:
            yield
            return
        me = _Flight()
        with self._lock:
            others = self._in_flight.setdefault(refresh_token, [])
            if others:
                for flight in [*others, me]:
                    if not flight.counted:
                        flight.counted = True
                        self._count("concurrent_uses")
            others.append(me)
        try:
            yield
        finally:
            with self._lock:
                others = self._in_flight[refresh_token]
                others.remove(me)
                if not others:
                    del self._in_flight[refresh_token]
