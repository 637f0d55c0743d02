"""The token store: one contract over two SQL databases.

The rest of the daemon imports from here: the contract (:class:`TokenStore` and the values that
cross it), database locations, and :func:`open_store`, the one place a backend is chosen. The
rooms, in the order a statement travels:

- ``location.py``: where the database is (a SQLite path or a PostgreSQL URL); imports the
  model alone, so the configuration types can name it;
- ``contract.py``: ``TokenStore`` (the Protocol both backends keep) and its values and errors,
  and what is wrong with a SQLite path before SQLite is asked (``location_problem``);
- ``sql.py``: ``SqlStore``, every statement both databases run, written once, with the dialect
  differences as data (``Operations``);
- ``rows.py``: a row as a ``TokenSet``, once for both drivers;
- ``migrations.py``: the schema, version by version, both dialects side by side;
- ``sqlite.py``: ``SqliteStore`` (WAL, group commit, flock owners);
- ``postgres.py``: ``PostgresStore`` (pool, ``SKIP LOCKED`` claims, advisory-lock owners, COPY).

The backends are imported only when a store is opened: asyncpg is an optional extra, and a
command that never opens a database (``check-config``) loads no driver.
"""

from __future__ import annotations

from typing import Any

from refresherd.store.contract import (
    HOOK_DELIVERY_COLUMNS,
    HOOK_EVENT_COLUMNS,
    INVALIDATION_COUNT_COLUMNS,
    READ_CONTRACT_VIEW,
    TOKEN_SET_COLUMNS,
    ChangeFeed,
    ClaimRefused,
    DatabaseMisconfigured,
    HookDelivery,
    NewTokenSet,
    RefusalReason,
    Row,
    StoreError,
    TokenSetExists,
    TokenStore,
    location_problem,
)
from refresherd.store.location import (
    Location,
    PostgresLocation,
    has_password,
    parse_location,
    postgres_location,
)

__all__ = [
    "HOOK_DELIVERY_COLUMNS",
    "HOOK_EVENT_COLUMNS",
    "INVALIDATION_COUNT_COLUMNS",
    "READ_CONTRACT_VIEW",
    "TOKEN_SET_COLUMNS",
    "ChangeFeed",
    "ClaimRefused",
    "DatabaseMisconfigured",
    "HookDelivery",
    "Location",
    "NewTokenSet",
    "PostgresLocation",
    "RefusalReason",
    "Row",
    "StoreError",
    "TokenSetExists",
    "TokenStore",
    "has_password",
    "location_problem",
    "open_store",
    "parse_location",
    "postgres_location",
]


async def open_store(
    location: Location, *, create: bool = True, cipher: Any = None, verify_keys: bool = True
) -> TokenStore:
    """Open the store at ``location``; ``create`` makes a missing SQLite file (PostgreSQL
    databases are never created, only migrated). ``verify_keys=False`` skips the check that
    ``cipher`` opens every sealed value: for ``refresherd migrate``, which copies values as
    they are stored and never opens one."""
    if isinstance(location, PostgresLocation):
        try:
            from refresherd.store.postgres import PostgresStore
        except ModuleNotFoundError as exc:
            if exc.name != "asyncpg":
                raise
            raise StoreError(
                f"database {location.display}: PostgreSQL needs the asyncpg driver: "
                "pip install 'refresherd[postgresql]'"
            ) from None

        return await PostgresStore.open(
            location, create=create, cipher=cipher, verify_keys=verify_keys
        )
    from refresherd.store.sqlite import SqliteStore

    return await SqliteStore.open(location, create=create, cipher=cipher, verify_keys=verify_keys)
