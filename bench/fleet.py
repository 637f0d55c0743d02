"""Fleet benchmark: N token sets refreshed once by 1..D daemons, on SQLite and on PostgreSQL.

    python bench/fleet.py --sets 10000 --daemons 1,3 --postgres postgresql://user@127.0.0.1/postgres

Each run gets a fresh database (a new SQLite file; a new PostgreSQL database, created through
the ``--postgres`` URL, whose role needs CREATEDB; the password from PGPASSWORD or ~/.pgpass,
or $REFRESHERD_TEST_POSTGRES, which .ci/run sets, when --postgres is not given), imports the
sets (all due at once), starts the daemons as real ``refresherd run`` processes against the
same fake IdP process, and reports refreshes/s from the first to the last refresh, each
daemon's share, and CPU ms per refresh (daemons only). ``--kill-one`` SIGKILLs the first daemon
when a fifth of the work is done: the survivors must finish it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import run  # bench/run.py: the fake IdP process, daemons, scraping

from refresherd.store import TOKEN_SET_COLUMNS, Location, open_store, parse_location


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _database_entries(url: str, workdir: Path) -> str:
    """The config lines for ``url``: its password, if any, in a 0600 file."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    lines = f'database = "{urlunsplit((parts.scheme, user + host, parts.path, parts.query, ""))}"\n'
    if parts.password is not None:
        secret = workdir / "database-password"
        secret.write_text(unquote(parts.password), encoding="utf-8")
        secret.chmod(0o600)
        lines += f'database_password_file = "{secret}"\n'
    return lines


def _config(
    workdir: Path, name: str, database: str, token_url: str, concurrency: int
) -> tuple[Path, int]:
    port = run.free_port()
    secret = workdir / "client-secret"
    secret.write_text(run.CLIENT_SECRET, encoding="utf-8")
    secret.chmod(0o600)
    config = workdir / f"{name}.toml"
    config.write_text(
        f"""[daemon]
{database}concurrency = {concurrency}
poll_interval = "200ms"
instance_name = "{name}"

[server]
listen = "127.0.0.1:{port}"

[log]
level = "info"
format = "json"

[schedule]
import_spread = 0.0

[providers.{run.PROVIDER}]
token_url = "{token_url}"
client_id = "{run.CLIENT_ID}"
client_secret_file = "{secret}"
refresh_token_usage = "reuse"
grace_period = "30s"
max_connections = {concurrency}
""",
        encoding="utf-8",
    )
    return config, port


