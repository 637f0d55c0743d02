"""Pure decisions: when to refresh next, how long an attempt may take, what a failure means.

Nothing here does I/O or reads a clock: ``now`` and randomness are arguments, so every rule is
tested without a network (tests/test_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from refresherd.model import (
    Attempt,
    Failure,
    FailureKind,
    InvalidationReason,
    RefreshMode,
    RefreshTokenUsage,
    State,
    TokenSet,
)
from refresherd.settings import ProviderConfig, ScheduleConfig

# A grace window is a time budget, not a count of sends (docs/reliability.md, "Spending a grace
# window"). Of its sends, at most this many may be unsettled (possibly processed by the IdP):
# each such send that the IdP processes can mint another refresh token against its per-user
# cap (an IdP that answers a grace re-send with a new sibling). Sends the IdP provably did not
# process (refused connection, 429/503, another 4xx) cost nothing and are not counted.
MAX_UNSETTLED_SENDS: Final = 10
# Sends of one token out at once: a slow send is kept open while a hedge races it. Five, not
# three: three stalled sends 2 s into a 5 s window left the rest of it idle (chaos, no kill).
# The unsettled-send and hedge budgets bound what this lets out.
MAX_SENDS_IN_FLIGHT: Final = 5
# A send unanswered for this long (at least) gets a hedge beside it: never sooner, so that an
# IdP answering in milliseconds is not raced on every hiccup of the network or the machine.
MIN_HEDGE_AFTER: Final = 0.5
# The pace assumed for a provider not yet observed. Most often that is a daemon just started
# and recovering its predecessor's windows, where every tenth of a second counts; an IdP a
# continent away answers in about this, and five answers later the observed pace takes over.
DEFAULT_LATENCY: Final = 0.1
# The least time kept back at the end of a window for the last send to reach the IdP.
MIN_WINDOW_MARGIN: Final = 0.25
# The last send is planned to start this long before the window's (margined) end.
LAST_SEND_LEAD: Final = 0.05
# No send of a series follows a failed one sooner than this (the least spacing, jitter taken).
MIN_SEND_GAP: Final = 0.08


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


def effective_grace(usage: RefreshTokenUsage, grace_period: float) -> float:
    """Only a one-time token has a grace window that matters: a re-use token is never spent."""
    return grace_period if usage is RefreshTokenUsage.ONE_TIME else 0.0


def window_margin(grace_period: float, latency: float | None) -> float:
    """Time kept back from the end of the IdP's grace window.

    The IdP counts the window from when *it* first processed the token, which is after our
    first send was journaled, so counting from the journal is conservative by one trip. The
    last send must still travel and be processed before the window ends: three times the
    provider's usual answer time, at least :data:`MIN_WINDOW_MARGIN`, at most a fifth of the
    window.
    """
    pace = latency if latency is not None else DEFAULT_LATENCY
    return min(grace_period * 0.2, max(MIN_WINDOW_MARGIN, 3.0 * pace))


def window_closes_at(started_at: float, grace_period: float, latency: float | None) -> float:
    """Wall time by which the last send of a series that began at ``started_at`` must start."""
    return started_at + grace_period - window_margin(grace_period, latency)


def keep_series_since(now: float, grace_period: float, latency: float | None) -> float | None:
    """The earliest start of a series whose window is still open at ``now`` (the journal's
    ``keep_since``); None for a token with no window (a re-use token is not spent by a send:
    each of its refreshes is a series of its own, and none is ever missed)."""
    if grace_period <= 0:
        return None
    return now - (grace_period - window_margin(grace_period, latency))


def hedge_after(grace_period: float, latency: float | None) -> float:
    """How long a send of a one-time token may stay unanswered before a second one is sent
    beside it (the first kept open: inside the window both answers are good).

    Five times the provider's usual answer time, so that an IdP that rotated and then stalled
    costs a second or so of the window, not all of it; never under :data:`MIN_HEDGE_AFTER`,
    never over a quarter of the window.
    """
    pace = latency if latency is not None else DEFAULT_LATENCY
    return max(MIN_HEDGE_AFTER, min(5.0 * pace, grace_period / 4.0))


def retry_spacing(sends: int, grace_period: float, latency: float | None, rand: float) -> float:
    """Pause after the ``sends``-th send of a series failed fast, before the next one.

    Doubling from about one answer time (at least 0.1 s) up to a tenth of the window, with
    ±20 % jitter: a burst of fast failures (a struggling IdP answering 500 in milliseconds)
    spreads its sends over the window instead of spending them at once, and sets that failed
    together do not retry together.
    """
    window = max(grace_period - window_margin(grace_period, latency), 0.0)
    pace = latency if latency is not None else DEFAULT_LATENCY
    base = max(0.1, min(pace, window / 20.0))
    # Capped at an even share of the window among the unsettled-send budget: a 5 s window
    # still gets a send every half second or so, however many failed before.
    cap = max(base, window / MAX_UNSETTLED_SENDS)
    return min(base * (2.0 ** min(max(sends - 1, 0), 30)), cap) * (0.8 + 0.4 * rand)


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


def series_spacing(
    attempt: Attempt | None,
    *,
    now: float,
    grace_period: float,
    latency: float | None,
    rand: float,
) -> float:
    """The pause before the next send of a one-time token's series, after a failed answer:
    :func:`retry_spacing`, or longer where the unsettled-send budget left, spread over what is
    left of the window (half an even share each), asks for it (a long window then keeps a send
    for its end rather than spending the budget in its first seconds)."""
    # The doubling counts the sends that may have been processed: settled ones (a refused
    # connection, a 503) cost nothing against the IdP's cap and do not stretch the spacing.
    unsettled = attempt.unsettled if attempt is not None else 1
    spacing = retry_spacing(max(unsettled, 1), grace_period, latency, rand)
    if attempt is not None and grace_period > 0:
        left = MAX_UNSETTLED_SENDS - attempt.unsettled
        last = window_closes_at(attempt.started_at, grace_period, latency) - LAST_SEND_LEAD
        if left > 0:
            # Half the even share: early sends stay close (a process may not live through a
            # long wait), the later ones spread out, and the budget lasts to the window's end.
            spacing = max(spacing, (last - now) / (2 * left))
    return spacing


@dataclass(frozen=True, slots=True)
class SendAgain:
    """Send the same refresh token again at ``at`` (wall time), inside this refresh.

    ``grace``: the send relies on the IdP's grace period (a send of the series may have
    consumed the token), as opposed to a resend of a token the IdP did not process.
    """

    at: float
    grace: bool


@dataclass(frozen=True, slots=True)
class Backoff:
    """Keep the tokens, mark the set failing and try again at ``at`` (wall time)."""

    at: float


@dataclass(frozen=True, slots=True)
class Invalidate:
    """The refresh token is dead: stop, record ``reason``, the customer must authorize again."""

    reason: InvalidationReason


@dataclass(frozen=True, slots=True)
class OpenCircuit:
    """Our client credentials were refused: pause the whole provider, touch no token set."""


@dataclass(frozen=True, slots=True)
class SuspectProvider:
    """An invalid_grant that is one of a storm: pause the provider, keep the token set."""


Decision = SendAgain | Backoff | Invalidate | OpenCircuit | SuspectProvider

# The invalidation reasons by the names the refresher uses (model.InvalidationReason).
GRACE_WINDOW_MISSED: Final = InvalidationReason.GRACE_WINDOW_MISSED
INVALID_GRANT: Final = InvalidationReason.INVALID_GRANT
INVALID_GRANT_AFTER_UNRESOLVED: Final = InvalidationReason.INVALID_GRANT_AFTER_UNRESOLVED

# Refused refresh tokens of one provider in a row, with no success in between, from which on
# invalid_grant is taken for a configuration problem rather than a customer's revocation.
INVALID_GRANT_STORM: Final = 3


def invalid_grant_storm(streak: int) -> bool:
    return streak >= INVALID_GRANT_STORM


@dataclass(frozen=True, slots=True)
class FailureContext:
    """What :func:`decide` needs to know about the send that failed."""

    now: float
    usage: RefreshTokenUsage
    grace_period: float
    # The journaled series as it stands after this answer: the send that failed is settled in
    # it already if its answer proved the IdP did not process it; sends still in flight count
    # as unsettled (they may be processed).
    attempt: Attempt | None
    failures: int  # consecutive failed refreshes before this one
    invalid_grant_retried: bool  # the one retry after invalid_grant was already spent
    latency: float | None = None  # the provider's observed pace (AnswerTimes.hint)


def decide(failure: Failure, ctx: FailureContext, cfg: ScheduleConfig, rand: float) -> Decision:
    """DESIGN.md's failure table as a function, for one answer of a series of sends.

    The caller has already re-read the store after ``invalid_grant`` and adopted a sibling's
    grant if there was one, and it applies a final decision only once no send of the series
    is in flight any more (one of them may still bring the grant).

    While a send of a one-time token may have been processed, the token is sent again, spaced,
    for as long as the window is open and the unsettled-send budget lasts; after that it is
    never sent again: :data:`GRACE_WINDOW_MISSED`. With nothing consumed (a re-use token, or
    every send settled) the ordinary table applies.
    """
    attempt = ctx.attempt
    one_time = ctx.usage is RefreshTokenUsage.ONE_TIME and ctx.grace_period > 0
    maybe_consumed = one_time and attempt is not None and attempt.unsettled > 0
    closes_at = (
        window_closes_at(attempt.started_at, ctx.grace_period, ctx.latency)
        if one_time and attempt is not None
        else None
    )
    window_open = closes_at is not None and ctx.now < closes_at
    budget_left = attempt is None or attempt.unsettled < MAX_UNSETTLED_SENDS

    def backoff(failures: int) -> Backoff:
        delay = backoff_delay(
            failures, initial=cfg.backoff_initial, maximum=cfg.backoff_max, rand=rand
        )
        return Backoff(at=ctx.now + delay)

    def in_window(at: float) -> SendAgain | None:
        # The last send is planned to start before the window closes, whatever the spacing or
        # an IdP's Retry-After would say; but never sooner than MIN_SEND_GAP after this answer
        # (no burst at the end of the window). None: no room for another send.
        assert closes_at is not None
        last = closes_at - LAST_SEND_LEAD
        if ctx.now + MIN_SEND_GAP > last:
            return None
        return SendAgain(at=max(ctx.now + MIN_SEND_GAP, min(at, last)), grace=True)

    kind = failure.kind
    spacing = series_spacing(
        attempt, now=ctx.now, grace_period=ctx.grace_period, latency=ctx.latency, rand=rand
    )
    if kind is FailureKind.INVALID_GRANT:
        if not maybe_consumed:
            return Invalidate(reason=INVALID_GRANT)
        # A send of the series may have rotated the token: an IdP racing its own rotation can
        # refuse the old token for a moment. One more send while the window is open.
        if window_open and budget_left and not ctx.invalid_grant_retried:
            again = in_window(ctx.now + spacing)
            if again is not None:
                return again
        return Invalidate(reason=INVALID_GRANT_AFTER_UNRESOLVED)
    if maybe_consumed:
        again = None
        if window_open and budget_left:
            if kind is FailureKind.RATE_LIMITED and failure.retry_after is not None:
                # As told, but never sooner than the spacing ("Retry-After: 0" is no loop), and
                # never more than a quarter of what is left of the window: the token's life
                # is at stake, and one more request for it is no flood.
                assert closes_at is not None
                left = max(closes_at - LAST_SEND_LEAD - ctx.now, 0.0)
                wait = min(max(failure.retry_after, spacing), max(spacing, left / 4))
                again = in_window(ctx.now + wait)
            else:
                again = in_window(ctx.now + spacing)
        return again if again is not None else Invalidate(reason=GRACE_WINDOW_MISSED)
    # Nothing of the series can have been processed: the token is as good as before.
    if kind is FailureKind.CLIENT_REJECTED:
        return OpenCircuit()
    if kind in (FailureKind.AMBIGUOUS, FailureKind.NOT_SENT):
        return backoff(ctx.failures + 1)
    if kind is FailureKind.RATE_LIMITED:
        if failure.retry_after is None:
            return backoff(ctx.failures + 1)
        # Rescheduled, as told: the IdP processed nothing, so no window is running. (Not a
        # resend inside this refresh: each would start a new series, and a short Retry-After
        # repeated would never end.) "Retry-After: 0" (or a date in the past) must not become
        # a tight loop of refreshes.
        wait = min(max(failure.retry_after, 0.0), cfg.retry_after_max)
        return Backoff(at=ctx.now + max(wait, cfg.min_interval))
    # Any other OAuth error or unexpected 4xx: not processed, probably a configuration problem;
    # retry rarely so a fix is picked up without a restart.
    return Backoff(at=ctx.now + cfg.backoff_max * (0.5 + 0.5 * rand))


def window_missed(
    attempt: Attempt | None,
    *,
    version: int,
    usage: RefreshTokenUsage,
    grace_period: float,
    latency: float | None,
    now: float,
) -> bool:
    """Whether the journal shows a series of this version's token whose window closed with a
    send the IdP may have processed: the token must not be sent again (a reuse outside grace
    revokes the family, at some IdPs every token of the user)."""
    return (
        usage is RefreshTokenUsage.ONE_TIME
        and grace_period > 0
        and attempt is not None
        and attempt.version == version
        and attempt.unsettled > 0
        and now >= window_closes_at(attempt.started_at, grace_period, latency)
    )


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
