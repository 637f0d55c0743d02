"""Token-set events, queued in the database by whichever process observes them.

A daemon with or without ``[hooks]``, a fleet member, ``refresherd refresh ID`` and the token
API raise events the same way: :class:`EventQueue` writes one row into ``hook_events``, in the
database that holds the token sets, after the change it reports is persisted. It needs no hook
config. A daemon with ``[hooks]`` takes the rows into its delivery queue, one delivery per
target of its own (:mod:`refresherd.hooks`); a row that no daemon takes is deleted once older
than ``hooks.give_up_after`` (every daemon prunes, :meth:`TokenStore.prune_events`).

Events (``type``): :data:`EVENT_TYPES`. The payload: ``id`` (a UUID, for receivers to dedupe
on), ``type``, ``occurred_at``, ``token_set``, ``provider``, and the event's own fields (for
``token_set.invalidated``: ``reason``, ``detail`` and whatever else that reason brings). Never a
token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Final, Protocol

from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import rfc3339
from refresherd.settings import HOOK_EVENTS
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.events")

EVENT_TYPES: Final = HOOK_EVENTS


class WallClock(Protocol):
    def wall(self) -> float: ...


class EventQueue:
    """The producer: queues events in the database; see the module docstring."""

    def __init__(
        self,
        *,
        store: TokenStore,
        metrics: Metrics,
        clock: WallClock,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        # Called after each event is queued (a dispatcher in this process wakes up at once).
        self.on_queued = on_queued

    async def enqueue(
        self, event_type: str, token_set_id: str, provider: str, **fields: object
    ) -> str | None:
        """Queue an event; returns its id, or None if it could not be queued. ``fields`` join
        the payload (JSON values, nothing secret). A failure is logged and counted, never
        raised: the change the event reports is persisted already, and its refresh must not
        fail for a lost notification."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        try:
            now = self.clock.wall()
            event_id = str(uuid.uuid4())
            payload = {
                **fields,
                "id": event_id,
                "type": event_type,
                "occurred_at": rfc3339(now),
                "token_set": token_set_id,
                "provider": provider,
            }
            await self.store.enqueue_event(
                event_id=event_id,
                event_type=event_type,
                payload=json.dumps(payload, sort_keys=True),
                now=now,
            )
        except Exception as exc:
            if isinstance(exc, StoreError):
                self.metrics.storage_errors.inc()
            self.metrics.hook_deliveries.labels("any", "lost").inc()
            log.error(
                "cannot queue a notification",
                event_type=event_type,
                token_set=token_set_id,
                provider=provider,
                # A store's message never holds a value; another error's might: its type only.
                error=str(exc) if isinstance(exc, StoreError) else type(exc).__name__,
            )
            return None
        # Debug: the change itself has its one log line (an invalidation is logged once).
        log.debug(
            "notification queued",
            event_type=event_type,
            event_id=event_id,
            token_set=token_set_id,
            provider=provider,
        )
        if self.on_queued is not None:
            self.on_queued()
        return event_id
