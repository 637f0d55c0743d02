"""refresherd benchmarks, one command each (docs/benchmarks.md has the figures).

    python bench/run.py throughput [--sets 3000] [--latency 0]        # (a) and (c)
    python bench/run.py scale [--sizes 10000,100000,1000000]          # (b) and (c)
    python bench/run.py reads [--repeat 3] [--seconds 2]              # the token API

Everything runs on loopback against refresherd.testing's FakeIdP, served from its own process
(bench/idp_process.py) so that its CPU is not counted as the client's. ``throughput`` refreshes
the same token sets with the daemon (a real ``refresherd run`` process) and with two bare loops
in this process, an httpx one and an aiohttp one, each at its best concurrency; ``scale``
imports N token sets with ``refresherd tokens import``, makes a window of them due at a fixed
rate, starts the daemon and measures start-up, memory and lateness. ``--out FILE`` writes the
report as JSON too. No figure here is asserted anywhere: tests/test_bench_smoke.py only checks
that a tiny run produces its report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
CLIENT_ID = "bench"
CLIENT_SECRET = "bench-client-secret"
PROVIDER = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- processes


@dataclass
class IdP:
    process: subprocess.Popen[str]
    token_url: str
    tokens: list[dict[str, Any]]


@contextmanager
def fake_idp(
    workdir: Path, *, tokens: int, latency: float, usage: str = "reuse", load: bool = True
) -> Iterator[IdP]:
    out = workdir / "idp-tokens.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            str(BENCH / "idp_process.py"),
            "--tokens",
            str(tokens),
            "--out",
            str(out),
            "--latency",
            str(latency),
            "--usage",
            usage,
            "--client-secret",
            CLIENT_SECRET,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the fake IdP process did not start")
        token_url = json.loads(line)["token_url"]
        issued: list[dict[str, Any]] = []
        if load:  # else the caller streams the file (a million tokens)
            with out.open(encoding="utf-8") as f:
                issued = [json.loads(row) for row in f]
        yield IdP(process, token_url, issued)
    finally:
        stop(process, timeout=10)


def stop(process: subprocess.Popen[Any], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    workdir: Path,
    token_url: str,
    *,
    concurrency: int | str,
    usage: str,
    log_level: str,
    import_spread: float = 1.0,
    workers: int = 1,
) -> tuple[Path, int]:
    port = free_port()
    secret = workdir / "client-secret"
    secret.write_text(CLIENT_SECRET, encoding="utf-8")
    secret.chmod(0o600)
    config = workdir / "config.toml"
    # "auto": the default config (adaptive concurrency, a pool that follows it); a number sets
    # both [daemon] concurrency and the provider's pool, as a hand-tuned config would.
    tuned = concurrency != "auto"
    config.write_text(
        f"""[daemon]
database = "{workdir / "tokens.db"}"
{f"concurrency = {concurrency}" if tuned else ""}
workers = {workers}

[server]
listen = "127.0.0.1:{port}"

[log]
level = "{log_level}"
format = "json"

[schedule]
import_spread = {import_spread}

[providers.{PROVIDER}]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
refresh_token_usage = "{usage}"
grace_period = "30s"
{f"max_connections = {concurrency}" if tuned else ""}
""",
        encoding="utf-8",
    )
    return config, port


SWITCH_INTERVAL: float | None = None


def refresherd(config: Path, *args: str) -> list[str]:
    if SWITCH_INTERVAL is not None:
        # An experiment (--switch-interval): how long the main thread may keep the GIL from
        # aiosqlite's thread bounds every database round trip under load.
        code = (
            f"import sys; sys.setswitchinterval({SWITCH_INTERVAL}); "
            "from refresherd.cli import main; sys.argv[0] = 'refresherd'; sys.exit(main())"
        )
        return [sys.executable, "-c", code, "--config", str(config), *args]
    return [sys.executable, "-m", "refresherd", "--config", str(config), *args]


def import_tokens(config: Path, lines: Path) -> float:
    """Seconds `refresherd tokens import` takes for the file."""
    started = time.perf_counter()
    subprocess.run(refresherd(config, "tokens", "import", str(lines)), check=True)
    return time.perf_counter() - started


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    startup: float

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metrics().get("refresherd_worker_processes", 0.0) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon's {count} worker process(es) did not start")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """The daemon's, its worker processes' included ([daemon] workers)."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def status(self, key: str) -> int:
        """A /proc/<pid>/status value in kB (VmRSS, VmHWM), summed over its processes."""
        total = 0
        for pid in process_tree(self.process.pid):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (a primary and its worker processes)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


@contextmanager
def run_directory(*, keep: bool) -> Iterator[str]:
    """A directory for one run, removed afterwards unless ``keep`` (then its path is printed)."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix="refresherd-bench-") as tmp:
            yield tmp
        return
    tmp = tempfile.mkdtemp(prefix="refresherd-bench-")
    print(f"run directory (kept): {tmp}", flush=True)
    yield tmp


@contextmanager
def profiled(pid: int, out: Path | None, seconds: float) -> Iterator[None]:
    """py-spy (if installed) sampling ``pid`` for ``seconds``, every thread, idle included, as
    folded stacks; ``summarize_profile`` prints where the time went."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--idle",
            "--threads",
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.wait()
        summarize_profile(out)


