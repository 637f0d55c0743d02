"""The nouns of refresherd: secrets, token sets, grants and their states. No I/O here."""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final


class Secret:
    """A string that never shows itself: not in repr, str, format, logs or exceptions.

    Call :meth:`reveal` at the one place the value must leave the process (the HTTP body,
    the database, ``--reveal`` output).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __format__(self, spec: str) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # surrogatepass: a lone surrogate (valid in a str, not in UTF-8) must not make == raise
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"),
            other._value.encode("utf-8", "surrogatepass"),
        )

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the value out of our control.
        raise TypeError("Secret cannot be pickled")


class State(enum.StrEnum):
    """Where a token set stands. Stored as text in SQLite; part of the read contract."""

    ACTIVE = "active"  # fresh, or waiting for its next planned refresh
    FAILING = "failing"  # the last attempt failed; retrying with backoff, tokens kept
    INVALIDATED = "invalidated"  # the IdP refused the refresh token: the customer must log in


class RefreshTokenUsage(enum.StrEnum):
    ONE_TIME = "one_time"  # rotating: each refresh returns a new refresh token
    REUSE = "reuse"  # the same refresh token comes back


class RefreshMode(enum.StrEnum):
    """What refreshing a token set is for."""

    # Keep a fresh access token at all times (refresh ahead of each access-token expiry).
    ACCESS_TOKEN = "access_token"
    # Keep only the refresh token alive: refresh as rarely as its sliding (idle) lifetime allows.
    KEEP_ALIVE = "keep_alive"


class AuthMethod(enum.StrEnum):
    CLIENT_SECRET_POST = "client_secret_post"
    CLIENT_SECRET_BASIC = "client_secret_basic"


@dataclass(frozen=True, slots=True)
class Grant:
    """A successful token response, validated. ``refresh_token`` None means: keep the old one."""

    access_token: Secret
    token_type: str
    expires_in: float | None
    refresh_token: Secret | None = None
    scope: str | None = None
    id_token: Secret | None = None
    # Some IdPs say how long the refresh token lives (refresh_token_expires_in, Keycloak's
    # refresh_expires_in).
    refresh_expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """The journal of one unresolved refresh: committed before the request leaves (a one-time
    token's; a re-use token's series counts its sends in memory only: a send cannot spend it).

    ``version`` names the token-set version whose refresh token was sent; ``started_at`` is the
    wall-clock time of the first send, from which the IdP's grace window is counted. ``sends``
    counts every journaled send of the series; ``settled`` those whose answer proved that the
    IdP did not process them (connection refused, 429/503, another 4xx). A series with no
    unsettled send consumed nothing; one with unsettled sends may have, and its token may be
    sent again only while its grace window is open.
    """

    version: int
    started_at: float
    owner: str
    sends: int
    settled: int = 0

    @property
    def unsettled(self) -> int:
        """Sends the IdP may have processed (each possibly a rotation, or a grace mint)."""
        return max(self.sends - self.settled, 0)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """One customer's tokens as stored. Times are wall-clock Unix seconds (UTC)."""

    id: str
    provider: str
    refresh_token: Secret
    access_token: Secret | None
    expires_at: float | None
    state: State
    version: int
    next_refresh_at: float
    created_at: float
    updated_at: float
    token_type: str | None = None
    scope: str | None = None
    last_refresh_at: float | None = None
    last_error: str | None = None
    failures: int = 0
    invalid_reason: str | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    attempt: Attempt | None = None
    refresh_expires_at: float | None = None  # absolute refresh-token expiry, if known
    # Per-set policy (None: the provider's applies). An IdP setting change only affects token
    # sets authorized after it, so sets of one provider may differ (policy.effective_policy).
    refresh_token_usage: RefreshTokenUsage | None = None
    grace_period: float | None = None
    refresh_token_lifetime: float | None = None
    refresh_token_idle_lifetime: float | None = None  # sliding: dies unused for this long
    refresh_mode: RefreshMode | None = None
    # The absolute refresh-token expiry that the "expiring soon" warning was given for.
    expiry_warned_for: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


MAX_ID_LENGTH: Final = 200


def validate_token_set_id(value: str) -> str:
    """Token-set ids travel in URLs, logs and argv: printable, bounded, no whitespace."""
    if not value:
        raise ValueError("a token-set id must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"a token-set id must be at most {MAX_ID_LENGTH} characters")
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise ValueError("a token-set id must be printable and contain no whitespace")
    return value


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds to RFC 3339 UTC with a Z, as the CLI and read contract print times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class FailureKind(enum.StrEnum):
    """What a failed token request means for the refresh token (DESIGN.md's failure table)."""

    NOT_SENT = "not_sent"  # connect/DNS/TLS error: the IdP never saw the token
    AMBIGUOUS = "ambiguous"  # sent, answer lost or unusable: the IdP may have rotated it
    RATE_LIMITED = "rate_limited"  # 429, or 503 with Retry-After: not processed
    INVALID_GRANT = "invalid_grant"  # the refresh token was refused
    CLIENT_REJECTED = "client_rejected"  # invalid_client/unauthorized_client: our credentials
    OAUTH_ERROR = "oauth_error"  # any other 4xx: not processed, retry much later


class InvalidationReason(enum.StrEnum):
    """Why a token set was invalidated (policy.decide): the ``reason`` of the
    ``refresherd_invalidations_total`` metric and of the stored ``invalid_reason``."""

    INVALID_GRANT = "invalid_grant"  # the IdP refused a token nothing had consumed
    # Refused after a send of the series may have rotated it, and the one retry spent.
    INVALID_GRANT_AFTER_UNRESOLVED = "invalid_grant_after_unresolved_attempt"
    # A one-time token's grace window closed with every send of it unanswered.
    GRACE_WINDOW_MISSED = "grace_window_missed"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, free of secrets. ``reason`` is a bounded metric label."""

    kind: FailureKind
    reason: str
    detail: str
    status: int | None = None
    retry_after: float | None = None
