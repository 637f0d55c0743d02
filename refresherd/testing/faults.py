"""Fault injection for the fake IdP: what it can do wrong to one token request, and the plan
that says which request gets which fault.

:class:`FaultPlan` is thread-safe: a test thread arms faults while the server thread draws
them, one per token request (``FaultPlan._draw``, called by :class:`~refresherd.testing.FakeIdP`).
"""

from __future__ import annotations

import enum
import random as _random
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final


class FaultKind(enum.StrEnum):
    """What the IdP does wrong to one token request."""

    DROP_AFTER_ROTATE = "drop_after_rotate"
    ERROR_AFTER_ROTATE = "error_after_rotate"
    SLOW = "slow"
    RESET = "reset"
    RETRY_AFTER = "retry_after"
    INVALID_CLIENT = "invalid_client"
    SERVER_ERROR = "server_error"
    GARBAGE_AFTER_ROTATE = "garbage_after_rotate"
    # The grant is processed (the token rotates), then its answer is spoilt on the way out.
    TRUNCATED_AFTER_ROTATE = "truncated_after_rotate"  # a complete 200 whose JSON is cut short
    HUGE_AFTER_ROTATE = "huge_after_rotate"  # the JSON grant padded to HUGE_BODY_BYTES
    WRONG_TYPES_AFTER_ROTATE = "wrong_types_after_rotate"  # access_token a number, and so on
    DUPLICATE_KEYS_AFTER_ROTATE = "duplicate_keys_after_rotate"  # refresh_token twice
    # The grant as usual, without a Content-Type header (clients should still read it).
    NO_CONTENT_TYPE = "no_content_type"
    # Processed (the token rotates), then the answer is held for ``stall`` seconds: longer than
    # any client waits, so the rotated token is in limbo (SLOW is the short version of this).
    STALL = "stall"
    # A 503 without Retry-After, not processed: a gateway with no backend, which tells the
    # client nothing about when to come back (RETRY_AFTER is the polite 503).
    UNAVAILABLE = "unavailable"


# HUGE_AFTER_ROTATE's body size: twice what refresherd reads of a token response.
HUGE_BODY_BYTES: Final = 2 * 1024 * 1024


# The parameters each kind takes; the others take none.
_FAULT_PARAMS: Final[Mapping[FaultKind, frozenset[str]]] = {
    FaultKind.SLOW: frozenset({"delay", "process_first"}),
    FaultKind.RETRY_AFTER: frozenset({"status", "retry_after"}),
    FaultKind.STALL: frozenset({"stall"}),
}


@dataclass(frozen=True)
class Fault:
    """One armed fault. ``delay``/``process_first`` are SLOW's, ``status``/``retry_after``
    RETRY_AFTER's (``retry_after`` is sent rounded up to whole seconds), ``stall`` STALL's."""

    kind: FaultKind
    delay: float = 1.0
    process_first: bool = True
    status: int = 503
    retry_after: float = 1.0
    stall: float = 60.0


def _make_fault(kind: FaultKind | str, params: Mapping[str, Any], *, strict: bool) -> Fault:
    kind = FaultKind(kind)
    allowed = _FAULT_PARAMS.get(kind, frozenset())
    unknown = set(params) - allowed
    if strict and unknown:
        raise TypeError(f"fault {kind.value} takes no parameter(s) {sorted(unknown)}")
    fault = Fault(kind, **{k: v for k, v in params.items() if k in allowed})
    if fault.status not in (429, 503):
        raise ValueError("RETRY_AFTER status must be 429 or 503")
    if fault.delay < 0 or fault.retry_after < 0 or fault.stall < 0:
        raise ValueError("delay, retry_after and stall must be >= 0")
    return fault


class FaultPlan:
    """Faults for the next token requests: a FIFO first, then an optional random rate.

    Thread-safe: a test thread arms faults while the server thread draws them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._rate = 0.0
        self._kinds: tuple[FaultKind, ...] = ()
        self._params: Mapping[str, Any] = {}
        self._rng = _random.Random()
        self._once_per_token = False
        self._faulted: set[str] = set()

    def add(self, kind: FaultKind, *, times: int = 1, **params: Any) -> None:
        """Apply ``kind`` to the next ``times`` token requests (after those already queued)."""
        if times < 1:
            raise ValueError("times must be >= 1")
        fault = _make_fault(kind, params, strict=True)
        with self._lock:
            self._queue.extend([fault] * times)

    def random(
        self,
        rate: float,
        kinds: Sequence[FaultKind] | None = None,
        seed: int | None = None,
        once_per_token: bool = False,
        **params: Any,
    ) -> None:
        """Give each token request a fault with probability ``rate`` once the FIFO is empty.

        ``params`` go to the kinds that take them (``delay`` to SLOW, ``status`` to
        RETRY_AFTER, ...). A second call replaces the first; ``rate=0`` turns it off.
        ``once_per_token``: a refresh token gets at most one random fault, so that its retries
        are answered (incidents then strike refreshes independently). Without it (the default)
        every request draws on its own, retries and grace re-sends included, with every kind:
        a struggling IdP fails a client's last chance as readily as its first.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        chosen = tuple(FaultKind(k) for k in (kinds if kinds is not None else list(FaultKind)))
        if rate > 0 and not chosen:
            raise ValueError("kinds must not be empty")
        accepted = {name for k in chosen for name in _FAULT_PARAMS.get(k, frozenset())}
        unknown = set(params) - accepted
        if unknown:
            raise TypeError(f"no chosen fault kind takes parameter(s) {sorted(unknown)}")
        for k in chosen:  # validate values now rather than in the server thread
            _make_fault(k, params, strict=False)
        with self._lock:
            self._rate = rate
            self._kinds = chosen
            self._params = dict(params)
            self._rng = _random.Random(seed)
            self._once_per_token = once_per_token
            self._faulted = set()

    def clear(self) -> None:
        """Forget queued faults and the random rate."""
        with self._lock:
            self._queue.clear()
            self._rate = 0.0
            self._kinds = ()
            self._params = {}

    @property
    def pending(self) -> int:
        """How many queued faults are still to be applied."""
        with self._lock:
            return len(self._queue)

    def _draw(self, refresh_token: str | None = None) -> Fault | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._once_per_token and refresh_token in self._faulted:
                return None
            if self._rate > 0 and self._rng.random() < self._rate:
                kind = self._rng.choice(self._kinds)
                if self._once_per_token and refresh_token is not None:
                    self._faulted.add(refresh_token)
                return _make_fault(kind, self._params, strict=False)
            return None