# Where a sample of the daemon's threads is, by the first matching frame from the top.
_CATEGORIES = (
    ("idle (waiting for I/O)", ("EpollSelector.select", "core.py:59)")),
    ("HTTP: idp/ + aiohttp", ("(refresherd/idp/", "aiohttp/")),
    ("SQLite: store/ + aiosqlite", ("(refresherd/store/", "aiosqlite/")),
    ("logging: structlog", ("structlog/", "refresherd/logs.py")),
    ("metrics: prometheus_client + /metrics", ("prometheus_client/", "refresherd/web/app.py")),
    ("scheduler.py", ("(refresherd/scheduler.py",)),
    ("refresh/ + policy.py", ("(refresherd/refresh/", "(refresherd/policy.py")),
    ("anyio + asyncio machinery", ("anyio/", "asyncio/")),
)


def summarize_profile(path: Path) -> dict[str, dict[str, float]]:
    """Per thread, the share of samples in each category: the innermost frame of our code or
    a library decides (SQL run from refresh/ counts as SQLite), then idle, then the loop."""
    if not path.exists():
        print(f"(no profile: is py-spy installed? {path})")
        return {}
    shares: dict[str, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].split(":")[-1].strip() or frames[0]
        category = "other"
        # Idle if the innermost frame waits; else our code and its libraries (innermost
        # wins), then the event loop.
        for candidates in (_CATEGORIES[:1], _CATEGORIES[1:-1], _CATEGORIES[-1:]):
            if candidates is _CATEGORIES[:1]:
                if any(m in frames[-1] for m in candidates[0][1]):
                    category = candidates[0][0]
                    break
                continue
            found = next(
                (
                    name
                    for frame in reversed(frames[1:])
                    for name, marks in candidates
                    if any(m in frame for m in marks)
                ),
                None,
            )
            if found is not None:
                category = found
                break
        per = shares.setdefault(thread, {})
        per[category] = per.get(category, 0) + int(count)
    print(f"\nprofile {path} (share of samples per thread):")
    for thread, per in shares.items():
        total = sum(per.values())
        print(f"  {thread} ({total} samples)")
        for category, n in sorted(per.items(), key=lambda kv: -kv[1]):
            per[category] = n / total
            print(f"    {100 * n / total:5.1f}%  {category}")
    return shares


@contextmanager
def daemon(
    config: Path,
    port: int,
    workdir: Path,
    *,
    event_loop: str | None = None,
    tree: str | None = None,
) -> Iterator[Daemon]:
    """A real ``refresherd run``; ``event_loop`` (REFRESHERD_EVENT_LOOP) and ``tree`` (another
    checkout's code) for --variants, None: its default, and this checkout."""
    log = (workdir / "daemon.log").open("wb")
    started = time.perf_counter()
    env = dict(os.environ)
    if event_loop is not None:
        env["REFRESHERD_EVENT_LOOP"] = event_loop
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
    # `python -m` puts the working directory first on sys.path: another tree's daemon runs in
    # its run directory, so that this checkout's package does not shadow that tree's.
    cwd = workdir if tree is not None else None
    process = subprocess.Popen(refresherd(config, "run"), stdout=log, stderr=log, env=env, cwd=cwd)
    try:
        wait_ready(process, port, log_name=log.name)
        yield Daemon(process, port, time.perf_counter() - started)
    finally:
        stop(process, timeout=60)
        log.close()


def wait_ready(
    process: subprocess.Popen[bytes], port: int, *, log_name: str, timeout: float = 600
) -> None:
    """Poll the daemon's /readyz until it answers 200; RuntimeError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited ({process.returncode}); see {log_name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not become ready")
        time.sleep(0.02)


def cpu_seconds(pid: int, *, main_thread: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc), or of its main thread
    (a process's main thread has its pid as its thread id)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loop_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of the main threads (the event loops) of ``pids``: a loop near one core is
    the bound; one well below waits, on I/O or for a CPU other threads hold
    (docs/benchmarks.md, "What bounds it, measured per thread")."""
    return sum(cpu_seconds(pid, main_thread=True) for pid in pids)


def scrape(port: int) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def successes(metrics: dict[str, float]) -> float:
    return metrics.get(f'refresherd_refresh_success_total{{provider="{PROVIDER}"}}', 0.0)


def failures(metrics: dict[str, float]) -> float:
    prefix = "refresherd_refresh_failures_total{"
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def failure_reasons(metrics: dict[str, float]) -> dict[str, float]:
    """The failed attempts by ``reason`` label (a refresh retried and then refreshed counts
    among the refreshes too)."""
    prefix = "refresherd_refresh_failures_total{"
    reasons: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and value:
            found = re.search(r'reason="([^"]*)"', key)
            reason = found.group(1) if found else key
            reasons[reason] = reasons.get(reason, 0) + value
    return reasons


