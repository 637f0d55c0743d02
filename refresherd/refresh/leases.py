"""This process's leases on token-set rows: claimed for a refresh or an exclusive hold, renewed
while it runs (a slow IdP must not cost us the row), released after.

A lease keeps other processes off a row (DESIGN.md, "Lease"); the owner id is this process's
registration (``TokenStore.owner``), whose liveness tells others whether its leases and journal
entries are still someone's. The scheduler claims due rows in batches with the same owner and
lease duration (:meth:`Leases.until`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.model import TokenSet
from refresherd.refresh.storage import StorageWatch
from refresherd.store import ClaimRefused, StoreError, TokenStore

log = get_logger("refresherd.refresh.leases")


class Leases:
    """The leases of one owner; see the module docstring. ``duration`` is live (a reload sets
    it)."""

    def __init__(
        self,
        *,
        store: TokenStore,
        owner: str,
        duration: float,
        clock: Clock,
        storage: StorageWatch,
    ) -> None:
        self._store = store
        self.owner = owner
        self.duration = duration
        self._clock = clock
        self._storage = storage
        # Refreshes in flight whose lease the keeper (keep_all) renews: id -> when it last was
        # (loop time). Without the keeper (the CLI, unit tests) each refresh keeps its own.
        self._leased: dict[str, float] = {}
        self._keeping = False

    def until(self, now: float) -> float:
        """When a lease taken at ``now`` ends."""
        return now + self.duration

    async def claim(self, token_set_id: str) -> TokenSet | ClaimRefused:
        """Lease the row and read it under the lease; StoreError if the database cannot."""
        now = self._clock.wall()
        return await self._store.claim(
            token_set_id, owner=self.owner, now=now, lease_until=now + self.duration
        )

    async def release_quietly(self, token_set_id: str) -> None:
        try:
            await self._store.release(token_set_id, owner=self.owner)
        except StoreError as exc:
            self._storage.failed(exc, during="release")

    @asynccontextmanager
    async def renewed(self, token_set_id: str) -> AsyncIterator[None]:
        """Renew the lease while the body runs: by the keeper when one runs, else by a task of
        its own."""
        if self._keeping:
            # keep_all renews it while the refresh is in flight.
            self._leased[token_set_id] = anyio.current_time()
            try:
                yield
            finally:
                del self._leased[token_set_id]
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_one, token_set_id)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()

    async def _keep_one(self, token_set_id: str) -> None:
        """Renew our lease while the refresh runs, so a slow IdP does not cost us the row."""
        while True:
            await anyio.sleep(self.duration / 3)
            await self._renew(token_set_id)

    async def keep_all(self) -> None:
        """In a running daemon: renew the lease of every refresh in flight here once it is a
        third of a lease old (checked every sixth), so a slow IdP does not cost us the row.
        One task for all refreshes rather than a task (and task group) per refresh, which was
        a measurable share of the daemon's CPU per refresh."""
        self._keeping = True
        try:
            while True:
                await anyio.sleep(self.duration / 6)
                now = anyio.current_time()
                due = [i for i, at in self._leased.items() if now - at >= self.duration / 3]
                if due:
                    # Together, so that they ride one group commit.
                    async with anyio.create_task_group() as tg:
                        for token_set_id in due:
                            self._leased[token_set_id] = now
                            tg.start_soon(self._renew, token_set_id)
        finally:
            self._keeping = False

    async def _renew(self, token_set_id: str) -> None:
        try:
            until = self._clock.wall() + self.duration
            await self._store.renew_lease(token_set_id, owner=self.owner, lease_until=until)
        except StoreError as exc:
            self._storage.failed(exc, during="lease renewal")
            log.warning("lease renewal failed", token_set=token_set_id, error=str(exc))
