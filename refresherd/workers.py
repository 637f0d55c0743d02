"""Worker processes: ``[daemon] workers = N`` runs the primary and N - 1 workers on one database.

One Python event loop tops out well below what two cores and an IdP allow (docs/benchmarks.md),
so more processes refresh beside the primary. They need no coordination beyond what already
makes several daemons on one database safe: leases, compare-and-swap and the journal. The
primary alone listens (health, metrics, API), counts the database for the gauges and watches
expiry; every process refreshes and delivers hooks. Each worker writes a snapshot of its
metrics to the primary on stdout once a second (refresherd.worker_metrics merges them into
/metrics) and stops when its stdin, held open by the primary, ends: a dead primary leaves no
orphans. The primary restarts a worker that ends unasked, with backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from refresherd import deadlines
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.settings import EX_CONFIG, Config, concurrency_ceiling, share_problem
from refresherd.worker_metrics import Snapshot, decode, encode, retire, take_snapshot

log = get_logger("refresherd.workers")

SNAPSHOT_INTERVAL: Final = 1.0
# After the stop deadline, how long a worker told to cancel at once may take before SIGKILL.
END_GRACE: Final = 5.0
# The database the primary runs on, for a worker to check against its own reading of the file.
PRIMARY_DATABASE_ENV: Final = "REFRESHERD_PRIMARY_DATABASE"
MAX_SNAPSHOT_BYTES: Final = 8 * 1024 * 1024
RESTART_BACKOFF: Final = (1.0, 30.0)  # first delay, longest delay
# A worker that ran this long before it ended starts again after the first delay.
HEALTHY_RUN: Final = 60.0
# What systemd (or a supervisor) meant for the primary only.
_PRIMARY_ONLY_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def share(total: int, workers: int, index: int) -> int:
    """Process ``index``'s part of a count limit: the parts add up to ``total`` exactly."""
    return total // workers + (1 if index < total % workers else 0)


def process_share(config: Config, index: int) -> Config:
    """The config one process runs with: the whole daemon's limits (in flight, and a
    provider's connections, concurrent refreshes and request rate) shared out equally, so that
    an IdP sees what the config says whatever the number of processes."""
    n = config.daemon.workers
    if n == 1:
        return config
    providers = {
        name: dataclasses.replace(
            p,
            max_connections=(
                "auto" if p.max_connections == "auto" else share(p.max_connections, n, index)
            ),
            max_concurrent_refreshes=(
                None
                if p.max_concurrent_refreshes is None
                else share(p.max_concurrent_refreshes, n, index)
            ),
            max_requests_per_second=(
                None if p.max_requests_per_second is None else p.max_requests_per_second / n
            ),
        )
        for name, p in config.providers.items()
    }
    # "auto" is a ceiling too (AUTO_CONCURRENCY), shared out as a count is; each process's
    # share is then a count, which a distant IdP does not raise (settings.far_concurrency_ceiling).
    daemon = dataclasses.replace(
        config.daemon, concurrency=share(concurrency_ceiling(config.daemon), n, index)
    )
    return dataclasses.replace(config, daemon=daemon, providers=providers)


def worker_config(config: Config, arg: str, primary_database: str | None) -> tuple[int, Config]:
    """This worker's index and the config it runs with, from ``--worker I/N``: the primary's N
    (the file may have changed since it started), checked against the file as it is now.
    ValueError says why this worker cannot run."""
    index_text, _, count_text = arg.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--worker {arg}: expected INDEX/COUNT, such as 1/2") from None
    if not 1 <= index < count:
        raise ValueError(f"--worker {arg}: expected 1 <= INDEX < COUNT")
    if primary_database is not None and str(config.daemon.database) != primary_database:
        raise ValueError(
            f"daemon.database is now {config.daemon.database}, but the daemon runs on "
            f"{primary_database}: the change needs a restart of the daemon"
        )
    config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, workers=count))
    problem = share_problem(config.daemon, config.providers)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    return index, config


def next_backoff(previous: float | None, ran: float) -> float:
    """How long to wait before starting a worker again that ended after ``ran`` seconds."""
    first, longest = RESTART_BACKOFF
    if previous is None or ran >= HEALTHY_RUN:
        return first
    return min(previous * 2, longest)


