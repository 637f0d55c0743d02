"""Per-provider circuits: a provider whose IdP refused our client credentials is paused, and so
is one whose token sets were refused one after another (most likely our configuration)."""

from __future__ import annotations

from dataclasses import dataclass

from refresherd import policy
from refresherd.settings import ScheduleConfig


@dataclass(slots=True)
class _Circuit:
    open_until: float = 0.0
    openings: int = 0
    probing: bool = False


class ProviderCircuits:
    """Per-provider pause after the IdP refused our client credentials (invalid_client).

    Open: no refresh of that provider is sent until ``open_until``. Then exactly one refresh
    probes; any answer but another invalid_client closes the circuit.
    """

    def __init__(self) -> None:
        self._circuits: dict[str, _Circuit] = {}
        self._invalid_grant_streak: dict[str, int] = {}

    def note_invalid_grant(self, provider: str) -> int:
        """Count a refused refresh token; returns the provider's streak without a success."""
        streak = self._invalid_grant_streak.get(provider, 0) + 1
        self._invalid_grant_streak[provider] = streak
        return streak

    def note_success(self, provider: str) -> None:
        self._invalid_grant_streak.pop(provider, None)

    def blocked(self, now: float) -> list[str]:
        return [
            name
            for name, c in self._circuits.items()
            if c.openings and (c.probing or now < c.open_until)
        ]

    def admit(self, provider: str, now: float) -> bool:
        c = self._circuits.get(provider)
        if c is None or not c.openings:
            return True
        if c.probing or now < c.open_until:
            return False
        c.probing = True
        return True

    def open(self, provider: str, now: float, cfg: ScheduleConfig, rand: float) -> float:
        c = self._circuits.setdefault(provider, _Circuit())
        c.openings += 1
        c.probing = False
        c.open_until = now + policy.circuit_delay(c.openings, cfg, rand)
        return c.open_until

    def close(self, provider: str) -> bool:
        """Returns True if the circuit was open (a recovery worth logging)."""
        c = self._circuits.pop(provider, None)
        return c is not None and c.openings > 0

    def end_probe(self, provider: str) -> None:
        """The probe ended without the IdP judging our credentials (cancelled, a storage error,
        the set moved on): the next refresh probes instead, rather than the provider staying
        paused until a restart."""
        c = self._circuits.get(provider)
        if c is not None:
            c.probing = False

    def is_open(self, provider: str) -> bool:
        c = self._circuits.get(provider)
        return c is not None and c.openings > 0