def histogram_quantile(metrics: dict[str, float], name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile over one unlabelled histogram."""
    buckets: list[tuple[float, float]] = []
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{le="):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- bare loops


def _form(refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }


async def _drive(n: int, concurrency: int, one: Callable[[int], Any]) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _aiohttp_loop(url: str, tokens: Sequence[str], n: int, concurrency: int) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with session.post(url, data=_form(tokens[i % len(tokens)])) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
                json.loads(body)

        await _drive(n, concurrency, one)


async def _httpx_loop(url: str, tokens: Sequence[str], n: int, concurrency: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

        async def one(i: int) -> None:
            response = await client.post(url, data=_form(tokens[i % len(tokens)]))
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            response.json()

        await _drive(n, concurrency, one)


LOOPS = {"aiohttp": _aiohttp_loop, "httpx": _httpx_loop}


def _bare_child(
    client: str, url: str, tokens: Sequence[str], n: int, concurrency: int, start: Any
) -> None:
    start.wait()
    asyncio.run(LOOPS[client](url, tokens, n, concurrency))


def bare_loop_processes(
    client: str, url: str, tokens: Sequence[str], n: int, concurrency: int, processes: int
) -> dict[str, float]:
    """The bare loop in ``processes`` processes, each with ``concurrency`` in flight and its
    share of the tokens: what the bare client does with as many cores as the daemon's workers."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(processes + 1)
    children = [
        context.Process(
            target=_bare_child,
            args=(
                client,
                url,
                tokens[k::processes],
                len(range(k, n, processes)),
                concurrency,
                start,
            ),
        )
        for k in range(processes)
    ]
    for child in children:
        child.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start.wait()
    wall = time.perf_counter()
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a bare {client} process exited with {child.exitcode}")
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "concurrency": concurrency * processes,
        "processes": processes,
        "refreshes": n,
        "per_second": n / wall,
        "cpu_ms_per_refresh": 1000 * cpu / n,
    }


def bare_loop(
    client: str, url: str, tokens: Sequence[str], n: int, concurrency: int
) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(LOOPS[client](url, tokens, n, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "concurrency": concurrency,
        "refreshes": n,
        "per_second": n / wall,
        "cpu_ms_per_refresh": 1000 * cpu / n,
    }


# --------------------------------------------------------------------------- (a) + (c)


def throughput(args: argparse.Namespace, *, reverse: bool = False) -> dict[str, Any]:
    n = args.sets
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "sets": n,
        "latency_s": args.latency,
        "bare": {},
    }
    with run_directory(keep=args.keep_workdir) as tmp:
        workdir = Path(tmp)
        with fake_idp(workdir, tokens=n, latency=args.latency) as idp:
            tokens = [str(t["refresh_token"]) for t in idp.tokens]
            bare_loop("aiohttp", idp.token_url, tokens, min(n, 200), 4)  # warm-up

            def with_idp_cpu(run: Callable[[], dict[str, float]]) -> dict[str, float]:
                """The fake IdP's CPU per refresh too: on one machine it is the clients' rival."""
                before = cpu_seconds(idp.process.pid)
                result = run()
                result["idp_cpu_ms_per_refresh"] = (
                    1000 * (cpu_seconds(idp.process.pid) - before) / result["refreshes"]
                )
                return result

            for client in args.bare.split(","):
                runs = [
                    with_idp_cpu(partial(bare_loop, client, idp.token_url, tokens, n, c))
                    for c in levels
                ]
                best = max(runs, key=lambda r: r["per_second"])
                report["bare"][client] = {"runs": runs, "best": best}
            if args.bare_processes > 1 and "aiohttp" in report["bare"]:
                # Each process at the single loop's best concurrency.
                level = report["bare"]["aiohttp"]["best"]["concurrency"]
                multi = with_idp_cpu(
                    lambda: bare_loop_processes(
                        "aiohttp", idp.token_url, tokens, n, level, args.bare_processes
                    )
                )
                report["bare"][f"aiohttp x{args.bare_processes}"] = {"runs": [multi], "best": multi}
            # The daemon refreshes the same sets once each: all due at once (no access token).
            lines = workdir / "import.jsonl"
            with lines.open("w", encoding="utf-8") as f:
                for i, token in enumerate(tokens):
                    row = {"id": f"ts-{i}", "provider": PROVIDER, "refresh_token": token}
                    f.write(json.dumps(row) + "\n")
            # The config under test (--daemon-concurrency, by default the default config) in
            # each --variants, and hand-tuned concurrencies (--daemon-levels), each daemon on a
            # database of its own; the order alternates run by run (--repeat), as the shared
            # machine's pace drifts.
            variants = args.variants.split(",") if args.variants else ["default"]
            plan: list[tuple[str, str]] = [("variant", v) for v in variants]
            plan += [("level", str(level)) for level in _levels(args.daemon_levels)]
            if reverse:
                plan.reverse()
            report["variants"] = {}
            tuned: dict[str, dict[str, Any]] = {}
            for k, (kind, what) in enumerate(plan):
                variant = what if kind == "variant" else "default"
                concurrency = args.daemon_concurrency if kind == "variant" else what
                run = daemon_run(
                    args,
                    workdir / f"daemon-{k}",
                    idp,
                    lines,
                    n,
                    concurrency,
                    profile=True,
                    event_loop=variant if variant in ("asyncio", "uvloop") else None,
                    tree=variant.removeprefix("tree=") if variant.startswith("tree=") else None,
                )
                if kind == "variant":
                    run["variant"] = variant
                    report["variants"][variant] = run
                else:
                    tuned[what] = run
            report["daemon_levels"] = [tuned[str(x)] for x in _levels(args.daemon_levels)]
            report["daemon"] = report["variants"][variants[0]]
            report["token_usage"] = args.token_usage
            report["startup_s"] = report["daemon"]["startup_s"]
            report["import_s"] = report["daemon"]["import_s"]
            if "aiohttp" in report["bare"]:
                # The fake IdP keeps every token it issued, so it slows as a run goes on, and
                # the daemon always comes last: the best aiohttp loop again, after the daemon,
                # shows how much (the ratio is still taken against the loop before).
                at = report["bare"]["aiohttp"]["best"]["concurrency"]
                report["bare_aiohttp_after"] = with_idp_cpu(
                    lambda: bare_loop("aiohttp", idp.token_url, tokens, n, at)
                )
    daemon_rate = report["daemon"]["per_second"] or 0.0
    for client, data in report["bare"].items():
        report[f"ratio_vs_{client}"] = daemon_rate / data["best"]["per_second"]
    if report["daemon_levels"]:
        best = max(report["daemon_levels"], key=lambda r: r["per_second"] or 0.0)
        report["ratio_vs_best_level"] = daemon_rate / (best["per_second"] or float("nan"))
        report["best_level"] = best["concurrency"]
    return report


