"""Stands in for your application in deploy/compose.yaml: reads the access token of one token set
through refresherd's read contract (the view ``refresherd_access_tokens``, README.md) and reports
when it expires. It never prints the token itself. Standard library only.

    REFRESHERD_DATABASE  the database (default /var/lib/refresherd/tokens.db)
    TOKEN_SET_ID         the token set to read (default customer-42)
    READ_INTERVAL        seconds between reads (default 30)
    --once               read once; exit 0 if a usable access token was found, else 1
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

QUERY = (
    "SELECT access_token, expires_at, expires_at_rfc3339 FROM refresherd_access_tokens"
    " WHERE id = ? AND state != 'invalidated'"
)


def connect(database: str) -> sqlite3.Connection:
    # Read-only. On a read-only mount SQLite opens a WAL database only while refresherd has it
    # open (its -wal and -shm files exist); a connection opened then keeps working across a
    # restart of refresherd. So open once, keep the connection, and retry while the open fails.
    return sqlite3.connect(f"{Path(database).absolute().as_uri()}?mode=ro", uri=True, timeout=5)


def read_access_token(
    conn: sqlite3.Connection, token_set_id: str
) -> tuple[str, float | None, str | None]:
    """(access token, expiry in Unix seconds, expiry as RFC 3339); LookupError if unusable."""
    row = conn.execute(QUERY, (token_set_id,)).fetchone()
    if row is None or row[0] is None:
        raise LookupError(f"{token_set_id}: no usable access token (not added yet, or invalidated)")
    return row[0], row[1], row[2]


def main(argv: list[str]) -> int:
    database = os.environ.get("REFRESHERD_DATABASE", "/var/lib/refresherd/tokens.db")
    token_set_id = os.environ.get("TOKEN_SET_ID", "customer-42")
    interval = float(os.environ.get("READ_INTERVAL", "30"))
    once = "--once" in argv
    conn: sqlite3.Connection | None = None
    while True:
        status = 1
        try:
            if conn is None:
                conn = connect(database)
            token, expires_at, expires_at_rfc3339 = read_access_token(conn, token_set_id)
        except sqlite3.Error as exc:
            print(f"cannot read {database}: {exc}", file=sys.stderr, flush=True)
            if conn is not None:
                conn.close()
                conn = None
        except LookupError as exc:
            print(exc, file=sys.stderr, flush=True)
        else:
            # Use it here: headers = {"Authorization": f"Bearer {token}"}
            if expires_at is None:
                validity = "with an unknown expiry"
            else:
                validity = f"valid until {expires_at_rfc3339} (in {expires_at - time.time():.0f}s)"
            print(f"{token_set_id}: access token ({len(token)} chars) {validity}", flush=True)
            status = 0
        if once:
            return status
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
