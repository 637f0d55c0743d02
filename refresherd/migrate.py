"""``refresherd migrate``: move a whole database from one store to another (SQLite <-> PostgreSQL).

Token sets (with their journal and leases columns), the hook queue, the events no daemon has
taken into it yet and the invalidation counts are copied as stored: token values stay sealed as
they are (a sealing names its row and column, not the database), so the same ``[encryption]``
keys open them afterwards. The source is only read. Nothing is copied
while a daemon (or ``refresherd refresh``) is registered on the source or the target, or while
anyone holds a lease there: a daemon still working on the source would rotate tokens after
they were copied, and the copy would hold dead ones. The target must be empty. After the copy,
both sides are read again and compared row by row (a digest of every value), so a lossy
conversion cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from refresherd.errors import RefresherdError
from refresherd.store import Location, StoreError, TokenStore, open_store

# Tables in the order they are moved: the small queue first, so a failure on the big table
# leaves no token set half-moved (the target is refused as not empty; start again after
# emptying it).
TABLES = ("hook_events", "hook_deliveries", "invalidation_counts", "token_sets")


class MigrateRefused(RefresherdError):
    """The migration would not be safe now; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class MigrateReport:
    moved: dict[str, int]


async def migrate(source: Location, target: Location, *, now: float | None = None) -> MigrateReport:
    """Copy every table of ``source`` into the empty ``target``; MigrateRefused if unsafe."""
    src = await open_store(source, create=False, verify_keys=False)
    try:
        dst = await open_store(target, create=True, verify_keys=False)
        try:
            await _refuse_while_in_use(src, "source", now)
            await _refuse_while_in_use(dst, "target", now)
            moved: dict[str, int] = {}
            for table in TABLES:
                moved[table] = await dst.load_rows(table, src.export_rows(table))
            for table in TABLES:
                await _verify(src, dst, table)
            return MigrateReport(moved)
        finally:
            await dst.close()
    finally:
        await src.close()


async def _refuse_while_in_use(store: TokenStore, side: str, now: float | None) -> None:
    owners = await store.live_owners()
    if owners:
        raise MigrateRefused(
            f"the {side} database {store.location} is in use by refresherd process(es) "
            f"{', '.join(sorted(owners))}: stop every daemon and `refresherd refresh` using it, "
            "then run migrate again"
        )
    holders = await store.lease_holders(now=time.time() if now is None else now)
    if holders:
        raise MigrateRefused(
            f"the {side} database {store.location} has token sets leased by "
            f"{', '.join(sorted(holders))}: a refresh may be in flight; stop every daemon using "
            "it and wait for the leases to end (at most [daemon] lease_duration), then run "
            "migrate again"
        )


async def _digest(store: TokenStore, table: str) -> tuple[int, int]:
    """The row count and the sum of every row's SHA-256: independent of the order rows come
    in (the two databases may sort text keys differently), sensitive to any changed value."""
    total = 0
    count = 0
    async for batch in store.export_rows(table):
        for row in batch:
            total += int.from_bytes(hashlib.sha256(repr(tuple(row)).encode()).digest())
            count += 1
    return count, total % (1 << 256)


async def _verify(src: TokenStore, dst: TokenStore, table: str) -> None:
    if await _digest(src, table) != await _digest(dst, table):
        raise StoreError(
            f"migrate: {table} in {dst.location} does not match {src.location} after the copy; "
            "the source is unchanged: empty the target and run migrate again"
        )
