"""Committed writes per second of the store, on SQLite and on PostgreSQL, by concurrency.

    python bench/store_writes.py [--writers 1,16,64] [--seconds 5] [--postgres URL]
                                 [--pool-size 10]

Each writer is a task that stores grants (``save_grant``: the compare-and-swap every refresh
ends with, committed before it returns) for its own token sets, one after another; writers run
concurrently on one store, as a daemon's refreshes do. SQLite is a file in a temporary
directory (WAL, synchronous=FULL: group commit in store/sqlite.py); PostgreSQL is
``--postgres`` or a private cluster started from this machine's binaries with its durable
defaults (fsync on, synchronous_commit on; concurrent commits share WAL flushes). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pg_fixtures import LocalCluster, postgres_bin_dir, with_database  # noqa: E402

from refresherd.model import Secret  # noqa: E402
from refresherd.store import (  # noqa: E402
    Location,
    NewTokenSet,
    PostgresLocation,
    TokenStore,
    open_store,
    postgres_location,
)
from refresherd.store.postgres import DEFAULT_POOL_SIZE, PostgresStore  # noqa: E402

OWNER = "bench-1-00000000"
SETS_PER_WRITER = 50


async def run(location: Location, writers: int, seconds: float, pool_size: int) -> float:
    if isinstance(location, PostgresLocation):
        store: TokenStore = await PostgresStore.open(location, pool_size=pool_size)
    else:
        store = await open_store(location)
    try:
        ids = [f"w{w}-s{i}" for w in range(writers) for i in range(SETS_PER_WRITER)]
        await store.add_many(
            [
                NewTokenSet(
                    id=i,
                    provider="bench",
                    refresh_token=Secret(f"rt-{i}-1"),
                    access_token=None,
                    expires_at=None,
                    next_refresh_at=0.0,
                )
                for i in ids
            ],
            now=1.0,
        )
        done = 0
        deadline = time.monotonic() + seconds

        async def writer(w: int) -> None:
            nonlocal done
            versions = dict.fromkeys(range(SETS_PER_WRITER), 1)
            n = 0
            while time.monotonic() < deadline:
                i = n % SETS_PER_WRITER
                v = versions[i]
                saved = await save(store, f"w{w}-s{i}", v)
                assert saved, "a compare-and-swap failed: the benchmark is broken"
                versions[i] = v + 1
                n += 1
                done += 1

        start = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for w in range(writers):
                tg.create_task(writer(w))
        return done / (time.monotonic() - start)
    finally:
        await store.close()


async def save(store: TokenStore, token_set_id: str, version: int) -> bool:
    saved = await store.save_grant(
        token_set_id,
        owner=OWNER,
        expected_version=version,
        sent_refresh_token=Secret(f"rt-{token_set_id}-{version}"),
        access_token=Secret(f"at-{token_set_id}-{version + 1}"),
        refresh_token=Secret(f"rt-{token_set_id}-{version + 1}"),
        token_type="Bearer",
        scope=None,
        expires_at=3600.0,
        next_refresh_at=3000.0,
        now=2.0,
    )
    return saved is not None


async def fresh_postgres(admin: str, name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await conn.close()
    return with_database(admin, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--postgres", help="admin URL of a server (default: start one)")
    parser.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE)
    args = parser.parse_args()
    counts = [int(w) for w in args.writers.split(",")]
    cluster = None
    admin = args.postgres
    if admin is None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            sys.exit("no PostgreSQL binaries: pass --postgres URL")
        cluster = LocalCluster(bin_dir)
        admin = cluster.start("-c max_connections=200")
    try:
        print(f"{'writers':>8} {'sqlite writes/s':>16} {'postgresql writes/s':>20}")
        for writers in counts:
            with tempfile.TemporaryDirectory() as tmp:
                lite = asyncio.run(run(Path(tmp) / "bench.db", writers, args.seconds, 0))
            url = asyncio.run(fresh_postgres(admin, f"refresherd_bench_{writers}"))
            pg = asyncio.run(run(postgres_location(url), writers, args.seconds, args.pool_size))
            print(f"{writers:>8} {lite:>16.0f} {pg:>20.0f}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