def _levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def daemon_run(
    args: argparse.Namespace,
    workdir: Path,
    idp: IdP,
    lines: Path,
    n: int,
    concurrency: str,
    *,
    profile: bool = False,
    event_loop: str | None = None,
    tree: str | None = None,
) -> dict[str, Any]:
    """A real ``refresherd run`` with its own database refreshing the ``n`` imported sets,
    all due at once; its rate from the first refresh to the last, CPU, memory and the
    highest concurrency limit it reached (refresherd_concurrency_limit)."""
    workdir.mkdir()
    config, port = write_config(
        workdir,
        idp.token_url,
        concurrency=concurrency,
        usage=args.token_usage,
        log_level=args.log_level,
        workers=args.daemon_workers,
    )
    limit_key = f'refresherd_concurrency_limit{{provider="{PROVIDER}"}}'
    with (
        daemon(config, port, workdir, event_loop=event_loop, tree=tree) as d,
        profiled(d.process.pid, args.profile if profile else None, args.profile_seconds),
    ):
        startup = d.startup
        # Imported into the running daemon once all its processes are up, so that the
        # rate is that of all of them (the daemon finds new rows by itself).
        d.wait_for_workers(args.daemon_workers - 1)
        import_s = import_tokens(config, lines)
        first = None
        pids = process_tree(d.process.pid)
        cpu0 = d.cpu_seconds()
        loop_cpu0 = loop_cpu_seconds(pids)
        idp_cpu0 = cpu_seconds(idp.process.pid)
        done0 = 0.0
        peak_limit = 0.0
        in_flight: list[float] = []
        deadline = time.monotonic() + max(120.0, n / 50)
        while True:
            m = d.metrics()
            peak_limit = max(peak_limit, m.get(limit_key, 0.0))
            done = successes(m) + failures(m)
            now = time.perf_counter()
            if first is None and done > 0:
                first, done0, cpu0 = now, done, d.cpu_seconds()
                loop_cpu0 = loop_cpu_seconds(pids)
                idp_cpu0 = cpu_seconds(idp.process.pid)
            if first is not None and done < n:
                in_flight.append(m.get("refresherd_refreshes_in_flight", 0.0))
            if done >= n or time.monotonic() > deadline:
                break
            # Not faster: a scrape costs the daemon about 2 ms of CPU (at 0.05 s it was 4 %).
            time.sleep(0.1)
        elapsed = now - (first or now)
        counted = done - done0
        return {
            "concurrency": concurrency,
            "workers": args.daemon_workers,
            "refreshes": int(successes(m)),
            "failures": int(failures(m)),
            "failure_reasons": failure_reasons(m),
            "per_second": counted / elapsed if elapsed > 0 else None,
            "cpu_ms_per_refresh": (1000 * (d.cpu_seconds() - cpu0) / counted if counted else None),
            # The event loops' share of a core while refreshing, and how much was in flight.
            "loop_core_share": (
                (loop_cpu_seconds(pids) - loop_cpu0) / elapsed / len(pids) if elapsed > 0 else None
            ),
            "mean_in_flight": sum(in_flight) / len(in_flight) if in_flight else None,
            "rss_mb": d.status("VmRSS") / 1024,
            "idp_cpu_ms_per_refresh": (
                1000 * (cpu_seconds(idp.process.pid) - idp_cpu0) / counted if counted else None
            ),
            "peak_concurrency_limit": peak_limit,
            "final_concurrency_limit": m.get(limit_key),
            "startup_s": startup,
            "import_s": import_s,
        }