class WorkerPool:
    """The primary's worker processes: started, read, restarted, stopped."""

    def __init__(
        self,
        *,
        count: int,
        config_path: Path,
        database: str,
        metrics: Metrics,
        timeout: float = 60.0,
    ) -> None:
        self.count = count
        # A worker silent this long (no snapshot) is hung: killed and started again. Set
        # again by a reload.
        self.timeout = timeout
        self.config_path = config_path
        self.database = database
        self.metrics = metrics
        self._processes: dict[int, anyio.abc.Process] = {}
        self._latest: dict[int, Snapshot] = {}
        self._retired: Snapshot = {}
        self._stopping = False
        self._deadline = math.inf
        self._one_ended = anyio.Event()
        self._scope: anyio.CancelScope | None = None

    def snapshots(self) -> list[Snapshot]:
        return [self._retired, *self._latest.values()]

    async def run(self) -> None:
        """Keep ``count`` workers running until :meth:`stop`."""
        # Cancelled by stop() past its deadline, or with the daemon: each worker is then
        # ended by its own task (_run_one).
        with anyio.CancelScope() as self._scope:
            async with anyio.create_task_group() as tg:
                for index in range(1, self.count + 1):
                    tg.start_soon(self._keep, index)

    def reload(self) -> None:
        """Pass a SIGHUP on: each worker reads the config file again. Only to workers that
        have reported once: before that a worker may not handle SIGHUP yet (it would die)."""
        for index, process in self._processes.items():
            if index in self._latest:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)

    async def begin_stop(self, timeout: float) -> None:
        """Ask every worker to drain and stop within ``timeout``: its stdin ends. Not SIGTERM:
        under systemd each worker gets one of its own, and a second would mean "stop at once,
        drop the drain"."""
        self._stopping = True
        self._deadline = min(self._deadline, anyio.current_time() + timeout)
        for process in list(self._processes.values()):
            await _close_stdin(process)

    async def stop(self) -> None:
        """Wait for the workers until the deadline :meth:`begin_stop` set; then end them."""
        with anyio.move_on_after(max(0.0, self._deadline - anyio.current_time())):
            await self._all_ended()
        if self._processes and self._scope is not None:
            for index, process in self._processes.items():
                log.warning("worker did not stop in time; ending it", worker=index, pid=process.pid)
            self._scope.cancel()
            with anyio.CancelScope(shield=True):  # bounded: END_GRACE, then SIGKILL
                await self._all_ended()

    async def _all_ended(self) -> None:
        while self._processes:
            await self._one_ended.wait()
            self._one_ended = anyio.Event()

    def _command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "refresherd",
            "--config",
            str(self.config_path),
            "run",
            "--worker",
            f"{index}/{self.count + 1}",
        ]

    async def _keep(self, index: int) -> None:
        delay: float | None = None
        while not self._stopping:
            started = anyio.current_time()
            code = await self._run_one(index)
            if self._stopping:
                return
            if code == EX_CONFIG:
                log.error(
                    "worker cannot start with the config file as it is now; not starting it "
                    "again: restart the daemon (or fix the file)",
                    worker=index,
                    exit_code=code,
                )
                return
            delay = next_backoff(delay, anyio.current_time() - started)
            if code == 0:
                # Asked to stop by someone else (systemd signals every process at stop):
                # started again unless the daemon is stopping too.
                log.info("worker stopped", worker=index, restart_in=delay)
            else:
                self.metrics.worker_restarts.inc()
                log.error(
                    "worker process ended unasked; starting it again",
                    worker=index,
                    exit_code=code,
                    restart_in=delay,
                )
            await anyio.sleep(delay)

    async def _run_one(self, index: int) -> int | None:
        env = {k: v for k, v in os.environ.items() if k not in _PRIMARY_ONLY_ENV}
        env[PRIMARY_DATABASE_ENV] = self.database
        try:
            process = await anyio.open_process(
                self._command(index),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,  # the worker logs where the primary does
                env=env,
            )
        except OSError as exc:
            log.error("cannot start a worker process", worker=index, error=str(exc))
            return None
        self._processes[index] = process
        self.metrics.worker_processes.set(len(self._processes))
        try:
            if self._stopping:  # asked to stop while it was starting
                await _close_stdin(process)
            assert process.stdout is not None
            await self._read_snapshots(index, process, BufferedByteReceiveStream(process.stdout))
            return await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    # Cancelled (past stop()'s deadline, or the primary going away at once):
                    # SIGTERM, then SIGKILL after END_GRACE. What it had in flight is in the
                    # journal and recovered in grace, as after a crash.
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
                    with anyio.move_on_after(END_GRACE):
                        await process.wait()
                    if process.returncode is None:
                        log.error("worker did not end; killing it", worker=index, pid=process.pid)
                        process.kill()
                        await process.wait()
                await process.aclose()
            del self._processes[index]
            self._one_ended.set()
            self.metrics.worker_processes.set(len(self._processes))
            last = self._latest.pop(index, None)
            if last is not None:
                retire(self._retired, last)

    async def _read_snapshots(
        self, index: int, process: anyio.abc.Process, stream: BufferedByteReceiveStream
    ) -> None:
        while True:
            try:
                # Each line within the timeout, except while stopping (stop() has its own
                # deadline). deadlines.fail_after: a pause of the whole machine is not a hang.
                async with nullcontext() if self._stopping else deadlines.fail_after(self.timeout):
                    line = await stream.receive_until(b"\n", MAX_SNAPSHOT_BYTES)
            except TimeoutError:
                if self._stopping:
                    continue
                # Its event loop is stuck (or it was stopped): what it had in flight is in
                # the journal, recovered in grace by whoever leases the sets next.
                log.error(
                    "worker sent no metrics for too long: taken for hung; killing it",
                    worker=index,
                    pid=process.pid,
                    timeout=self.timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                return
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            except anyio.DelimiterNotFound:
                # Not a snapshot: a worker that writes this is broken, and one that nobody
                # reads would block on its next write. Started again.
                log.error("a worker wrote an overlong metrics line; killing it", worker=index)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                return
            try:
                self._latest[index] = decode(json.loads(line))
            except ValueError as exc:
                log.warning("a worker sent a malformed metrics line", worker=index, error=str(exc))


async def _close_stdin(process: anyio.abc.Process) -> None:
    if process.stdin is not None:
        with anyio.CancelScope(shield=True):
            await process.stdin.aclose()


# ---- the worker's side ----------------------------------------------------------------------


def write_snapshot(metrics: Metrics) -> None:
    """One line of this worker's metrics to the primary (stdout)."""
    line = json.dumps(encode(take_snapshot(metrics.registry)), separators=(",", ":"))
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass  # the primary is gone; the stdin watch stops this worker


async def publish_snapshots(metrics: Metrics) -> None:
    while True:
        # In a thread: a pipe the primary does not read (yet) must not stall the event loop.
        await anyio.to_thread.run_sync(write_snapshot, metrics)
        await anyio.sleep(SNAPSHOT_INTERVAL)


async def wait_for_primary_to_end() -> None:
    """Return when stdin, the primary's end of a pipe it never writes to, closes."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    while True:
        await anyio.wait_readable(fd)
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            continue
