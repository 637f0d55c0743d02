"""``python bench/run.py reads``: the token API's reads against a bare ASGI handler.

The daemon (a real ``refresherd run``, its token API on TCP and on a unix socket, the sets
imported with ``refresherd tokens import`` and fresh, so no refresh runs) and a bare ASGI app
(bench/reads_bare.py: a dict lookup returning the same bytes, served by the same serving code,
refresherd.web.app.serve) are read by the same load client, 100 connections, for a few seconds
each, TCP and unix socket, daemon and bare alternating so that a noisy neighbour hits both
alike. Reported per run: GETs/s, the server's CPU µs per GET (its /proc counters) and p99
latency; the ratios daemon / bare are within one round.

The load client: ``wrk`` (Debian's package) for TCP and ``autocannon`` (npm) for the unix
socket, which wrk does not speak, where installed (``--client auto``); else aiohttp in one
process, a task per connection, which speaks both but tops out near 5,000 GETs/s here, below
what the server can do (then both sides meet the client's ceiling and the ratio says little).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import run as bench

BEARER = "bench-api-bearer-0123456789abcdef"


def write_reads_config(
    workdir: Path, *, sets: int, cache_size: int | None
) -> tuple[Path, int, Path]:
    """A daemon config with the API on TCP and a unix socket, and ``sets`` fresh sets."""
    port = bench.free_port()
    sock = workdir / "api.sock"
    bearer = workdir / "api.bearer"
    bearer.write_text(BEARER, encoding="utf-8")
    bearer.chmod(0o600)
    secret = workdir / "client-secret"
    secret.write_text(bench.CLIENT_SECRET, encoding="utf-8")
    secret.chmod(0o600)
    config = workdir / "config.toml"
    config.write_text(
        f"""[daemon]
database = "{workdir / "tokens.db"}"

[server]
listen = "127.0.0.1:{port}"

[log]
level = "warning"
format = "json"

[api]
enabled = true
bearer_token_file = "{bearer}"
unix_socket = "{sock}"
{"" if cache_size is None else f"cache_size = {cache_size}"}