def print_throughput(r: dict[str, Any]) -> None:
    print(f"\n## throughput: {r['sets']} refreshes, IdP latency {r['latency_s'] * 1000:.0f} ms\n")
    print("| client | concurrency | refreshes/s | CPU ms/refresh | IdP CPU ms/refresh |")
    print("|---|---:|---:|---:|---:|")

    def cpu(run: dict[str, Any], key: str) -> str:
        return f"{run[key]:.2f}" if run.get(key) else "n/a"

    def row(who: str, run: dict[str, Any]) -> None:
        rate = f"{run['per_second']:.0f}" if run["per_second"] else "n/a"
        print(
            f"| {who} | {run['concurrency']} | {rate} | {cpu(run, 'cpu_ms_per_refresh')} |"
            f" {cpu(run, 'idp_cpu_ms_per_refresh')} |"
        )

    for client, data in r["bare"].items():
        for run in data["runs"]:
            mark = " (best)" if run is data["best"] or run == data["best"] else ""
            row(f"bare {client}{mark}", run)
    d = r["daemon"]
    procs = d.get("workers", 1)
    for level in r.get("daemon_levels", []):
        row("refresherd daemon, hand-tuned", level)
    if len(r.get("variants", {})) > 1:
        for variant, run in r["variants"].items():
            row(f"refresherd daemon, {variant}", run)
    usage = f", {r['token_usage']} tokens" if r.get("token_usage", "reuse") != "reuse" else ""
    row("refresherd daemon" + (f", {procs} processes" if procs > 1 else "") + usage, d)
    if "bare_aiohttp_after" in r:
        row("bare aiohttp, after the daemon", r["bare_aiohttp_after"])
    ratios = "".join(f"daemon / bare {c} = {r[f'ratio_vs_{c}']:.2f}; " for c in r["bare"])
    if "ratio_vs_best_level" in r:
        ratios += f"daemon / best hand-tuned ({r['best_level']}) = {r['ratio_vs_best_level']:.2f}; "
    limits = [
        f"{x.get('peak_concurrency_limit') or 0:.0f}" for x in [*r.get("daemon_levels", []), d]
    ]
    print(
        f"\n{ratios}"
        f"failures {d['failures']} {d.get('failure_reasons') or ''}; "
        f"import {r['import_s']:.2f} s; start-up {r['startup_s']:.2f} s; "
        f"peak concurrency limit {', '.join(limits)}"
    )
    if d.get("loop_core_share") is not None and d.get("mean_in_flight") is not None:
        print(
            f"the daemon's event loop: {d['loop_core_share']:.0%} of a core busy per process,"
            f" {d['mean_in_flight']:.0f} refreshes in flight on average"
        )


def repeated_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """``throughput`` run after run (--repeat): on a shared machine one run's ratio is luck, so
    each run is reported, with the load when it ended, and the median of the ratios."""
    runs = []
    for i in range(args.repeat):
        # The daemons' order alternates run by run, as the shared machine's pace drifts.
        r = throughput(args, reverse=i % 2 == 1)
        r["machine"] = machine()
        print_throughput(r)
        print(f"load (1 min) {r['machine']['load_1m']:.2f}")
        runs.append(r)
    report: dict[str, Any] = {"benchmark": "throughput", "runs": runs}
    keys = [f"ratio_vs_{client}" for client in runs[0]["bare"]]
    if "ratio_vs_best_level" in runs[0]:
        keys.append("ratio_vs_best_level")
    for key in keys:
        client = key.removeprefix("ratio_vs_")
        ratios = [r[key] for r in runs]
        report[f"median_{key}"] = statistics.median(ratios)
        print(
            f"\ndaemon / {client.replace('_', ' ')}, {len(runs)} runs: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f"; median {statistics.median(ratios):.2f}"
        )
    report["machine"] = machine()
    return report


# --------------------------------------------------------------------------- (b) + (c)


