"""What became of one refresh request: :class:`RefreshResult` and its :class:`Outcome`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from refresherd.model import TokenSet


class Outcome(enum.StrEnum):
    """A bounded vocabulary: the values are log fields, ``refresherd refresh``'s JSON and what
    the token API acts on, so they never change."""

    REFRESHED = "refreshed"  # a grant was received and stored
    ADOPTED = "adopted"  # another worker's newer grant is the live one (ours lost, or none sent)
    FAILED = "failed"  # the IdP did not grant; the failure is recorded and a retry planned
    INVALIDATED = "invalidated"  # the refresh token is dead: the customer must authorize again
    CIRCUIT_OPEN = "circuit_open"  # the provider is paused: it refused our client credentials
    LEASED = "leased"  # another process holds the lease (or sent this very token moments ago)
    NOT_FOUND = "not_found"  # no such token set (or removed during the refresh)
    LEASE_LOST = "lease_lost"  # our lease went while the refresh ran
    STORAGE_ERROR = "storage_error"  # the database refused a read or write of this refresh
    STORAGE_PAUSED = "storage_paused"  # refreshes are paused: the database refuses writes
    UNKNOWN_PROVIDER = "unknown_provider"  # the set's provider is not in the configuration
    DEFERRED = "deferred"  # keep-alive: not due by the sliding lifetime yet, planned later


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What became of one refresh request."""

    outcome: Outcome
    token_set: TokenSet | None = None
    reason: str | None = None
    detail: str | None = None
    coalesced: bool = False
    attempt: int | None = None  # sends of the refresh token in this refresh's attempt series

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.REFRESHED, Outcome.ADOPTED)
