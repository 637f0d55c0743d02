"""Chaos run: the real daemon SIGKILLed at random moments against a fake IdP that misbehaves.

One harness for two uses: ``tests/test_chaos.py`` runs it for under a minute in CI, and this file
is the long-run command (figures in docs/reliability.md)::

    .venv/bin/python tests/chaos.py --minutes 10

Two fake IdPs (one-time refresh tokens, 5 s grace period, access tokens of 5 s and 10 s) are
served from threads of this process, so that they outlive every daemon. Each IdP injects a fault
into a share of token requests (``--fault-rate`` of each refresh token's first request, default
30 %: about a quarter of all requests), drawn from: the answer lost after the IdP rotated, a 500
after rotating, an answer slower than the client's timeout, a reset before processing, a 503
with Retry-After. A retry of the same token is answered, so each grace window holds a send the
IdP answers cleanly; ``--independent-faults`` faults retries too (a stress test: when every send
in a 5 s window fails, no client can keep the token). The daemon (``python -m refresherd run``,
a real process) is killed with SIGKILL every 1-4 s and restarted at once. At the end one daemon runs
undisturbed for a while and is stopped with SIGTERM; then, for every token set, the stored
refresh token must be one the IdP still accepts (live, or used but inside its grace window).

Lost = a token set whose stored refresh token the IdP would refuse, or that was invalidated.
The run fails (exit 1) if anything was lost, any token was reused outside its grace window, any
set was invalidated or any stored grant went back to an older version.

``--no-kill`` runs one daemon for the whole time instead and samples its resident memory
(VmRSS) every few seconds: the memory figures of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
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
    import_tokens,
    read_rows,
    write_config,
)

from refresherd.testing import FaultKind

# The faults of issue #3, part 1. INVALID_CLIENT and GARBAGE are left out on purpose: the first
# pauses a provider (by design) and the second is another form of "lost after rotate".
CHAOS_FAULTS = (
    FaultKind.DROP_AFTER_ROTATE,
    FaultKind.ERROR_AFTER_ROTATE,
    FaultKind.SLOW,
    FaultKind.RESET,
    FaultKind.RETRY_AFTER,
)
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
    kill_min: float = 1.0
    kill_max: float = 4.0
    kill: bool = True
    seed: int = 1
    settle: float = 8.0  # the final, undisturbed daemon's run before SIGTERM
    rss_interval: float = 5.0
    warmup: float = 60.0
    progress: Callable[[str], None] | None = None


@dataclass
class ChaosReport:
    settings: dict[str, Any]
    seconds: float = 0.0
    kills: int = 0
    daemon_starts: int = 0
    requests: int = 0
    rotations: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    grace_recoveries: int = 0
    reuses_outside_grace: int = 0
    concurrent_uses: int = 0
    invalid_grants: int = 0
    invalidated: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
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
        lines = [
            f"duration               {self.seconds:.0f} s",
            f"SIGKILLs               {self.kills} (daemon starts {self.daemon_starts})",
            f"token requests         {self.requests}",
            f"faults injected        {self.faults_total} ({share:.0%}): {faults}",
            f"rotations (grants)     {self.rotations}",
            f"grace recoveries       {self.grace_recoveries} (reuses within the grace window)",
            f"reuses outside grace   {self.reuses_outside_grace}",
            f"concurrent uses        {self.concurrent_uses}",
            f"invalid_grant answers  {self.invalid_grants}",
            f"invalidated sets       {self.invalidated}",
            f"version regressions    {self.version_regressions}",
            f"lowest final version   {self.min_version}",
            f"spare live tokens      {self.spare_live_tokens} (minted, answer lost, never used)",
            f"final daemon exit      {self.final_exit_code}",
            f"secrets in output      {self.leaks}",
            f"LOST                   {self.lost}" + (f" {self.lost_ids}" if self.lost_ids else ""),
        ]
        memory = self.memory(self.settings.get("warmup", 60.0))
        if memory is not None:
            lines.append(
                "memory (VmRSS)         start {start_kib} KiB, after {warm_at_s:.0f} s {warm_kib} "
                "KiB, end ({end_at_s:.0f} s) {end_kib} KiB, peak {peak_kib} KiB; "
                "{kib_per_1000_refreshes:+.1f} KiB per 1,000 refreshes after warm-up "
                "({refreshes_after_warmup} refreshes)".format(**memory)
            )
        return "\n".join(lines)


def _rss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


class _Chaos:
    def __init__(self, settings: ChaosSettings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.lives = 0
        self.idps: dict[str, IdPHandle] = {}
        self.versions: dict[str, int] = {}
        self.regressions = 0

    def say(self, text: str) -> None:
        if self.s.progress is not None:
            self.s.progress(text)

    def setup(self) -> Path:
        work = self.s.workdir
        work.mkdir(parents=True, exist_ok=True)
        for name, lifetime in PROVIDERS.items():
            handle = IdPHandle(
                work, name, usage="one_time", grace_period=GRACE_PERIOD,
                access_token_lifetime=lifetime,
            )  # fmt: skip
            self.idps[name] = handle.start()
        config = write_config(
            work / "refresherd.toml",
            database=work / "tokens.db",
            providers={name: h.provider(request_timeout="10s") for name, h in self.idps.items()},
            daemon={"concurrency": 16, "poll_interval": "500ms", "shutdown_timeout": "20s"},
            schedule={"backoff_initial": "1s", "backoff_max": "5s", "retry_after_max": "10s"},
        )
        per = -(-self.s.token_sets // len(self.idps))
        for name, handle in self.idps.items():
            import_tokens(config, handle.token_lines(name, per, prefix=name))
        # Faults only after the import, which issues tokens without the token endpoint anyway.
        for i, handle in enumerate(self.idps.values()):
            handle.faults.random(
                self.s.fault_rate,
                CHAOS_FAULTS,
                seed=self.s.seed * 100 + i,
                once_per_token=self.s.once_per_token,
                delay=SLOW_DELAY,
                retry_after=1.0,
            )
        return config

    def start(self, config: Path) -> DaemonProcess:
        self.lives += 1
        log = self.s.workdir / f"daemon-{self.lives:04d}.log"
        return DaemonProcess(config, log).start(wait_listening=False)

    def check_versions(self) -> None:
        """A stored grant never goes back to an older one (read as an application would)."""
        for token_set_id, row in read_rows(self.s.workdir / "tokens.db").items():
            if row["version"] < self.versions.get(token_set_id, 0):
                self.regressions += 1
            self.versions[token_set_id] = max(row["version"], self.versions.get(token_set_id, 0))

    def refreshes(self) -> int:
        return sum(h.ledger.refreshes for h in self.idps.values())

    def run(self) -> ChaosReport:
        report = ChaosReport(settings={k: v for k, v in vars(self.s).items() if k != "progress"})
        report.settings["workdir"] = str(self.s.workdir)
        config = self.setup()
        began = time.monotonic()
        end = began + self.s.duration
        daemon = self.start(config)
        next_kill = time.monotonic() + self.rng.uniform(self.s.kill_min, self.s.kill_max)
        next_sample = time.monotonic()
        next_check = time.monotonic()
        next_say = time.monotonic() + 30
        listening = False
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                if not daemon.running():
                    raise RuntimeError(f"the daemon exited by itself:\n{daemon.tail()}")
                if self.s.kill and now >= next_kill:
                    daemon.kill()  # SIGKILL, reaped
                    report.kills += 1
                    daemon = self.start(config)  # at once
                    next_kill = now + self.rng.uniform(self.s.kill_min, self.s.kill_max)
                if not self.s.kill and now >= next_sample:
                    # From the moment it listens: before that it is still importing.
                    listening = listening or bool(daemon.events("listening"))
                    rss = _rss_kib(daemon.pid) if listening else None
                    if rss is not None:
                        report.rss_kib.append((now - began, rss, self.refreshes()))
                    next_sample = now + self.s.rss_interval
                if now >= next_check:
                    self.check_versions()
                    next_check = now + 1.0
                if now >= next_say:
                    self.say(
                        f"{now - began:.0f} s: {report.kills} kills, "
                        f"{self.refreshes()} rotations, versions {sum(self.versions.values())}"
                    )
                    next_say = now + 30
                time.sleep(0.05)
            # The end: no more faults, one undisturbed daemon finishes what was left (journaled
            # attempts inside their grace windows), then a clean stop.
            for handle in self.idps.values():
                handle.faults.clear()
            if self.s.kill:
                daemon.kill()
                report.kills += 1
                daemon = self.start(config)
            time.sleep(self.s.settle)
            report.final_exit_code = daemon.stop(timeout=60)
        finally:
            if daemon.running():
                daemon.kill()
        report.seconds = time.monotonic() - began
        report.daemon_starts = self.lives
        self.check_versions()
        self.judge(report)
        for handle in self.idps.values():
            handle.stop()
        return report

    def judge(self, report: ChaosReport) -> None:
        rows = read_rows(self.s.workdir / "tokens.db")
        for handle in self.idps.values():
            ledger = handle.ledger
            report.requests += ledger.requests
            report.rotations += ledger.refreshes
            report.grace_recoveries += ledger.reuses_in_grace
            report.reuses_outside_grace += ledger.reuses_outside_grace
            report.concurrent_uses += ledger.concurrent_uses
            report.invalid_grants += ledger.invalid_grants
            for kind, n in ledger.faults_injected.items():
                report.faults[kind] = report.faults.get(kind, 0) + n
        for token_set_id, row in sorted(rows.items()):
            ledger = self.idps[row["provider"]].ledger
            stored = row["refresh_token"]
            if row["state"] == "invalidated":
                report.invalidated += 1
            if row["state"] == "invalidated" or not ledger.is_live(stored):
                report.lost += 1
                report.lost_ids.append(token_set_id)
            report.spare_live_tokens += len(ledger.live_refresh_tokens(token_set_id) - {stored})
        report.min_version = min((row["version"] for row in rows.values()), default=0)
        report.version_regressions = self.regressions
        report.leaks = len(LEAKS.scan())


def run_chaos(settings: ChaosSettings) -> ChaosReport:
    return _Chaos(settings).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--token-sets", type=int, default=40)
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument(
        "--independent-faults",
        action="store_true",
        help="fault every request independently, retries inside a grace window included "
        "(a stress test past what any client can promise: see docs/reliability.md)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-kill", action="store_true", help="one daemon, sampled for memory")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refresherd-chaos-"))
    settings = ChaosSettings(
        workdir=workdir,
        duration=args.minutes * 60,
        token_sets=args.token_sets,
        fault_rate=args.fault_rate,
        once_per_token=not args.independent_faults,
        seed=args.seed,
        kill=not args.no_kill,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(
        f"chaos run: {args.minutes:g} min, {args.token_sets} token sets, faults "
        f"{args.fault_rate:.0%} ({'independent' if args.independent_faults else 'once per token'})"
        ", "
        f"{'no kills' if args.no_kill else 'SIGKILL every 1-4 s'}, "
        f"seed {args.seed}, in {workdir}; python {platform.python_version()}",
        file=sys.stderr,
        flush=True,
    )
    report = run_chaos(settings)
    print(report.format())
    if args.json is not None:
        data = {k: v for k, v in vars(report).items()}
        data["memory"] = report.memory(settings.warmup)
        data["ok"] = report.ok
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if not report.ok:
        print("FAILED: something was lost, reused outside grace or invalidated", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