def scale_one(args: argparse.Namespace, size: int) -> dict[str, Any]:
    window = min(size, int(args.rate * args.window))
    with run_directory(keep=args.keep_workdir) as tmp:
        workdir = Path(tmp)
        with fake_idp(workdir, tokens=window, latency=args.latency, usage="one_time") as idp:
            lines = workdir / "import.jsonl"
            with lines.open("w", encoding="utf-8") as f:
                for i in range(size):
                    if i < window:
                        row = dict(idp.tokens[i])
                    else:  # never due during the run: the IdP need not know them
                        row = {
                            "refresh_token": f"rt_filler_{i:07d}_{os.urandom(12).hex()}",
                            "access_token": f"at_filler_{i:07d}_{os.urandom(12).hex()}",
                            "token_type": "Bearer",
                            "expires_in": 3600,
                        }
                    row.update(id=f"ts-{i:07d}", provider=PROVIDER)
                    f.write(json.dumps(row) + "\n")
            # import_spread = 0: the filler stays due 43-48 minutes out, after the run.
            config, port = write_config(
                workdir,
                idp.token_url,
                concurrency=args.daemon_concurrency,
                usage="one_time",
                log_level=args.log_level,
                workers=args.daemon_workers,
                import_spread=0.0,
            )
            import_s = import_tokens(config, lines)
            lines.unlink()
            # The window: `window` sets due one after another at `rate` per second, from t0.
            t0 = time.time() + args.lead
            planned = {f"ts-{i:07d}": t0 + i / args.rate for i in range(window)}
            with sqlite3.connect(workdir / "tokens.db") as db:
                db.executemany(
                    "UPDATE token_sets SET next_refresh_at = ? WHERE id = ?",
                    [(at, ts) for ts, at in planned.items()],
                )
            with (
                daemon(config, port, workdir) as d,
                profiled(d.process.pid, args.profile, args.lead + window / args.rate),
            ):
                rss_idle = d.status("VmRSS")
                cpu0, done0 = d.cpu_seconds(), 0.0
                end = t0 + window / args.rate
                deadline = end + args.drain
                while time.time() < deadline:
                    m = d.metrics()
                    if time.time() < t0:
                        cpu0, done0 = d.cpu_seconds(), successes(m) + failures(m)
                    elif successes(m) + failures(m) >= window:
                        break
                    time.sleep(0.1)
                m = d.metrics()
                done = successes(m) + failures(m) - done0
                cpu = d.cpu_seconds() - cpu0
                rss, hwm = d.status("VmRSS"), d.status("VmHWM")
                startup = d.startup
            with sqlite3.connect(workdir / "tokens.db") as db:
                rows = db.execute(
                    "SELECT id, last_refresh_at FROM token_sets WHERE last_refresh_at IS NOT NULL"
                ).fetchall()
    late = [at - planned[ts] for ts, at in rows if ts in planned]
    return {
        "sets": size,
        "due_in_window": window,
        "due_rate_per_s": args.rate,
        "latency_s": args.latency,
        "import_s": import_s,
        "startup_s": startup,
        "rss_mb_after_start": rss_idle / 1024,
        "rss_mb": rss / 1024,
        "peak_rss_mb": hwm / 1024,
        "refreshed": len(late),
        "failures": int(failures(m)),
        # Completion time minus planned time, per set, from the database (includes the IdP's
        # latency); and the daemon's own histogram (start minus planned, bucketed).
        "lateness_p50_s": percentile(late, 0.5) if late else None,
        "lateness_p99_s": percentile(late, 0.99) if late else None,
        "lateness_max_s": max(late) if late else None,
        "histogram_lateness_p50_s": histogram_quantile(
            m, "refresherd_refresh_lateness_seconds", 0.5
        ),
        "histogram_lateness_p99_s": histogram_quantile(
            m, "refresherd_refresh_lateness_seconds", 0.99
        ),
        "cpu_ms_per_refresh": 1000 * cpu / done if done else None,
        "mean_lateness_s": statistics.fmean(late) if late else None,
    }


