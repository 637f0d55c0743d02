"""Rows as the daemon sees them: one mapping of a ``token_sets`` row to a TokenSet for both
databases (a sqlite3.Row and an asyncpg.Record are both read by column name), the columns a new
set is inserted with, and the tables ``refresherd migrate`` moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final, Protocol

from refresherd.encryption import EncryptionError, TokenCipher
from refresherd.model import Attempt, RefreshMode, RefreshTokenUsage, Secret, State, TokenSet
from refresherd.store.contract import (
    HOOK_DELIVERY_COLUMNS,
    HOOK_EVENT_COLUMNS,
    INVALIDATION_COUNT_COLUMNS,
    TOKEN_SET_COLUMNS,
    StoreError,
)


class RowLike(Protocol):
    """What both drivers' rows offer: values by position or column name, and the names."""

    def keys(self) -> Iterable[str]: ...
    def __getitem__(self, key: Any, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...


# The columns a new token set is inserted with (add_many, import_stream), in the order of
# SqlStore._insert_values.
INSERT_COLUMNS_SQL: Final = (
    "id, provider, access_token, refresh_token, token_type, scope, expires_at, next_refresh_at,"
    " refresh_expires_at, refresh_token_usage, grace_period, refresh_token_lifetime,"
    " refresh_token_idle_lifetime, refresh_mode, created_at, updated_at"
)
INSERT_COLUMNS: Final = tuple(INSERT_COLUMNS_SQL.split(", "))


# Enum lookups by value without EnumType.__call__ (its cost shows at two rows per refresh); a
# value not in the table still goes through the enum, which names what is wrong.
_STATES: Final = {m.value: m for m in State}
_USAGES: Final = {m.value: m for m in RefreshTokenUsage}
_MODES: Final = {m.value: m for m in RefreshMode}


def row_to_token_set(row: RowLike, cipher: TokenCipher | None = None) -> TokenSet:
    """A ``token_sets`` row (``SELECT *``) as a TokenSet, its tokens opened when sealed."""
    # A dict first: a sqlite3.Row looks a name up by comparing it with every column's.
    r = dict(zip(row.keys(), row, strict=True))
    attempt = None
    if r["attempt_started_at"] is not None:
        attempt = Attempt(
            version=r["attempt_version"],
            started_at=r["attempt_started_at"],
            owner=r["attempt_owner"] or "",
            sends=r["attempt_sends"] or 0,
            settled=r["attempt_settled"] or 0,
        )
    access = r["access_token"]
    refresh = r["refresh_token"]
    if cipher is not None:
        try:
            refresh = cipher.open(refresh, row_id=r["id"], column="refresh_token")
            if access is not None:
                access = cipher.open(access, row_id=r["id"], column="access_token")
        except EncryptionError as exc:
            raise StoreError(str(exc)) from None
    state = r["state"]
    usage = r["refresh_token_usage"]
    mode = r["refresh_mode"]
    return TokenSet(
        id=r["id"],
        provider=r["provider"],
        refresh_token=Secret(refresh),
        access_token=Secret(access) if access is not None else None,
        expires_at=r["expires_at"],
        state=_STATES.get(state) or State(state),
        version=r["version"],
        next_refresh_at=r["next_refresh_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        token_type=r["token_type"],
        scope=r["scope"],
        last_refresh_at=r["last_refresh_at"],
        last_error=r["last_error"],
        failures=r["failures"],
        invalid_reason=r["invalid_reason"],
        lease_owner=r["lease_owner"],
        lease_until=r["lease_until"],
        attempt=attempt,
        refresh_expires_at=r["refresh_expires_at"],
        refresh_token_usage=(
            (_USAGES.get(usage) or RefreshTokenUsage(usage)) if usage is not None else None
        ),
        grace_period=r["grace_period"],
        refresh_token_lifetime=r["refresh_token_lifetime"],
        refresh_token_idle_lifetime=r["refresh_token_idle_lifetime"],
        refresh_mode=(_MODES.get(mode) or RefreshMode(mode)) if mode is not None else None,
        expiry_warned_for=r["expiry_warned_for"],
    )


def table_columns(table: str) -> tuple[tuple[str, ...], str]:
    """The columns ``refresherd migrate`` moves for ``table``, and the key it pages by (a
    composite key: a small table, read in one batch in that order)."""
    if table == "token_sets":
        return TOKEN_SET_COLUMNS, "id"
    if table == "hook_deliveries":
        return HOOK_DELIVERY_COLUMNS, "id"
    if table == "hook_events":
        return HOOK_EVENT_COLUMNS, "id"
    if table == "invalidation_counts":
        return INVALIDATION_COUNT_COLUMNS, "provider, reason"
    raise ValueError(f"not a table refresherd moves: {table!r}")


def open_tokens(
    cipher: TokenCipher, row_id: str, access: str | None, refresh: str
) -> tuple[str | None, str]:
    """A row's access and refresh tokens as stored, opened (for rekey)."""
    try:
        return (
            None if access is None else cipher.open(access, row_id=row_id, column="access_token"),
            cipher.open(refresh, row_id=row_id, column="refresh_token"),
        )
    except EncryptionError as exc:
        raise StoreError(str(exc)) from None
