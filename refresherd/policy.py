"""Pure decisions: when to refresh next, how long an attempt may take, what a failure means.

Nothing here does I/O or reads a clock: ``now`` and randomness are arguments, so every rule is
tested without a network (tests/test_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from refresherd.config import ProviderConfig, ScheduleConfig
from refresherd.model import (
    Attempt,
    Failure,
    FailureKind,
    RefreshMode,
    RefreshTokenUsage,
    State,
    TokenSet,
)

# How many sends one refresh may make inside a grace window. Each send that the IdP processes
# mints another refresh token counted against its per-user cap, so the window is a recovery path
# with a small budget, not a retry loop. 5, not 3: the chaos run (docs/reliability.md) lost token
# sets whose window was still open when 3 sends had failed (lost answers, crash recoveries);
# the cap revokes the oldest unused tokens, so the extra mints never cost the stored one.
MAX_GRACE_SENDS: Final = 5
# No attempt gets less time than this: shorter only turns a slow IdP into more grace mints.
MIN_ATTEMPT_TIMEOUT: Final = 1.0
# Time kept back at the end of a non-final attempt to journal and start the next send.
RETRY_LEAD: Final = 1.0


class EffectivePolicy(NamedTuple):
    usage: RefreshTokenUsage
    grace_period: float
    refresh_token_lifetime: float | None
    refresh_token_idle_lifetime: float | None
    # keep_alive only where an idle lifetime is known: without one there is no cadence to keep
    # but the access token's, which is the safe (more frequent) side.
    mode: RefreshMode


def effective_policy(ts: TokenSet, provider: ProviderConfig) -> EffectivePolicy:
    """The policy a token set is refreshed under: its own value where it has one, else its
    provider's. An IdP setting change applies only to sets authorized after it, so the sets
    authorized before keep the provider's (old) values and the newer ones carry theirs."""
    idle = (
        ts.refresh_token_idle_lifetime
        if ts.refresh_token_idle_lifetime is not None
        else provider.refresh_token_idle_lifetime
    )
    mode = ts.refresh_mode if ts.refresh_mode is not None else provider.refresh_mode
    if idle is None:
        mode = RefreshMode.ACCESS_TOKEN
    return EffectivePolicy(
        usage=(
            ts.refresh_token_usage
            if ts.refresh_token_usage is not None
            else provider.refresh_token_usage
        ),
        grace_period=ts.grace_period if ts.grace_period is not None else provider.grace_period,
        refresh_token_lifetime=(
            ts.refresh_token_lifetime
            if ts.refresh_token_lifetime is not None
            else provider.refresh_token_lifetime
        ),
        refresh_token_idle_lifetime=idle,
        mode=mode,
    )


def grace_safety(grace_period: float) -> float:
    """Time kept back from the end of the IdP's grace window.

    The IdP counts the window from when *it* first saw the token, which is after our first send,
    so counting from our send is conservative; the margin covers the latency of the retry itself.
    """
    return min(1.0, grace_period * 0.2)


def effective_grace(usage: RefreshTokenUsage, grace_period: float) -> float:
    """Only a one-time token has a grace window that matters: a re-use token is never spent."""
    return grace_period if usage is RefreshTokenUsage.ONE_TIME else 0.0


def grace_deadline(attempt: Attempt | None, grace_period: float) -> float | None:
    """Wall time by which a retry of ``attempt`` must have started, or None if there is none."""
    if attempt is None or grace_period <= 0:
        return None
    return attempt.started_at + grace_period - grace_safety(grace_period)


def plan_next_refresh(
    *,
    now: float,
    expires_at: float | None,
    lifetime: float | None,
    cfg: ScheduleConfig,
    rand: float,
    not_before: float | None = None,
) -> float:
    """When to refresh an access token that expires at ``expires_at``.

    At ``refresh_fraction`` of its lifetime, but never closer to expiry than ``min_margin`` (or
    half the lifetime, for tokens shorter than two margins), minus up to ``jitter`` of the
    lead time so that token sets added together do not stay together. ``rand`` is in [0, 1).
    A token with no known expiry is due at once. ``not_before`` keeps a just-refreshed token
    with a tiny lifetime from spinning.
    """
    earliest = now if not_before is None else not_before
    if expires_at is None:
        return earliest
    life = lifetime if lifetime is not None and lifetime > 0 else max(expires_at - now, 0.0)
    margin = max(life * (1.0 - cfg.refresh_fraction), min(cfg.min_margin, life * 0.5))
    lead = max(life - margin, 0.0)
    planned = expires_at - margin - rand * cfg.jitter * lead
    return max(planned, earliest)