[providers.{bench.PROVIDER}]
token_url = "http://127.0.0.1:9/token"
client_id = "{bench.CLIENT_ID}"
client_secret_file = "{secret}"
""",
        encoding="utf-8",
    )
    lines = workdir / "sets.jsonl"
    with lines.open("w", encoding="utf-8") as f:
        for i in range(sets):
            record = {
                "id": f"app-{i:04d}",
                "provider": bench.PROVIDER,
                "access_token": f"at-{i:04d}-" + "x" * 800,  # a JWT's size
                "refresh_token": f"rt-{i:04d}",
                "expires_in": 3600,
                "token_type": "Bearer",
                "scope": "openid offline_access",
            }
            f.write(json.dumps(record) + "\n")
    bench.import_tokens(config, lines)
    return config, port, sock


@contextmanager
def daemon(config: Path, port: int, workdir: Path) -> Iterator[int]:
    log = (workdir / "daemon.log").open("wb")
    process = subprocess.Popen(bench.refresherd(config, "run"), stdout=log, stderr=log)
    try:
        bench.wait_ready(process, port, log_name=log.name, timeout=60)
        yield process.pid
    finally:
        bench.stop(process, timeout=30)
        log.close()


def fetch_bodies(port: int, sets: int) -> dict[str, str]:
    """What the daemon answers for each set, as the bare app will answer it."""
    bodies = {}
    for i in range(sets):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/tokens/app-{i:04d}",
            headers={"Authorization": f"Bearer {BEARER}"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (http, ours)
            bodies[f"app-{i:04d}"] = r.read().decode()
    return bodies


@contextmanager
def bare(workdir: Path, bodies: dict[str, str]) -> Iterator[tuple[int, int, Path]]:
    path = workdir / "bodies.json"
    path.write_text(json.dumps(bodies), encoding="utf-8")
    port = bench.free_port()
    sock = workdir / "bare.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            str(bench.BENCH / "reads_bare.py"),
            "--bodies",
            str(path),
            "--port",
            str(port),
            "--unix-socket",
            str(sock),
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare ASGI app did not start") from None
                time.sleep(0.05)
        yield process.pid, port, sock
    finally:
        bench.stop(process, timeout=30)


# --------------------------------------------------------------------------- load clients


async def _aiohttp_load(
    target: str, ids: list[str], connections: int, seconds: float
) -> dict[str, Any]:
    import aiohttp

    if target.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=target[5:], limit=connections)
        base = "http://refresherd"
    else:
        connector = aiohttp.TCPConnector(limit=connections)
        base = target
    headers = {"Authorization": f"Bearer {BEARER}"}
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int) -> None:
            nonlocal errors
            started = time.perf_counter()
            async with session.get(f"{base}/v1/tokens/{ids[i % len(ids)]}") as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

        # Warm up: every connection open, every answer read once.
        await asyncio.gather(*(one(i) for i in range(max(connections, len(ids)))))
        latencies.clear()
        stop_at = time.perf_counter() + seconds

        async def connection(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                await one(i)
                i += connections

        started = time.perf_counter()
        await asyncio.gather(*(connection(k) for k in range(connections)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": 1000 * bench.percentile(latencies, 0.50),
        "p99_ms": 1000 * bench.percentile(latencies, 0.99),
    }


_WRK_LUA = """
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/v1/tokens/app-" .. string.format("%04d", i % SETS))
end
"""


def _wrk_load(url: str, sets: int, connections: int, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA.replace("SETS", str(sets)))
        script = f.name
    try:
        proc = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, int(seconds))}s",
                "--latency",
                "-s",
                script,
                "-H",
                f"Authorization: Bearer {BEARER}",
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script)
    out = proc.stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(m?s)", out)
    seconds_taken = float(elapsed.group(1)) / (1000 if elapsed.group(2) == "ms" else 1)  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def latency(q: str) -> float:
        found = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert found, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
        return float(found.group(1)) * scale

    return {
        "requests": requests,
        "errors": int(errors.group(1)) if errors else 0,
        "seconds": seconds_taken,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
    }


def _autocannon_load(target: str, sets: int, connections: int, seconds: float) -> dict[str, Any]:
    url, sock = (
        (target, "") if not target.startswith("unix:") else ("http://refresherd", target[5:])
    )
    root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=True)
    proc = subprocess.run(
        [
            "node",
            str(bench.BENCH / "reads_autocannon.js"),
            url,
            sock,
            str(sets),
            str(max(1, int(seconds))),
            BEARER,
            str(connections),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NODE_PATH": root.stdout.strip()},
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "requests": out["requests"],
        "errors": out["non2xx"] + out["errors"],
        "seconds": out["seconds"],
        "p50_ms": float(out["p50"]),
        "p99_ms": float(out["p99"]),
    }


def has_autocannon() -> bool:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return False
    root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=False)
    return (Path(root.stdout.strip()) / "autocannon").is_dir()


def client_for(choice: str, transport: str) -> str:
    """``auto``: the fastest client installed for the transport (wrk for TCP, autocannon for
    the unix socket, which wrk does not speak), else aiohttp."""
    if choice != "auto":
        return choice
    if transport == "tcp" and shutil.which("wrk") is not None:
        return "wrk"
    if has_autocannon():
        return "autocannon"
    return "aiohttp"


def measure(
    pid: int, target: str, *, sets: int, client: str, connections: int, seconds: float
) -> dict[str, Any]:
    cpu = bench.cpu_seconds(pid)
    if client == "wrk":
        result = _wrk_load(target, sets, connections, seconds)
    elif client == "autocannon":
        result = _autocannon_load(target, sets, connections, seconds)
    else:
        ids = [f"app-{i:04d}" for i in range(sets)]
        result = asyncio.run(_aiohttp_load(target, ids, connections, seconds))
    # The warm-up's CPU is in the figure too, a few hundred requests of thousands: counted in.
    used = bench.cpu_seconds(pid) - cpu
    result["gets_per_s"] = result["requests"] / result["seconds"]
    result["cpu_us_per_get"] = 1e6 * used / max(result["requests"], 1)
    return result


# --------------------------------------------------------------------------- the benchmark


def reads(args: argparse.Namespace) -> dict[str, Any]:
    # The daemon's server (web.app.serve); Hypercorn was measured beside it before the switch
    # (docs/benchmarks.md, "Token reads").
    servers = ["uvicorn"]
    transports = args.transports.split(",")
    if args.client == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), or use --client aiohttp")
    if args.client == "wrk" and "unix" in transports:
        raise SystemExit("wrk speaks TCP only: --transports tcp, or --client aiohttp")
    if args.client == "autocannon" and not has_autocannon():
        raise SystemExit("autocannon is not installed (npm install -g autocannon)")
    clients = {t: client_for(args.client, t) for t in transports}
    rounds: list[dict[str, Any]] = []
    with bench.run_directory(keep=args.keep_workdir) as tmp:
        workdir = Path(tmp)
        config, port, sock = write_reads_config(workdir, sets=args.sets, cache_size=args.cache_size)
        for server in servers:
            with daemon(config, port, workdir) as daemon_pid:
                bodies = fetch_bodies(port, args.sets)
                with bare(workdir, bodies) as (bare_pid, bare_port, bare_sock):
                    for n in range(args.repeat):
                        for transport in transports:
                            targets = {
                                "daemon": (
                                    daemon_pid,
                                    f"http://127.0.0.1:{port}"
                                    if transport == "tcp"
                                    else f"unix:{sock}",
                                ),
                                "bare": (
                                    bare_pid,
                                    f"http://127.0.0.1:{bare_port}"
                                    if transport == "tcp"
                                    else f"unix:{bare_sock}",
                                ),
                            }
                            # Alternating which goes first, round by round.
                            order = ["daemon", "bare"] if n % 2 == 0 else ["bare", "daemon"]
                            row: dict[str, Any] = {
                                "server": server,
                                "transport": transport,
                                "client": clients[transport],
                                "round": n + 1,
                            }
                            for who in order:
                                pid, target = targets[who]
                                row[who] = measure(
                                    pid,
                                    target,
                                    sets=args.sets,
                                    client=clients[transport],
                                    connections=args.connections,
                                    seconds=args.seconds,
                                )
                            row["ratio"] = row["daemon"]["gets_per_s"] / row["bare"]["gets_per_s"]
                            # What the ratio would be with the CPU alone deciding (steadier
                            # than GETs/s on a shared machine: a neighbour's burst stalls a
                            # run's GETs, not its CPU per GET).
                            row["cpu_ratio"] = (
                                row["bare"]["cpu_us_per_get"] / row["daemon"]["cpu_us_per_get"]
                            )
                            print_row(row)
                            rounds.append(row)
    return {
        "benchmark": "reads",
        "clients": clients,
        "connections": args.connections,
        "seconds": args.seconds,
        "sets": args.sets,
        "cache_size": args.cache_size,
        "rounds": rounds,
        "summary": summarize(rounds),
    }


def print_row(row: dict[str, Any]) -> None:
    d, b = row["daemon"], row["bare"]
    print(
        f"{row['server']:>9} {row['transport']:>4} ({row['client']}) #{row['round']}: "
        f"daemon {d['gets_per_s']:7.0f}/s {d['cpu_us_per_get']:4.0f} µs p99 {d['p99_ms']:5.1f} ms"
        f" | bare {b['gets_per_s']:7.0f}/s {b['cpu_us_per_get']:4.0f} µs p99 {b['p99_ms']:5.1f} ms"
        f" | ratio {row['ratio']:.2f} (CPU {row['cpu_ratio']:.2f})"
        + (f"  errors {d['errors']}/{b['errors']}" if d["errors"] or b["errors"] else ""),
        flush=True,
    )


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in sorted({(r["server"], r["transport"]) for r in rounds}):
        rows = [r for r in rounds if (r["server"], r["transport"]) == key]
        ratios = [r["ratio"] for r in rows]
        cpu_ratios = [r["cpu_ratio"] for r in rows]
        summary[f"{key[0]}/{key[1]}"] = {
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_median": statistics.median(ratios),
            "cpu_ratio_min": min(cpu_ratios),
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "daemon_gets_per_s": [round(r["daemon"]["gets_per_s"]) for r in rows],
            "bare_gets_per_s": [round(r["bare"]["gets_per_s"]) for r in rows],
            "daemon_cpu_us": [round(r["daemon"]["cpu_us_per_get"]) for r in rows],
            "bare_cpu_us": [round(r["bare"]["cpu_us_per_get"]) for r in rows],
            "daemon_p99_ms": [round(r["daemon"]["p99_ms"], 1) for r in rows],
            "bare_p99_ms": [round(r["bare"]["p99_ms"], 1) for r in rows],
        }
    return summary


def add_parser(sub: Any) -> None:
    r = sub.add_parser("reads", help="token API GETs vs a bare ASGI handler on the same server")
    r.add_argument("--sets", type=int, default=100, help="token sets read, round robin")
    r.add_argument("--connections", type=int, default=100)
    r.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    r.add_argument("--repeat", type=int, default=2, help="rounds per server and transport")
    r.add_argument("--transports", default="tcp,unix")
    r.add_argument(
        "--cache-size",
        type=int,
        help="the daemon's [api] cache_size (0: every GET reads the database); default: its own",
    )
    r.add_argument(
        "--client",
        default="auto",
        choices=["auto", "aiohttp", "wrk", "autocannon"],
        help="auto: wrk for TCP and autocannon for the unix socket where installed, else aiohttp",
    )