def one_run(
    args: argparse.Namespace, idp: run.IdP, backend: str, daemons: int, workdir: Path
) -> dict[str, Any]:
    n = args.sets
    created: str | None = None
    location: Location
    if backend == "sqlite":
        location = workdir / f"fleet-{daemons}-{secrets.token_hex(4)}.db"
        database = f'database = "{location}"\n'
    else:
        name = f"refresherd_bench_{secrets.token_hex(4)}"
        asyncio.run(_admin(args.postgres, f"CREATE DATABASE {name}"))
        created = name
        location = parse_location(_with_database(args.postgres, name), base_dir=workdir)
        database = _database_entries(_with_database(args.postgres, name), workdir)
    try:
        configs = [
            _config(workdir, f"{backend}-{daemons}-{i}", database, idp.token_url, args.concurrency)
            for i in range(daemons)
        ]
        lines = workdir / "import.jsonl"
        with lines.open("w", encoding="utf-8") as f:
            for i, t in enumerate(idp.tokens[:n]):
                f.write(
                    json.dumps(
                        {
                            "id": f"ts-{i}",
                            "provider": run.PROVIDER,
                            "refresh_token": t["refresh_token"],
                        }
                    )
                    + "\n"
                )
        import_s = run.import_tokens(configs[0][0], lines)
        procs = []
        logs = []
        for config, _port in configs:
            log = (workdir / f"{config.stem}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(run.refresherd(config, "run"), stdout=log, stderr=log))
        ports = [port for _, port in configs]
        try:
            for proc, port, log in zip(procs, ports, logs, strict=True):
                run.wait_ready(proc, port, log_name=log.name, timeout=120)
            cpu = {p.pid: run.cpu_seconds(p.pid) for p in procs}
            # A small run can finish between two polls: then the clock starts at readiness.
            ready = time.perf_counter()
            alive = list(range(daemons))
            killed = False
            counts = [0.0] * daemons
            first = last = None
            next_check = 0.0
            deadline = time.monotonic() + max(300.0, n / 20)
            while time.monotonic() < deadline:
                for i in alive:
                    m = run.scrape(ports[i])
                    counts[i] = run.successes(m) + run.failures(m)
                done = sum(counts)
                now = time.perf_counter()
                if first is None and done > 0:
                    first = ready if done >= n else now
                if done >= n or (killed and now >= next_check and _all_refreshed(location)):
                    # After a kill the database says when all is done: the dead daemon's last
                    # refreshes are in neither its scrape nor, if it died first, its log.
                    last = now
                    if killed:
                        counts[0] = n - sum(counts[i] for i in alive)
                    break
                if killed and now >= next_check:
                    next_check = now + 1.0
                if args.kill_one and not killed and daemons > 1 and done >= n / 5:
                    procs[0].send_signal(signal.SIGKILL)
                    procs[0].wait()
                    alive.remove(0)
                    killed = True
                time.sleep(0.05)
            spent = sum(run.cpu_seconds(procs[i].pid) - cpu[procs[i].pid] for i in alive)
            elapsed = (last or time.perf_counter()) - (first or time.perf_counter())
            survivors = [int(counts[i]) for i in alive]
            return {
                "backend": backend,
                "daemons": daemons,
                "sets": n,
                "import_s": import_s,
                "done": int(sum(counts)),
                "per_second": sum(counts) / elapsed if elapsed > 0 else None,
                "shares": [int(c) for c in counts],
                "killed_first": killed,
                "survivor_spread": (max(survivors) - min(survivors)) / max(survivors)
                if survivors and max(survivors)
                else None,
                "cpu_ms_per_refresh": 1000 * spent / sum(counts[i] for i in alive)
                if not killed and sum(counts)
                else None,
            }
        finally:
            for proc in procs:
                if proc.poll() is None:
                    run.stop(proc, timeout=60)
            for log in logs:
                log.close()
    finally:
        if created is not None:
            asyncio.run(_admin(args.postgres, f"DROP DATABASE IF EXISTS {created} WITH (FORCE)"))


def _all_refreshed(location: Location) -> bool:
    """Has every token set been refreshed (version 2 or more)? Read through the store."""

    async def check() -> bool:
        store = await open_store(location, create=False)
        try:
            async for batch in store.export_rows("token_sets"):
                if any(row[TOKEN_SET_COLUMNS.index("version")] < 2 for row in batch):
                    return False
            return True
        finally:
            await store.close()

    return asyncio.run(check())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sets", type=int, default=10_000)
    p.add_argument("--daemons", default="1,3", help="fleet sizes to run")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--concurrency", type=int, default=32, help="each daemon's")
    p.add_argument("--latency", type=float, default=0.02, help="IdP latency, seconds")
    p.add_argument("--kill-one", action="store_true", help="SIGKILL one daemon at 20 %%")
    p.add_argument("--postgres", default=os.environ.get("REFRESHERD_TEST_POSTGRES"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    if "postgresql" in backends and not args.postgres:
        p.error(
            "--postgres URL (or $REFRESHERD_TEST_POSTGRES) is needed for the postgresql backend"
        )
    sizes = [int(d) for d in args.daemons.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="refresherd-fleet-") as tmp:
        workdir = Path(tmp)
        with run.fake_idp(workdir, tokens=args.sets, latency=args.latency) as idp:
            for backend in backends:
                for daemons in sizes:
                    r = one_run(args, idp, backend, daemons, workdir)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    report = {
        "benchmark": "fleet",
        "machine": run.machine(),
        "latency_s": args.latency,
        "runs": results,
    }
    print("\n| backend | daemons | refreshes/s | shares | survivors' spread | CPU ms/refresh |")
    print("|---|---:|---:|---|---:|---:|")
    for r in results:
        spread = "" if r["survivor_spread"] is None else f"{r['survivor_spread']:.0%}"
        cpu = "" if r["cpu_ms_per_refresh"] is None else f"{r['cpu_ms_per_refresh']:.2f}"
        rate = "" if r["per_second"] is None else f"{r['per_second']:,.0f}"
        print(
            f"| {r['backend']} | {r['daemons']}{' (1 killed)' if r['killed_first'] else ''} "
            f"| {rate} | {'/'.join(map(str, r['shares']))} "
            f"| {spread} | {cpu} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