def plan_imported_refresh(
    *,
    now: float,
    expires_at: float | None,
    lifetime: float | None,
    cfg: ScheduleConfig,
    rand: float,
) -> float:
    """:func:`plan_next_refresh` for a set that comes in with many others (``tokens import``).

    Sets imported together with one lifetime would come due within ``jitter`` of the lead of
    each other, and stay so: each refresh plans the next one lifetime on, so a bulk import of
    one-hour tokens would be a herd every hour. Here the window the first refresh is drawn from
    grows to ``import_spread`` of the time until the unjittered plan (the whole of it by
    default): a uniform spread that later refreshes keep, at the cost of one early refresh.
    """
    jittered = plan_next_refresh(
        now=now, expires_at=expires_at, lifetime=lifetime, cfg=cfg, rand=rand
    )
    if expires_at is None or cfg.import_spread <= 0:
        return jittered
    latest = plan_next_refresh(now=now, expires_at=expires_at, lifetime=lifetime, cfg=cfg, rand=0.0)
    spread = latest - rand * cfg.import_spread * max(latest - now, 0.0)
    return max(min(jittered, spread), now)


def plan_after_refresh(
    *,
    now: float,
    access_expires_at: float,
    access_lifetime: float,
    eff: EffectivePolicy,
    cfg: ScheduleConfig,
    rand: float,
) -> float:
    """When to refresh next, right after a refresh at ``now``.

    ``access_token`` mode: ahead of the access token's expiry, and never later than the sliding
    lifetime allows. ``keep_alive`` mode: only ahead of the end of the sliding lifetime, which
    each refresh restarts. The same fraction, margin and jitter rules apply to both.
    """
    not_before = now + cfg.min_interval
    idle_at = None
    if eff.refresh_token_idle_lifetime is not None:
        idle_at = plan_next_refresh(
            now=now,
            expires_at=now + eff.refresh_token_idle_lifetime,
            lifetime=eff.refresh_token_idle_lifetime,
            cfg=cfg,
            rand=rand,
            not_before=not_before,
        )
    if eff.mode is RefreshMode.KEEP_ALIVE and idle_at is not None:
        return idle_at
    access_at = plan_next_refresh(
        now=now,
        expires_at=access_expires_at,
        lifetime=access_lifetime,
        cfg=cfg,
        rand=rand,
        not_before=not_before,
    )
    return access_at if idle_at is None else min(access_at, idle_at)


def keep_alive_at(
    ts: TokenSet, eff: EffectivePolicy, cfg: ScheduleConfig, rand: float
) -> float | None:
    """In keep-alive mode, when the sliding lifetime next needs a refresh, counted from the last
    refresh or, before any, from the set's creation; ``rand`` is the jitter as in
    :func:`plan_next_refresh` (1.0 gives the earliest time it may be planned for). None when
    the set is not kept alive this way, or must be refreshed now regardless: it is failing, or
    a journaled attempt is unresolved (that one must go on)."""
    if (
        eff.mode is not RefreshMode.KEEP_ALIVE
        or eff.refresh_token_idle_lifetime is None
        or ts.attempt is not None
        or ts.state is not State.ACTIVE
    ):
        return None
    last_use = ts.last_refresh_at if ts.last_refresh_at is not None else ts.created_at
    idle = eff.refresh_token_idle_lifetime
    return plan_next_refresh(
        now=last_use, expires_at=last_use + idle, lifetime=idle, cfg=cfg, rand=rand
    )


def refresh_token_expires_at(ts: TokenSet, eff: EffectivePolicy) -> float | None:
    """The refresh token's absolute expiry: what the IdP said, else creation + the lifetime."""
    if ts.refresh_expires_at is not None:
        return ts.refresh_expires_at
    if eff.refresh_token_lifetime is not None:
        return ts.created_at + eff.refresh_token_lifetime
    return None


def expiry_warning_due(
    *, expires_at: float | None, warned_for: float | None, now: float, horizon: float
) -> bool:
    """Whether to say now that a refresh token's absolute expiry is near: once it is within
    ``horizon``, once per expiry. An expiry that moved later by more than the horizon since the
    last warning (the customer authorized again) is a new one; smaller moves (an IdP stating a
    rolling expiry at each refresh) are not warned again."""
    if expires_at is None or expires_at - now > horizon:
        return False
    return warned_for is None or expires_at > warned_for + horizon


