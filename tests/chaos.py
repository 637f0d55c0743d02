"""Chaos run: real daemons SIGKILLed at random moments against fake IdPs that misbehave.

One harness for two uses: ``tests/test_chaos.py`` runs it for under a minute in CI (its settings
are :class:`ChaosSettings`' defaults), and this file is the long-run command (figures in
docs/reliability.md)::

    .venv/bin/python tests/chaos.py --minutes 10

Two fake IdPs (one-time refresh tokens, 5 s grace period, access tokens of 5 s and 10 s) are
served from threads of this process, so that they outlive every daemon. A grace re-send is
answered with a new sibling refresh token (``--grace-answer sibling``: IdentityServer, Auth0) or
with the pair of the first use again (``same_pair``: django-oauth-toolkit); a consumed token
presented after its grace period revokes its family (``--reuse-revokes``, default ``family``).

Faults, two stances:

- ``--faults independent`` (the command line's default, the stance of issue #14): every token
  request is faulted with probability ``--fault-rate`` (30 %), retries and grace re-sends
  included, from: the answer lost after the IdP rotated, a 500 after rotating, an answer slower
  (4 s) than the client's attempt timeout, a stall (rotated, then held for ``--stall`` s), a
  reset before processing, a 503 with Retry-After, a 503 without. On top, each IdP goes down
  now and then (``--outages``, default every 20-40 s for 1 s): new connections are refused, a
  request on an open connection is reset unread. When every send of a 5 s window fails, no
  client can keep the token: a stress test, which is why its figures are statistics, not a
  pass/fail line.
- ``--faults once-per-token`` (CI's): 30 % of each refresh token's first requests, a retry of the
  same token answered, from the first five kinds above, no outages: each grace window holds a
  send the IdP answers cleanly, so nothing may be lost.

Daemons (``python -m refresherd run``, real processes) are killed with SIGKILL every 1-4 s and
restarted at once. ``--store postgresql --daemons 3`` runs a fleet on one PostgreSQL database (a
private cluster made with this machine's binaries, as tests/pg_fixtures.py does); a fleet is
killed ``--fleet-kill each`` (the default: every daemon has its own 1-4 s timer, as independent
crashes, so at times two or all three are down at once) or ``one`` (one timer for the fleet,
a random member each time). At the end the faults stop, the daemons are restarted once more
and run undisturbed for a while, and are stopped with SIGTERM; then every token set is judged.

Lost = a token set whose stored refresh token the IdP would refuse (for any reason: a missed
grace window, a revocation for reuse, the cap...), or that was invalidated (for any reason). The
run fails (exit 1) if anything was lost, any token was reused outside its grace window, any set
was invalidated or any stored grant went back to an older version.

The report adds what each rotation cost (the IdP's ledger): sends per window (requests that
presented one consumed token: median, p99, max), siblings minted per rotation, reuses outside
grace and the families they revoked, cap revocations, missed grace windows.

``--no-kill`` runs the daemons for the whole time instead and samples the first one's resident
memory (VmRSS) every few seconds: the memory figures of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: conftest (the suite's helpers) sits next to this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import (
    LEAKS,
    DaemonProcess,
    IdPHandle,
    PgDatabase,
    import_tokens,
    read_rows,
    write_config,
)
from pg_fixtures import LocalCluster, _admin, postgres_bin_dir, with_database

from refresherd.testing import FaultKind

# The faults of issue #3, part 1 (CI's). INVALID_CLIENT and GARBAGE are left out on purpose: the
# first pauses a provider (by design) and the second is another form of "lost after rotate".
CHAOS_FAULTS = (
    FaultKind.DROP_AFTER_ROTATE,
    FaultKind.ERROR_AFTER_ROTATE,
    FaultKind.SLOW,
    FaultKind.RESET,
    FaultKind.RETRY_AFTER,
)
# Issue #14's: a stall after rotating and a 503 that says nothing about when to come back, too.
INDEPENDENT_FAULTS = (*CHAOS_FAULTS, FaultKind.STALL, FaultKind.UNAVAILABLE)
GRACE_PERIOD = 5.0
# Provider name → access-token lifetime at its IdP (seconds).
PROVIDERS = {"fast": 5.0, "slow": 10.0}
# SLOW answers come after 4 s: later than the timeout of any attempt that leaves room for a retry
# inside a 5 s grace window (3 s at most). The provider keeps the default request_timeout (10 s),
# so an attempt after which no retry could start anyway still waits for a slow answer.
SLOW_DELAY = 4.0


@dataclass
class ChaosSettings:
    workdir: Path
    duration: float = 45.0
    token_sets: int = 20
    # Of the requests that may be faulted: with faults once per token, a retry inside a grace
    # window is answered, so 30 % of the first sends makes about a quarter of all requests.
    fault_rate: float = 0.3
    once_per_token: bool = True
    faults: tuple[FaultKind, ...] = CHAOS_FAULTS
    stall: float = 30.0  # STALL: how long a rotated answer is held (past any client's timeout)
    # IdP outages (refused connections): seconds between two, drawn uniformly; None: none.
    outage_every: tuple[float, float] | None = None
    outage_seconds: float = 1.0
    grace_answer: str = "sibling"
    reuse_revokes: str = "family"
    sets_per_user: int = 1  # >1: several token sets (companies) of one user and client
    cap: int | None = None  # the IdP's live refresh tokens per user and client
    store: str = "sqlite"  # or "postgresql"
    daemons: int = 1
    fleet_kill: str = "each"  # or "one"
    kill_min: float = 1.0
    kill_max: float = 4.0
    kill: bool = True
    seed: int = 1
    settle: float = 8.0  # the final, undisturbed daemons' run before SIGTERM
    rss_interval: float = 5.0
    warmup: float = 60.0
    progress: Callable[[str], None] | None = None


def _nearest_rank(ordered: list[int], q: float) -> int:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0


@dataclass
class ChaosReport:
    settings: dict[str, Any]
    seconds: float = 0.0
    kills: int = 0
    daemon_starts: int = 0
    requests: int = 0
    rotations: int = 0  # successful refresh grants (200s), grace re-sends included
    faults: dict[str, int] = field(default_factory=dict)
    outages: int = 0
    grace_recoveries: int = 0
    reuses_outside_grace: int = 0
    reuse_revoked_families: int = 0
    cap_revocations: int = 0
    concurrent_uses: int = 0
    invalid_grants: int = 0
    # What each rotation (consumed refresh token) cost, over both IdPs.
    consumed: int = 0
    sends_median: float = 0.0
    sends_p99: int = 0
    sends_max: int = 0
    siblings: int = 0
    siblings_max: int = 0
    rotations_with_siblings: int = 0
    missed_windows: int = 0
    invalidated: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    # Why each lost set is lost: the IdP's reason for refusing its stored token
    # (Ledger.loss_cause), or "invalidated" for a set invalidated with a token still live.
    loss_causes: dict[str, int] = field(default_factory=dict)
    version_regressions: int = 0
    min_version: int = 0
    spare_live_tokens: int = 0
    final_exit_code: int | None = None
    leaks: int = 0
    rss_kib: list[tuple[float, int, int]] = field(default_factory=list)  # (t, VmRSS, refreshes)

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.reuses_outside_grace == 0
            and self.invalidated == 0
            and self.version_regressions == 0
            and self.final_exit_code == 0
            and self.leaks == 0
        )

    def memory(self, warmup: float) -> dict[str, float] | None:
        """Start, after warm-up and end RSS, and the growth per 1,000 refreshes after warm-up."""
        if len(self.rss_kib) < 2:
            return None
        start = self.rss_kib[0]
        warm = next((s for s in self.rss_kib if s[0] >= warmup), self.rss_kib[0])
        end = self.rss_kib[-1]
        refreshes = end[2] - warm[2]
        return {
            "start_kib": start[1],
            "warm_kib": warm[1],
            "warm_at_s": warm[0],
            "end_kib": end[1],
            "end_at_s": end[0],
            "peak_kib": max(s[1] for s in self.rss_kib),
            "refreshes_after_warmup": refreshes,
            "kib_per_1000_refreshes": (end[1] - warm[1]) / refreshes * 1000 if refreshes else 0.0,
        }

    def format(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        share = self.faults_total / self.requests if self.requests else 0.0
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.loss_causes.items()))
        per_rotation = self.siblings / self.consumed if self.consumed else 0.0
        lines = [
            f"duration               {self.seconds:.0f} s",
            f"SIGKILLs               {self.kills} (daemon starts {self.daemon_starts})",
            f"token requests         {self.requests}",
            f"faults injected        {self.faults_total} ({share:.0%}): {faults}",
            f"IdP outages            {self.outages} (connections refused)",
            f"grants (200s)          {self.rotations}",
            f"rotations (consumed)   {self.consumed}",
            f"sends per window       median {self.sends_median:g}, p99 {self.sends_p99}, "
            f"max {self.sends_max}",
            f"siblings minted        {self.siblings} ({per_rotation:.3f} per rotation, max "
            f"{self.siblings_max}, {self.rotations_with_siblings} rotations with siblings)",
            f"grace recoveries       {self.grace_recoveries} (reuses within the grace window)",
            f"reuses outside grace   {self.reuses_outside_grace} "
            f"(families revoked for it {self.reuse_revoked_families})",
            f"cap revocations        {self.cap_revocations}",
            f"missed grace windows   {self.missed_windows}",
            f"concurrent uses        {self.concurrent_uses}",
            f"invalid_grant answers  {self.invalid_grants}",
            f"invalidated sets       {self.invalidated}",
            f"version regressions    {self.version_regressions}",
            f"lowest final version   {self.min_version}",
            f"spare live tokens      {self.spare_live_tokens} (minted, answer lost, never used)",
            f"final daemon exit      {self.final_exit_code}",
            f"secrets in output      {self.leaks}",
            f"LOST                   {self.lost}" + (f" ({causes})" if causes else ""),
        ]
        if self.lost_ids:
            lines.append(f"lost sets              {self.lost_ids}")
        memory = self.memory(self.settings.get("warmup", 60.0))
        if memory is not None:
            lines.append(
                "memory (VmRSS)         start {start_kib} KiB, after {warm_at_s:.0f} s {warm_kib} "
                "KiB, end ({end_at_s:.0f} s) {end_kib} KiB, peak {peak_kib} KiB; "
                "{kib_per_1000_refreshes:+.1f} KiB per 1,000 refreshes after warm-up "
                "({refreshes_after_warmup} refreshes)".format(**memory)
            )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["memory"] = self.memory(self.settings.get("warmup", 60.0))
        data["ok"] = self.ok
        return data


def _rss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


class _Postgres:
    """A private PostgreSQL cluster for one run, and a database in it."""

    def __init__(self, workdir: Path) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise SystemExit("--store postgresql: no /usr/lib/postgresql/*/bin/initdb here")
        self.cluster = LocalCluster(bin_dir)
        admin = self.cluster.start()
        name = f"refresherd_chaos_{secrets.token_hex(4)}"
        asyncio.run(_admin(admin, f"CREATE DATABASE {name} TEMPLATE template0"))
        self.database = PgDatabase(with_database(admin, name), workdir)

    def stop(self) -> None:
        self.cluster.stop()


class _Chaos:
    def __init__(self, settings: ChaosSettings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.lives = 0
        self.idps: dict[str, IdPHandle] = {}
        self.versions: dict[str, int] = {}
        self.regressions = 0
        self.postgres: _Postgres | None = None
        self.database: Path | PgDatabase = settings.workdir / "tokens.db"

    def say(self, text: str) -> None:
        if self.s.progress is not None:
            self.s.progress(text)

    def setup(self) -> Path:
        work = self.s.workdir
        work.mkdir(parents=True, exist_ok=True)
        if self.s.store == "postgresql":
            self.postgres = _Postgres(work)
            self.database = self.postgres.database
        for name, lifetime in PROVIDERS.items():
            handle = IdPHandle(
                work, name, usage="one_time", grace_period=GRACE_PERIOD,
                access_token_lifetime=lifetime, grace_answer=self.s.grace_answer,
                reuse_revokes=self.s.reuse_revokes, max_refresh_tokens_per_user=self.s.cap,
            )  # fmt: skip
            self.idps[name] = handle.start()
        config = write_config(
            work / "refresherd.toml",
            database=self.database,
            providers={name: h.provider(request_timeout="10s") for name, h in self.idps.items()},
            daemon={"concurrency": 16, "poll_interval": "500ms", "shutdown_timeout": "20s"},
            schedule={"backoff_initial": "1s", "backoff_max": "5s", "retry_after_max": "10s"},
        )
        per = -(-self.s.token_sets // len(self.idps))
        for name, handle in self.idps.items():
            import_tokens(config, self.token_lines(handle, name, per))
        # Faults only after the import, which issues tokens without the token endpoint anyway.
        for i, handle in enumerate(self.idps.values()):
            params: dict[str, Any] = {"delay": SLOW_DELAY, "retry_after": 1.0}
            if FaultKind.STALL in self.s.faults:
                params["stall"] = self.s.stall
            handle.faults.random(
                self.s.fault_rate,
                self.s.faults,
                seed=self.s.seed * 100 + i,
                once_per_token=self.s.once_per_token,
                **params,
            )
        return config

    def token_lines(self, handle: IdPHandle, provider: str, count: int) -> list[dict[str, object]]:
        """``tokens import`` lines: one authorization (token family) per token set, and
        ``sets_per_user`` sets per user (one user's companies, for reuse_revokes="user")."""
        lines = []
        for i in range(count):
            user = f"{provider}-user-{i // self.s.sets_per_user:04d}"
            response = dict(handle.idp.issue(user=user))
            lines.append({"id": f"{provider}-{i:04d}", "provider": provider, **response})
        return lines

    def start(self, config: Path) -> DaemonProcess:
        self.lives += 1
        log = self.s.workdir / f"daemon-{self.lives:04d}.log"
        return DaemonProcess(config, log).start(wait_listening=False)

    def check_versions(self) -> None:
        """A stored grant never goes back to an older one (read as an application would)."""
        for token_set_id, row in read_rows(self.database).items():
            if row["version"] < self.versions.get(token_set_id, 0):
                self.regressions += 1
            self.versions[token_set_id] = max(row["version"], self.versions.get(token_set_id, 0))

    def refreshes(self) -> int:
        return sum(h.ledger.refreshes for h in self.idps.values())

    def next_kill(self, now: float) -> float:
        return now + self.rng.uniform(self.s.kill_min, self.s.kill_max)

    def next_outage(self, now: float) -> float:
        if self.s.outage_every is None:
            return math.inf
        return now + self.rng.uniform(*self.s.outage_every)

    def run(self) -> ChaosReport:
        report = ChaosReport(settings={k: v for k, v in vars(self.s).items() if k != "progress"})
        report.settings["workdir"] = str(self.s.workdir)
        try:
            config = self.setup()
            self.chaos(config, report)
            self.check_versions()
            self.judge(report)
        finally:
            for handle in self.idps.values():
                handle.stop()
            if self.postgres is not None:
                self.postgres.stop()
        return report

    def chaos(self, config: Path, report: ChaosReport) -> None:
        began = time.monotonic()
        end = began + self.s.duration
        fleet = [self.start(config) for _ in range(self.s.daemons)]
        # "each": a timer per daemon; "one": one timer for the fleet (kills[0]).
        timers = self.s.daemons if self.s.fleet_kill == "each" else 1
        kills = [self.next_kill(began) for _ in range(timers)]
        outages = {name: self.next_outage(began) for name in self.idps}
        next_sample = next_check = began
        next_say = began + 30
        listening = False
        check_every = 1.0 if self.s.store == "sqlite" else 2.0  # a PostgreSQL read costs more
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                for daemon in fleet:
                    if not daemon.running():
                        raise RuntimeError(f"a daemon exited by itself:\n{daemon.tail()}")
                for i, due in enumerate(kills):
                    if self.s.kill and now >= due:
                        victim = i if timers > 1 else self.rng.randrange(len(fleet))
                        fleet[victim].kill()  # SIGKILL, reaped
                        report.kills += 1
                        fleet[victim] = self.start(config)  # at once
                        kills[i] = self.next_kill(now)
                for name, due in outages.items():
                    if now >= due:
                        self.idps[name].idp.refuse_connections(self.s.outage_seconds)
                        outages[name] = self.next_outage(now)
                if not self.s.kill and now >= next_sample:
                    # From the moment it listens: before that it is still importing.
                    listening = listening or bool(fleet[0].events("listening"))
                    rss = _rss_kib(fleet[0].pid) if listening else None
                    if rss is not None:
                        report.rss_kib.append((now - began, rss, self.refreshes()))
                    next_sample = now + self.s.rss_interval
                if now >= next_check:
                    self.check_versions()
                    next_check = now + check_every
                if now >= next_say:
                    self.say(
                        f"{now - began:.0f} s: {report.kills} kills, "
                        f"{self.refreshes()} grants, versions {sum(self.versions.values())}"
                    )
                    next_say = now + 30
                time.sleep(0.05)
            # The end: no more faults, undisturbed daemons finish what was left (journaled
            # attempts inside their grace windows), then a clean stop.
            for handle in self.idps.values():
                handle.faults.clear()
            if self.s.kill:
                for i, daemon in enumerate(fleet):
                    daemon.kill()
                    report.kills += 1
                    fleet[i] = self.start(config)
            time.sleep(self.s.settle)
            codes = [daemon.stop(timeout=60) for daemon in fleet]
            report.final_exit_code = next((c for c in codes if c != 0), 0)
        finally:
            for daemon in fleet:
                if daemon.running():
                    daemon.kill()
        report.seconds = time.monotonic() - began
        report.daemon_starts = self.lives

    def judge(self, report: ChaosReport) -> None:
        rows = read_rows(self.database)
        sends: list[int] = []
        siblings: list[int] = []
        for handle in self.idps.values():
            ledger = handle.ledger
            report.requests += ledger.requests
            report.rotations += ledger.refreshes
            report.outages += ledger.outages
            report.grace_recoveries += ledger.reuses_in_grace
            report.reuses_outside_grace += ledger.reuses_outside_grace
            report.reuse_revoked_families += ledger.reuse_revoked_families
            report.cap_revocations += ledger.cap_revocations
            report.concurrent_uses += ledger.concurrent_uses
            report.invalid_grants += ledger.invalid_grants
            for kind, n in ledger.faults_injected.items():
                report.faults[kind] = report.faults.get(kind, 0) + n
            sends += ledger.sends_per_window()
            siblings += ledger.siblings_per_rotation()
        sends.sort()
        report.consumed = len(sends)
        report.sends_median = statistics.median(sends) if sends else 0.0
        report.sends_p99 = _nearest_rank(sends, 0.99)
        report.sends_max = sends[-1] if sends else 0
        report.siblings = sum(siblings)
        report.siblings_max = max(siblings, default=0)
        report.rotations_with_siblings = sum(1 for n in siblings if n)
        for token_set_id, row in sorted(rows.items()):
            ledger = self.idps[row["provider"]].ledger
            stored = row["refresh_token"]
            cause = ledger.loss_cause(stored)
            if row["state"] == "invalidated":
                report.invalidated += 1
                cause = cause or "invalidated"
            if cause is not None:
                report.lost += 1
                report.lost_ids.append(token_set_id)
                report.loss_causes[cause] = report.loss_causes.get(cause, 0) + 1
            if cause == "missed_window":
                report.missed_windows += 1
            if cause != "unknown":
                family = ledger.family_of(stored)
                report.spare_live_tokens += len(
                    ledger.live_refresh_tokens(family=family) - {stored}
                )
        report.min_version = min((row["version"] for row in rows.values()), default=0)
        report.version_regressions = self.regressions
        report.leaks = len(LEAKS.scan())


def run_chaos(settings: ChaosSettings) -> ChaosReport:
    return _Chaos(settings).run()


def _seconds_range(text: str) -> tuple[float, float] | None:
    if text == "off":
        return None
    low, _, high = text.partition("-")
    try:
        pair = (float(low), float(high or low))
    except ValueError:
        pair = (0.0, 0.0)
    if not 0 < pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError("MIN-MAX seconds, 0 < MIN <= MAX, or 'off'")
    return pair


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--token-sets", type=int, default=40)
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument(
        "--faults",
        choices=["independent", "once-per-token"],
        default="independent",
        help="independent (default): every request may be faulted, retries and grace re-sends "
        "included, with stalls, 503s without Retry-After and outages too; once-per-token: CI's "
        "milder stance (see the module docstring)",
    )
    p.add_argument(
        "--independent-faults",
        dest="faults",
        action="store_const",
        const="independent",
        help="the same as --faults independent (kept for older commands)",
    )
    p.add_argument("--stall", type=float, default=30.0, metavar="SECONDS")
    p.add_argument(
        "--outages",
        default="auto",
        metavar="MIN-MAX|off",
        help="an IdP outage (connections refused) every MIN-MAX s per IdP; default 20-40 with "
        "independent faults, off otherwise",
    )
    p.add_argument("--outage-seconds", type=float, default=1.0)
    p.add_argument("--grace-answer", choices=["sibling", "same_pair"], default="sibling")
    p.add_argument("--reuse-revokes", choices=["none", "family", "user"], default="family")
    p.add_argument("--sets-per-user", type=int, default=1)
    p.add_argument("--cap", type=int, default=None, help="live refresh tokens per user")
    p.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--daemons", type=int, default=1)
    p.add_argument(
        "--fleet-kill",
        choices=["each", "one"],
        default="each",
        help="each: every daemon on its own 1-4 s SIGKILL timer; one: one timer, a random member",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-kill", action="store_true", help="undisturbed daemons, memory sampled")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    independent = args.faults == "independent"
    if args.outages == "auto":
        outages = (20.0, 40.0) if independent else None
    else:
        try:
            outages = _seconds_range(args.outages)
        except argparse.ArgumentTypeError as exc:
            p.error(f"--outages: {exc}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refresherd-chaos-"))
    settings = ChaosSettings(
        workdir=workdir,
        duration=args.minutes * 60,
        token_sets=args.token_sets,
        fault_rate=args.fault_rate,
        once_per_token=not independent,
        faults=INDEPENDENT_FAULTS if independent else CHAOS_FAULTS,
        stall=args.stall,
        outage_every=outages,
        outage_seconds=args.outage_seconds,
        grace_answer=args.grace_answer,
        reuse_revokes=args.reuse_revokes,
        sets_per_user=args.sets_per_user,
        cap=args.cap,
        store=args.store,
        daemons=args.daemons,
        fleet_kill=args.fleet_kill,
        seed=args.seed,
        kill=not args.no_kill,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    kills = "no kills" if args.no_kill else "SIGKILL every 1-4 s"
    if args.daemons > 1 and not args.no_kill:
        kills += " each" if args.fleet_kill == "each" else ", one member at a time"
    outage = f"outages every {outages[0]:g}-{outages[1]:g} s" if outages else "no outages"
    print(
        f"chaos run: {args.minutes:g} min, {args.token_sets} token sets, faults "
        f"{args.fault_rate:.0%} ({args.faults}), {outage}, grace answer {args.grace_answer}, "
        f"reuse revokes {args.reuse_revokes}, {args.store} x{args.daemons} daemon(s), {kills}, "
        f"seed {args.seed}, in {workdir}; python {platform.python_version()}",
        file=sys.stderr,
        flush=True,
    )
    report = run_chaos(settings)
    print(report.format())
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    if not report.ok:
        print("FAILED: something was lost, reused outside grace or invalidated", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
