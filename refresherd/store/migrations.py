"""The schema, version by version, in both dialects side by side.

Version n has the same tables and columns in SQLite and in PostgreSQL (``refresherd migrate``
compares them), so each entry holds both scripts: a schema change is written here once, for
both, or not at all. SQLite records its version in ``PRAGMA user_version``, PostgreSQL in the
one row of ``refresherd_schema``; PostgreSQL's own bookkeeping (owners, the change counter)
comes with version 1. Never edit a released entry (its text is what databases in the field ran):
append a new one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

__all__ = ["MIGRATIONS", "POSTGRES", "SCHEMA_VERSION", "SQLITE", "Migration", "split_sql"]


@dataclass(frozen=True, slots=True)
class Migration:
    """The step from version ``version`` - 1 to ``version``, in each dialect."""

    version: int
    sqlite: str
    postgres: str


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        sqlite="""
    CREATE TABLE token_sets (
        id TEXT PRIMARY KEY NOT NULL,
        provider TEXT NOT NULL,
        access_token TEXT,
        refresh_token TEXT NOT NULL,
        token_type TEXT,
        scope TEXT,
        expires_at REAL,
        state TEXT NOT NULL DEFAULT 'active'
            CHECK (state IN ('active', 'failing', 'invalidated')),
        version INTEGER NOT NULL DEFAULT 1,
        next_refresh_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_refresh_at REAL,
        last_error TEXT,
        failures INTEGER NOT NULL DEFAULT 0,
        invalid_reason TEXT,
        lease_owner TEXT,
        lease_until REAL,
        attempt_version INTEGER,
        attempt_started_at REAL,
        attempt_owner TEXT,
        attempt_sends INTEGER
    ) STRICT;
    CREATE INDEX token_sets_due ON token_sets (next_refresh_at) WHERE state != 'invalidated';
    CREATE INDEX token_sets_leased ON token_sets (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX token_sets_journal ON token_sets (attempt_started_at)
        WHERE attempt_started_at IS NOT NULL;
    -- The read contract for applications that read access tokens straight from the database.
    -- Columns are only ever added to this view, never renamed or removed.
    CREATE VIEW refresherd_access_tokens AS
        SELECT id, provider, access_token, token_type, scope, expires_at,
               strftime('%Y-%m-%dT%H:%M:%SZ', expires_at, 'unixepoch') AS expires_at_rfc3339,
               state, updated_at
        FROM token_sets;
    """,
        postgres="""
    CREATE TABLE token_sets (
        -- "C": ids sort by their bytes, as in SQLite (keyset pagination, export order).
        id text COLLATE "C" PRIMARY KEY NOT NULL,
        provider text NOT NULL,
        access_token text,
        refresh_token text NOT NULL,
        token_type text,
        scope text,
        expires_at double precision,
        state text NOT NULL DEFAULT 'active'
            CHECK (state IN ('active', 'failing', 'invalidated')),
        version bigint NOT NULL DEFAULT 1,
        next_refresh_at double precision NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        last_refresh_at double precision,
        last_error text,
        failures integer NOT NULL DEFAULT 0,
        invalid_reason text,
        lease_owner text,
        lease_until double precision,
        attempt_version bigint,
        attempt_started_at double precision,
        attempt_owner text,
        attempt_sends integer
    );
    CREATE INDEX token_sets_due ON token_sets (next_refresh_at) WHERE state <> 'invalidated';
    CREATE INDEX token_sets_leased ON token_sets (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX token_sets_journal ON token_sets (attempt_started_at)
        WHERE attempt_started_at IS NOT NULL;
    -- The read contract for applications that read access tokens straight from the database.
    -- Columns are only ever added to this view, never renamed or removed.
    CREATE VIEW refresherd_access_tokens AS
        SELECT id, provider, access_token, token_type, scope, expires_at,
               to_char(to_timestamp(expires_at) AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS expires_at_rfc3339,
               state, updated_at
        FROM token_sets;
    -- Lease owners: each holds the session-level advisory lock (OWNER_LOCK_CLASS, lock_key)
    -- for as long as it lives; the lock free means the owner is gone.
    CREATE TABLE refresherd_owners (
        owner text PRIMARY KEY NOT NULL,
        lock_key integer NOT NULL UNIQUE,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL
    );
    -- The change signal (data_version): every statement that writes token_sets advances it.
    -- A sequence is not transactional and takes no row lock, so writers never queue on it.
    CREATE SEQUENCE refresherd_changes;
    CREATE FUNCTION refresherd_note_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM nextval('refresherd_changes');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER token_sets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON token_sets FOR EACH STATEMENT EXECUTE FUNCTION refresherd_note_change();
    """,
    ),
    Migration(
        2,
        sqlite="""
    -- The refresh token's absolute expiry where known (from the IdP's response or the token
    -- set's import); the provider's configured lifetime counts from created_at otherwise.
    ALTER TABLE token_sets ADD COLUMN refresh_expires_at REAL;
    """,
        postgres="""
    ALTER TABLE token_sets ADD COLUMN refresh_expires_at double precision;
    """,
    ),
    Migration(
        3,
        sqlite="""
    -- Per-token-set policy: an IdP setting change applies only to token sets authorized after
    -- it, so a set may carry its own values. NULL means: the provider's configured value.
    ALTER TABLE token_sets ADD COLUMN refresh_token_usage TEXT
        CHECK (refresh_token_usage IN ('one_time', 'reuse'));
    ALTER TABLE token_sets ADD COLUMN grace_period REAL;
    ALTER TABLE token_sets ADD COLUMN refresh_token_lifetime REAL;
    """,
        postgres="""
    ALTER TABLE token_sets ADD COLUMN refresh_token_usage text
        CHECK (refresh_token_usage IN ('one_time', 'reuse'));
    ALTER TABLE token_sets ADD COLUMN grace_period double precision;
    ALTER TABLE token_sets ADD COLUMN refresh_token_lifetime double precision;
    """,
    ),
    Migration(
        4,
        sqlite="""
    -- Sliding lifetime and keep-alive mode per token set (NULL: the provider's), and when the
    -- absolute refresh-token expiry the "expiring soon" warning was given for (once per expiry).
    ALTER TABLE token_sets ADD COLUMN refresh_token_idle_lifetime REAL;
    ALTER TABLE token_sets ADD COLUMN refresh_mode TEXT
        CHECK (refresh_mode IN ('access_token', 'keep_alive'));
    ALTER TABLE token_sets ADD COLUMN expiry_warned_for REAL;
    """,
        postgres="""
    ALTER TABLE token_sets ADD COLUMN refresh_token_idle_lifetime double precision;
    ALTER TABLE token_sets ADD COLUMN refresh_mode text
        CHECK (refresh_mode IN ('access_token', 'keep_alive'));
    ALTER TABLE token_sets ADD COLUMN expiry_warned_for double precision;
    """,
    ),
    Migration(
        5,
        sqlite="""
    -- The hook queue (refresherd.hooks): one row per event and target, kept until delivered
    -- or given up, so that no notification is lost across restarts. Payloads hold no secrets.
    -- next_attempt_at doubles as the claim: a dispatcher moves it past its delivery timeout.
    CREATE TABLE hook_deliveries (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        target TEXT NOT NULL CHECK (target IN ('webhook', 'command')),
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        delivered_at REAL,
        given_up_at REAL,
        UNIQUE (event_id, target)
    ) STRICT;
    CREATE INDEX hook_deliveries_due ON hook_deliveries (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    """,
        postgres="""
    CREATE TABLE hook_deliveries (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL,
        target text NOT NULL CHECK (target IN ('webhook', 'command')),
        event_type text NOT NULL,
        payload text NOT NULL,
        created_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        delivered_at double precision,
        given_up_at double precision,
        UNIQUE (event_id, target)
    );
    CREATE INDEX hook_deliveries_due ON hook_deliveries (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    """,
    ),
    Migration(
        6,
        sqlite="""
    -- One row a paused daemon rewrites to learn whether the database takes writes again: a
    -- real page write, so a full disk or a read-only file fails it, and a held lock blocks it.
    CREATE TABLE storage_probe (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at REAL NOT NULL,
        owner TEXT NOT NULL
    ) STRICT;
    """,
        postgres="""
    CREATE TABLE storage_probe (
        id integer PRIMARY KEY CHECK (id = 1),
        probed_at double precision NOT NULL,
        owner text NOT NULL
    );
    """,
    ),
    Migration(
        7,
        sqlite="""
    -- Start-up looks for sets written on a wall clock that has since been stepped back
    -- (Store.make_due_written_after): without this, a scan of every row under the write lock,
    -- 3 s at a million sets.
    CREATE INDEX token_sets_written ON token_sets (updated_at) WHERE state != 'invalidated';
    """,
        postgres="""
    CREATE INDEX token_sets_written ON token_sets (updated_at) WHERE state <> 'invalidated';
    """,
    ),
    Migration(
        8,
        sqlite="""
    -- Token-set events (refresherd.events), queued by whichever process observes them (a
    -- daemon with or without [hooks], `refresherd refresh`, the API), which need not know the
    -- hook targets: a daemon with [hooks] turns each into hook_deliveries rows for its own
    -- targets and deletes it (Store.expand_events). One that no daemon takes is deleted once
    -- older than hooks.give_up_after (Store.prune_events).
    CREATE TABLE hook_events (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    ) STRICT;
    CREATE INDEX hook_events_created ON hook_events (created_at);
    -- Invalidations counted in the database by the statement that makes them, whichever
    -- process that is: every daemon exports the same figures
    -- (refresherd_database_invalidations_total), so an invalidation made by `refresherd
    -- refresh`, which has no /metrics, is alerted on too. Seeded with the sets invalidated
    -- before this migration.
    CREATE TABLE invalidation_counts (
        provider TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (provider, reason)
    ) STRICT;
    INSERT INTO invalidation_counts (provider, reason, count)
        SELECT provider, coalesce(invalid_reason, 'unknown'), count(*) FROM token_sets
        WHERE state = 'invalidated' GROUP BY provider, coalesce(invalid_reason, 'unknown');
    CREATE TRIGGER token_sets_invalidated AFTER UPDATE OF state ON token_sets
        WHEN NEW.state = 'invalidated' AND OLD.state != 'invalidated'
    BEGIN
        INSERT INTO invalidation_counts (provider, reason, count)
            VALUES (NEW.provider, coalesce(NEW.invalid_reason, 'unknown'), 1)
            ON CONFLICT (provider, reason) DO UPDATE SET count = count + 1;
    END;
    """,
        postgres="""
    -- As in store.py's migration 8: events queued by whoever observes them, expanded into
    -- hook_deliveries by a daemon with [hooks]; invalidations counted by the statement that
    -- makes them (a row trigger), seeded with the sets invalidated before.
    CREATE TABLE hook_events (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        event_type text NOT NULL,
        payload text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE INDEX hook_events_created ON hook_events (created_at);
    CREATE TABLE invalidation_counts (
        provider text COLLATE "C" NOT NULL,
        reason text COLLATE "C" NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (provider, reason)
    );
    INSERT INTO invalidation_counts (provider, reason, count)
        SELECT provider, coalesce(invalid_reason, 'unknown'), count(*) FROM token_sets
        WHERE state = 'invalidated' GROUP BY provider, coalesce(invalid_reason, 'unknown');
    CREATE FUNCTION refresherd_count_invalidation() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO invalidation_counts AS c (provider, reason, count)
            VALUES (NEW.provider, coalesce(NEW.invalid_reason, 'unknown'), 1)
            ON CONFLICT (provider, reason) DO UPDATE SET count = c.count + 1;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER token_sets_invalidated AFTER UPDATE OF state ON token_sets FOR EACH ROW
        WHEN (NEW.state = 'invalidated' AND OLD.state <> 'invalidated')
        EXECUTE FUNCTION refresherd_count_invalidation();
    """,
    ),
    Migration(
        9,
        sqlite="""
    -- The journal tells sends the IdP may have processed from those it provably did not (a
    -- refused connection, a 429/503, another 4xx): after a grace window has closed, only a
    -- series with no unsettled send may start again; any other is a missed window.
    ALTER TABLE token_sets ADD COLUMN attempt_settled INTEGER;
    """,
        postgres="""
    -- store.MIGRATIONS[8]: sends settled as not processed, apart from those that may have been.
    ALTER TABLE token_sets ADD COLUMN attempt_settled integer;
    """,
    ),
    Migration(
        10,
        sqlite="""
    -- Connect links (refresherd.connect): one row per link handed out, found by the SHA-256 of
    -- its state (the state itself is never stored), taken (deleted) by the one callback that
    -- uses it, in one statement, whichever daemon of a fleet receives it. code_verifier is the
    -- PKCE secret, sealed like the token columns when encryption at rest is on. Rows expired
    -- long ago are pruned (Store.prune_connect_states); `refresherd migrate` does not move
    -- them: a link lives minutes.
    CREATE TABLE connect_states (
        state_digest TEXT PRIMARY KEY NOT NULL,
        provider TEXT NOT NULL,
        token_set_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        return_url TEXT,
        code_verifier TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) STRICT;
    CREATE INDEX connect_states_expiry ON connect_states (expires_at);
    """,
        postgres="""
    -- As in SQLite's migration 10: connect links, by the SHA-256 of their state, taken once.
    CREATE TABLE connect_states (
        state_digest text PRIMARY KEY NOT NULL,
        provider text NOT NULL,
        token_set_id text NOT NULL,
        redirect_uri text NOT NULL,
        return_url text,
        code_verifier text,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL
    );
    CREATE INDEX connect_states_expiry ON connect_states (expires_at);
    """,
    ),
    Migration(
        11,
        sqlite="""
    -- What the token API keeps in memory (web/token_cache.py) is kept true by this log: every
    -- change to what GET /v1/tokens/ID answers, by any connection of any process, and every
    -- delete, names its token set here, in commit order (one writer at a time, and the key
    -- only grows: the prune below never takes the newest row). A daemon's cache reads what
    -- came after the last row it saw when PRAGMA data_version says another connection
    -- committed. A later next_refresh_at changes no answer the cache gives (it serves only
    -- before the planned refresh), so deferrals and grants' re-plans alone are not logged.
    CREATE TABLE token_set_changes (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL
    ) STRICT;
    CREATE TRIGGER token_sets_answer_changed AFTER UPDATE ON token_sets
        WHEN OLD.id IS NOT NEW.id OR OLD.provider IS NOT NEW.provider
            OR OLD.access_token IS NOT NEW.access_token OR OLD.token_type IS NOT NEW.token_type
            OR OLD.scope IS NOT NEW.scope OR OLD.expires_at IS NOT NEW.expires_at
            OR OLD.state IS NOT NEW.state OR OLD.invalid_reason IS NOT NEW.invalid_reason
            OR OLD.version IS NOT NEW.version OR NEW.next_refresh_at < OLD.next_refresh_at
    BEGIN
        INSERT INTO token_set_changes (id) VALUES (OLD.id);
    END;
    CREATE TRIGGER token_sets_answer_deleted AFTER DELETE ON token_sets
    BEGIN
        INSERT INTO token_set_changes (id) VALUES (OLD.id);
    END;
    -- Bounded: every 4,096th change drops all but the last 65,536. A reader whose last row
    -- is gone forgets everything it holds (it cannot know what changed).
    CREATE TRIGGER token_set_changes_pruned AFTER INSERT ON token_set_changes
        WHEN NEW.seq % 4096 = 0
    BEGIN
        DELETE FROM token_set_changes WHERE seq <= NEW.seq - 65536;
    END;
    """,
        postgres="""
    -- The token API's cache (web/token_cache.py), as in SQLite's migration 11, told by
    -- NOTIFY instead of a log: PostgreSQL delivers a transaction's notifications when it
    -- commits, in commit order, to every session that listens; the payload is the set's id
    -- ('' after a TRUNCATE: everything).
    CREATE FUNCTION refresherd_answer_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('refresherd_token_answers', '');
        ELSE
            PERFORM pg_notify('refresherd_token_answers', OLD.id);
        END IF;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER token_sets_answer_changed AFTER UPDATE ON token_sets FOR EACH ROW
        WHEN (OLD.id IS DISTINCT FROM NEW.id OR OLD.provider IS DISTINCT FROM NEW.provider
            OR OLD.access_token IS DISTINCT FROM NEW.access_token
            OR OLD.token_type IS DISTINCT FROM NEW.token_type
            OR OLD.scope IS DISTINCT FROM NEW.scope
            OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
            OR OLD.state IS DISTINCT FROM NEW.state
            OR OLD.invalid_reason IS DISTINCT FROM NEW.invalid_reason
            OR OLD.version IS DISTINCT FROM NEW.version
            OR NEW.next_refresh_at < OLD.next_refresh_at)
        EXECUTE FUNCTION refresherd_answer_changed();
    CREATE TRIGGER token_sets_answer_deleted AFTER DELETE ON token_sets FOR EACH ROW
        EXECUTE FUNCTION refresherd_answer_changed();
    CREATE TRIGGER token_sets_answer_truncated AFTER TRUNCATE ON token_sets
        FOR EACH STATEMENT EXECUTE FUNCTION refresherd_answer_changed();
    """,
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
# Each dialect's scripts, index i moving the schema from version i to i + 1.
SQLITE: Final[tuple[str, ...]] = tuple(m.sqlite for m in MIGRATIONS)
POSTGRES: Final[tuple[str, ...]] = tuple(m.postgres for m in MIGRATIONS)


def split_sql(script: str) -> list[str]:
    """Split a SQLite migration into statements (sqlite3.complete_statement knows about
    quoting)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not buffer.strip():
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