def backoff_delay(failures: int, *, initial: float, maximum: float, rand: float) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so never near zero."""
    exponent = max(failures - 1, 0)
    # Bound the exponent: 2**1000 is a float overflow, and the cap is reached long before.
    base = min(maximum, initial * (2.0 ** min(exponent, 60)))
    return base * (0.5 + 0.5 * rand)


def attempt_timeout(
    *,
    usage: RefreshTokenUsage,
    grace_period: float,
    request_timeout: float,
    now: float,
    attempt: Attempt | None,
) -> float:
    """Per-attempt timeout, planned so that a retry of a one-time token still starts in grace.

    A non-final attempt may use what is left of the window but ``retry_lead``: a lost answer
    (reset, dropped connection) fails fast and leaves room for more sends, while a slow IdP is
    not abandoned early — an abandoned request that the IdP is still processing would meet our
    retry there, a second use of one token and another token minted against the per-user cap.
    The final send (number MAX_GRACE_SENDS, or one after which no retry could start anyway)
    gets the full ``request_timeout``. ``attempt.sends`` counts this send too.
    """
    deadline = grace_deadline(attempt, grace_period)
    if usage is RefreshTokenUsage.REUSE or deadline is None:
        return request_timeout
    assert attempt is not None
    budget = attempt_budget(deadline - now)
    if attempt.sends >= MAX_GRACE_SENDS or budget < MIN_ATTEMPT_TIMEOUT:
        return request_timeout
    return min(request_timeout, budget)


def attempt_budget(remaining: float) -> float:
    """Of ``remaining`` seconds of window, what one attempt may use and still leave time to
    journal and start the next send inside the window."""
    return remaining - min(RETRY_LEAD, remaining / 4.0)


@dataclass(frozen=True, slots=True)
class RetryNow:
    """Send the same refresh token again after ``delay`` seconds, inside the grace window.

    ``grace``: the retry relies on the IdP's grace period (an earlier send of the series may
    have consumed the token), as opposed to a resend of a token the IdP did not process.
    """

    delay: float
    grace: bool


@dataclass(frozen=True, slots=True)
class Backoff:
    """Keep the tokens, mark the set failing and try again at ``at`` (wall time)."""

    at: float


@dataclass(frozen=True, slots=True)
class Invalidate:
    """The refresh token is dead: stop, record ``reason``, the customer must authorize again."""

    reason: str


@dataclass(frozen=True, slots=True)
class OpenCircuit:
    """Our client credentials were refused: pause the whole provider, touch no token set."""


@dataclass(frozen=True, slots=True)
class SuspectProvider:
    """An invalid_grant that is one of a storm: pause the provider, keep the token set."""


Decision = RetryNow | Backoff | Invalidate | OpenCircuit | SuspectProvider

# Refused refresh tokens of one provider in a row, with no success in between, from which on
# invalid_grant is taken for a configuration problem rather than a customer's revocation.
INVALID_GRANT_STORM: Final = 3


def invalid_grant_storm(streak: int) -> bool:
    return streak >= INVALID_GRANT_STORM


@dataclass(frozen=True, slots=True)
class FailureContext:
    """What :func:`decide` needs to know about the refresh that failed."""

    now: float
    usage: RefreshTokenUsage
    grace_period: float
    attempt: Attempt | None  # the journaled attempt series, including the send that failed
    failures: int  # consecutive failed refreshes before this one
    invalid_grant_retried: bool  # the one retry after invalid_grant was already spent


def decide(failure: Failure, ctx: FailureContext, cfg: ScheduleConfig, rand: float) -> Decision:
    """DESIGN.md's failure table as a function. The caller has already re-read the store after
    ``invalid_grant`` and adopted a sibling's grant if there was one."""
    deadline = grace_deadline(ctx.attempt, ctx.grace_period)
    in_grace = (
        ctx.usage is RefreshTokenUsage.ONE_TIME
        and deadline is not None
        and ctx.now < deadline
        and ctx.attempt is not None
        and ctx.attempt.sends < MAX_GRACE_SENDS
    )

    def backoff(failures: int) -> Backoff:
        delay = backoff_delay(
            failures, initial=cfg.backoff_initial, maximum=cfg.backoff_max, rand=rand
        )
        return Backoff(at=ctx.now + delay)

    kind = failure.kind
    if kind is FailureKind.CLIENT_REJECTED:
        return OpenCircuit()
    if kind is FailureKind.INVALID_GRANT:
        unresolved = ctx.attempt is not None and ctx.attempt.sends > 1
        if in_grace and unresolved and not ctx.invalid_grant_retried:
            return RetryNow(delay=0.0, grace=True)
        return Invalidate(
            reason="invalid_grant_after_unresolved_attempt" if unresolved else "invalid_grant"
        )
    if kind is FailureKind.AMBIGUOUS:
        if in_grace:
            return RetryNow(delay=0.0, grace=True)
        return backoff(ctx.failures + 1)
    if kind is FailureKind.NOT_SENT:
        # The IdP never saw this send; but if an earlier send of the series was ambiguous the
        # window still matters, so try again soon while it is open.
        earlier_ambiguous = ctx.attempt is not None and ctx.attempt.sends > 1
        if in_grace and earlier_ambiguous:
            assert deadline is not None
            return RetryNow(delay=min(0.5, max(deadline - ctx.now, 0.0) / 2), grace=True)
        return backoff(ctx.failures + 1)
    # After an earlier send that may have consumed the token, an answer that says "not
    # processed" must not push the next send past the window: that would lose the token.
    earlier_unresolved = ctx.attempt is not None and ctx.attempt.sends > 1
    if (
        in_grace
        and earlier_unresolved
        and kind in (FailureKind.RATE_LIMITED, FailureKind.OAUTH_ERROR)
    ):
        assert deadline is not None
        room = deadline - ctx.now
        wait = failure.retry_after if failure.retry_after is not None else 0.5
        return RetryNow(delay=min(max(wait, 0.0), room / 2), grace=True)
    if kind is FailureKind.RATE_LIMITED:
        if failure.retry_after is None:
            return backoff(ctx.failures + 1)
        wait = min(max(failure.retry_after, 0.0), cfg.retry_after_max)
        if in_grace and deadline is not None and ctx.now + wait < deadline:
            # The IdP processed nothing, and nothing earlier in the series was sent: a plain
            # resend as told, not a grace retry.
            return RetryNow(delay=wait, grace=False)
        # "Retry-After: 0" (or a date in the past) must not become a tight loop of refreshes.
        return Backoff(at=ctx.now + max(wait, cfg.min_interval))
    # Any other OAuth error or unexpected 4xx: not processed, probably a configuration problem;
    # retry rarely so a fix is picked up without a restart.
    return Backoff(at=ctx.now + cfg.backoff_max * (0.5 + 0.5 * rand))