def scale(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for size in sizes:
        if args.imported:
            results.append(scale_imported(args, size))
            print_imported(results[-1])
        else:
            results.append(scale_one(args, size))
            print_scale_row(results[-1], header=len(results) == 1)
    return {"benchmark": "scale", "runs": results}


def scale_imported(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """``size`` sets imported with ``tokens import`` as a user would, access tokens of
    --lifetimes (40-80 minutes) and the default ``import_spread``, so that sets come due from
    the moment of the import at about size / (0.8 x the mean lifetime) per second (361/s for
    a million): the daemon starts after the import with the backlog the import left. Reports
    how long the backlog took to clear (no set more than a second overdue, read from the
    database every half second), lateness after that, memory, start-up, import, and the
    refreshes in flight against what the due sets need (due rate x the IdP's latency)."""
    low, high = (float(x) * 60 for x in args.lifetimes.split("-"))
    with run_directory(keep=args.keep_workdir) as tmp:
        workdir = Path(tmp)
        made = time.perf_counter()
        with fake_idp(
            workdir, tokens=size, latency=args.latency, usage="one_time", load=False
        ) as idp:
            minted_s = time.perf_counter() - made
            lines = workdir / "import.jsonl"
            rng = random.Random(18)
            with (
                (workdir / "idp-tokens.jsonl").open(encoding="utf-8") as issued,
                lines.open("w", encoding="utf-8") as f,
            ):
                for i, raw in enumerate(issued):
                    row = json.loads(raw)
                    row.update(id=f"ts-{i:07d}", provider=PROVIDER)
                    row["expires_in"] = int(rng.uniform(low, high))
                    f.write(json.dumps(row) + "\n")
            config, port = write_config(
                workdir,
                idp.token_url,
                concurrency=args.daemon_concurrency,
                usage="one_time",
                log_level=args.log_level,
                workers=args.daemon_workers,
            )
            import_s = import_tokens(config, lines)
            lines.unlink()
            db_path = workdir / "tokens.db"
            with sqlite3.connect(db_path) as db:
                planned = dict(db.execute("SELECT id, next_refresh_at FROM token_sets"))
            reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            in_flight_key = "refresherd_refreshes_in_flight"
            limit_key = f'refresherd_concurrency_limit{{provider="{PROVIDER}"}}'
            samples: list[tuple[float, int, float, float]] = []  # (t, overdue, in flight, limit)
            with (
                daemon(config, port, workdir) as d,
                profiled(d.process.pid, args.profile, args.profile_seconds),
            ):
                ready = time.time()
                rss_start = d.status("VmRSS")
                end = ready + args.run
                while time.time() < end:
                    now = time.time()
                    (overdue,) = reader.execute(
                        "SELECT count(*) FROM token_sets WHERE next_refresh_at < ?", (now - 1.0,)
                    ).fetchone()
                    m = d.metrics()
                    samples.append(
                        (now - ready, overdue, m.get(in_flight_key, 0.0), m.get(limit_key, 0.0))
                    )
                    time.sleep(0.5)
                rss, hwm = d.status("VmRSS"), d.status("VmHWM")
                m = d.metrics()
                startup = d.startup
            rows = reader.execute(
                "SELECT id, last_refresh_at FROM token_sets WHERE last_refresh_at IS NOT NULL"
            ).fetchall()
            reader.close()
    backlog_at_start = samples[0][1] if samples else None
    caught = next((t for t, overdue, _, _ in samples if overdue == 0), None)
    after = [
        at - planned[ts]
        for ts, at in rows
        if caught is not None and planned[ts] >= ready + caught and at >= planned[ts] - 1
    ]
    steady = [(f, lim) for t, _, f, lim in samples if caught is not None and t > caught + 1]
    due_after = sum(
        1
        for at in planned.values()
        if caught is not None and ready + caught <= at < ready + args.run
    )
    due_rate = due_after / (args.run - caught) if caught is not None and args.run > caught else None
    return {
        "sets": size,
        "latency_s": args.latency,
        "mint_s": minted_s,
        "import_s": import_s,
        "startup_s": startup,
        "rss_mb_after_start": rss_start / 1024,
        "rss_mb": rss / 1024,
        "peak_rss_mb": hwm / 1024,
        "overdue_at_start": backlog_at_start,
        "caught_up_s": caught,
        "refreshed": len(rows),
        "failures": int(failures(m)),
        "failure_reasons": failure_reasons(m),
        "due_per_s_after": due_rate,
        "lateness_after_p50_s": percentile(after, 0.5) if after else None,
        "lateness_after_p99_s": percentile(after, 0.99) if after else None,
        "lateness_after_max_s": max(after) if after else None,
        "steady_in_flight_p50": percentile([f for f, _ in steady], 0.5) if steady else None,
        "steady_in_flight_max": max(f for f, _ in steady) if steady else None,
        "steady_limit_p50": percentile([lim for _, lim in steady], 0.5) if steady else None,
        "peak_limit": max((lim for *_, lim in samples), default=None),
        "needed_at_idp": due_rate * args.latency if due_rate else None,
        "timeline": samples,
    }


def print_imported(r: dict[str, Any]) -> None:
    print(f"\n## scale, imported: {r['sets']:,} sets, IdP latency {r['latency_s'] * 1000:.0f} ms\n")
    rows = [
        ("IdP minted the tokens", f"{r['mint_s']:.1f} s"),
        ("tokens import", f"{r['import_s']:.1f} s"),
        ("start-up (to /readyz)", f"{r['startup_s']:.2f} s"),
        ("overdue by > 1 s at start", f"{r['overdue_at_start']}"),
        ("backlog caught up after", f"{_fmt(r['caught_up_s'], '.1f')} s"),
        ("due per second after", _fmt(r["due_per_s_after"], ".0f")),
        (
            "lateness after: p50 / p99 / max",
            f"{_fmt(r['lateness_after_p50_s'], '.3f')} / {_fmt(r['lateness_after_p99_s'], '.3f')}"
            f" / {_fmt(r['lateness_after_max_s'], '.3f')} s",
        ),
        (
            "RSS after start / end / peak",
            f"{r['rss_mb_after_start']:.0f} / {r['rss_mb']:.0f} / {r['peak_rss_mb']:.0f} MB",
        ),
        (
            "in flight after catching up: p50 / max (due/s x latency)",
            f"{_fmt(r['steady_in_flight_p50'], '.0f')} / {_fmt(r['steady_in_flight_max'], '.0f')}"
            f" ({_fmt(r['needed_at_idp'], '.0f')})",
        ),
        (
            "concurrency limit: peak / p50 after",
            f"{_fmt(r['peak_limit'], '.0f')} / {_fmt(r['steady_limit_p50'], '.0f')}",
        ),
        ("refreshed / failures", f"{r['refreshed']:,} / {r['failures']} {r['failure_reasons']}"),
    ]
    print("| | |\n|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    print("\ntimeline (s since ready: overdue > 1 s, in flight, limit):")
    print(
        "  " + "; ".join(f"{t:.0f}: {o}, {f:.0f}, {lim:.0f}" for t, o, f, lim in r["timeline"][::4])
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_scale_row(r: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"\n## scale: {r['due_rate_per_s']:.0f} due/s, IdP latency "
            f"{r['latency_s'] * 1000:.0f} ms\n"
        )
        print(
            "| token sets | import s | start-up s | RSS MB (peak) | refreshed / due |"
            " lateness p50 s | p99 s | max s | CPU ms/refresh |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['sets']:,} | {r['import_s']:.1f} | {r['startup_s']:.2f} |"
        f" {r['rss_mb']:.0f} ({r['peak_rss_mb']:.0f}) |"
        f" {r['refreshed']:,} / {r['due_in_window']:,} |"
        f" {_fmt(r['lateness_p50_s'], '.3f')} | {_fmt(r['lateness_p99_s'], '.3f')} |"
        f" {_fmt(r['lateness_max_s'], '.3f')} | {_fmt(r['cpu_ms_per_refresh'], '.2f')} |",
        flush=True,
    )


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "load_1m": os.getloadavg()[0],
    }


def parser() -> argparse.ArgumentParser:
    sys.modules.setdefault("run", sys.modules[__name__])  # as bench/reads.py imports it
    import reads  # bench/reads.py, beside this file

    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    p.add_argument("--log-level", default="info", help="the daemon's (default: info, as run)")
    p.add_argument(
        "--daemon-concurrency",
        default="auto",
        help='[daemon] concurrency (and the pool): "auto", the default config, or a count',
    )
    p.add_argument(
        "--daemon-workers", type=int, default=1, help="[daemon] workers: processes that refresh"
    )
    p.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the run's directory (config, database, daemon.log) and print its path",
    )
    p.add_argument("--profile", type=Path, help="py-spy the daemon into this file (raw)")
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument(
        "--switch-interval",
        type=float,
        help="run the daemon with sys.setswitchinterval(this) (an experiment; default 0.005)",
    )
    sub = p.add_subparsers(dest="benchmark", required=True)
    t = sub.add_parser("throughput", help="(a)+(c): daemon vs bare httpx and aiohttp loops")
    t.add_argument("--sets", type=int, default=3000)
    t.add_argument("--latency", type=float, default=0.0, help="IdP latency, seconds")
    t.add_argument("--concurrency", default="4,16,64", help="bare-loop levels to try")
    t.add_argument("--repeat", type=int, default=1, help="run it this many times")
    t.add_argument(
        "--variants",
        default="",
        help="run the daemon under test once per variant listed: an event loop (asyncio,"
        " uvloop) or tree=DIR (another checkout's code), the order alternating run by run"
        " with --repeat; the ratios are taken of the first",
    )
    t.add_argument(
        "--daemon-levels",
        default="",
        help="also the daemon hand-tuned at each of these concurrencies (e.g. 128,256,512,1024)",
    )
    t.add_argument(
        "--bare",
        default="httpx,aiohttp",
        choices=["httpx,aiohttp", "aiohttp", "httpx"],
        help="which bare loops to run (aiohttp alone: a quicker ratio while iterating)",
    )
    t.add_argument(
        "--bare-processes",
        type=int,
        default=1,
        help="also the best aiohttp loop in this many processes (beside --daemon-workers)",
    )
    t.add_argument(
        "--token-usage",
        default="reuse",
        choices=["reuse", "one_time"],
        help="the daemon's refresh_token_usage; one_time runs its grace-window path (journal "
        "window, hedges) against an IdP that still takes a token again, so that the bare loops "
        "run on the same sets",
    )
    reads.add_parser(sub)
    s = sub.add_parser("scale", help="(b)+(c): import, start-up, memory, lateness")
    s.add_argument("--sizes", default="10000,100000,1000000")
    s.add_argument("--rate", type=float, default=350.0, help="refreshes due per second")
    s.add_argument("--window", type=float, default=30.0, help="seconds of due refreshes")
    s.add_argument("--latency", type=float, default=0.05, help="IdP latency, seconds")
    s.add_argument("--lead", type=float, default=15.0, help="seconds from import to first due")
    s.add_argument("--drain", type=float, default=30.0, help="seconds to wait after the window")
    s.add_argument(
        "--imported",
        action="store_true",
        help="import with `tokens import` and the default import_spread, then run the daemon",
    )
    s.add_argument("--lifetimes", default="40-80", help="--imported: access tokens, minutes")
    s.add_argument("--run", type=float, default=90.0, help="--imported: seconds to run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    global SWITCH_INTERVAL
    SWITCH_INTERVAL = args.switch_interval
    if args.benchmark == "reads":
        import reads

        report = reads.reads(args)
        report["machine"] = machine()
    elif args.benchmark == "throughput" and args.repeat > 1:
        report = repeated_throughput(args)
    else:
        report = throughput(args) if args.benchmark == "throughput" else scale(args)
        report["machine"] = machine()
        if args.benchmark == "throughput":
            print_throughput(report)
    print(f"\nmachine: {json.dumps(report['machine'])}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