def circuit_delay(openings: int, cfg: ScheduleConfig, rand: float) -> float:
    """How long a provider's circuit stays open after its ``openings``-th consecutive opening."""
    return backoff_delay(
        openings,
        initial=cfg.circuit_backoff_initial,
        maximum=cfg.circuit_backoff_max,
        rand=rand,
    )


# ---- the token API: serve the stored access token, or refresh first? ------------------------


@dataclass(frozen=True, slots=True)
class Serve:
    """The stored access token is good: hand it out."""


@dataclass(frozen=True, slots=True)
class RefreshFirst:
    """Expired, missing, or inside the refresh margin: refresh (single-flight), then answer."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Expired while the set is backing off after failures: refreshing again now would only
    hammer a failing IdP. ``retry_at`` is the planned next attempt."""

    retry_at: float


@dataclass(frozen=True, slots=True)
class NeedsAuthorization:
    """Invalidated: only a new authorization by the customer helps."""

    reason: str | None


AccessDecision = Serve | RefreshFirst | Unavailable | NeedsAuthorization


def access_decision(ts: TokenSet, *, now: float) -> AccessDecision:
    """What GET /v1/tokens/{id} does with a stored set.

    "Inside the refresh margin" is the plan the refresher stored (``next_refresh_at``, from
    :func:`plan_next_refresh` or a backoff), so the API and the scheduler share one rule.
    """
    if ts.state is State.INVALIDATED:
        return NeedsAuthorization(ts.invalid_reason)
    expired = ts.access_token is None or (ts.expires_at is not None and ts.expires_at <= now)
    if ts.state is State.FAILING and ts.next_refresh_at > now:
        return Unavailable(ts.next_refresh_at) if expired else Serve()
    if expired or ts.next_refresh_at <= now:
        return RefreshFirst()
    return Serve()


# ---- hooks: when to try a notification again ---------------------------------------------------


def hook_retry_at(
    *,
    attempts: int,
    created_at: float,
    now: float,
    initial: float,
    maximum: float,
    give_up_after: float,
    rand: float,
) -> float | None:
    """When to try a failed notification again, or None to give up.

    Exponential backoff with jitter after the ``attempts``-th failure; given up once the next
    try would start more than ``give_up_after`` after the event was raised (a receiver down for
    longer is told nothing more about events that old).
    """
    at = now + backoff_delay(attempts, initial=initial, maximum=maximum, rand=rand)
    return at if at - created_at <= give_up_after else None
