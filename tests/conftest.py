"""Shared fixtures for end-to-end tests of the real ``refresherd`` process.

- :class:`IdPHandle` / the ``idp_factory`` fixture: a real :class:`FakeIdP` on loopback, served
  from a thread of the pytest process, with a random client secret kept in a 0600 file.
- :func:`write_config`: a per-test TOML config, as an operator would write it;
  :func:`write_secret`: a secret in a 0600 file for it to name, registered in :data:`LEAKS`.
- :class:`DaemonProcess` / the ``daemons`` fixture: ``python -m refresherd --config PATH run`` as
  a subprocess, logs to a file, its listen address read from its own log, stopped with SIGTERM.
- :func:`run_cli`: one ``refresherd`` command as a subprocess.

Every byte a refresherd process of this suite writes (daemon logs, CLI output other than
``--reveal``, every answer of a daemon's HTTP listener: metrics with their labels, /readyz
problems) and the argv of every refresherd process it starts, and every FakeIdP made through
these fixtures, are registered in :data:`LEAKS`. At
the end of the session one check scans all of that output for every token value those IdPs ever
issued and for every client secret: a leak fails the run (``_no_secret_leaked_anywhere``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

# The database once per backend: db (tests/databases.py).
from databases import Database, PgDatabase, db, read_store_rows  # noqa: F401

# PostgreSQL on loopback: postgres_server, postgres_url, store_location (tests/pg_fixtures.py).
from pg_fixtures import postgres_server, postgres_url, store_location  # noqa: F401
from prometheus_client.parser import text_string_to_metric_families

from refresherd.testing import FakeIdP, running_in_thread

T = TypeVar("T")

# Generous: the suite must pass on a loaded 2-core machine. Conditions are polled, never timed.
DEADLINE = 60.0

# --------------------------------------------------------------------------- leak registry


def find_leaks(data: bytes, needles: set[bytes]) -> list[tuple[bytes, int]]:
    """Every (needle, offset) where a needle occurs in ``data``; exact, and fast on big logs.

    Any occurrence of a needle lies inside one maximal run of bytes drawn from the needles' own
    alphabet, so only those runs are searched, window by window, against a set.
    """
    needles = {n for n in needles if n}
    if not needles:
        return []
    alphabet = sorted(set(b"".join(needles)))
    run = re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in alphabet) + b"]+")
    lengths = sorted({len(n) for n in needles})
    shortest = lengths[0]
    found: list[tuple[bytes, int]] = []
    for match in run.finditer(data):
        text = match.group()
        if len(text) < shortest:
            continue
        for length in lengths:
            for i in range(len(text) - length + 1):
                window = text[i : i + length]
                if window in needles:
                    found.append((window, match.start() + i))
    return found


@dataclass
class LeakRegistry:
    """What the suite's refresherd processes wrote, and which secrets must never be in it."""

    files: list[Path] = field(default_factory=list)
    outputs: list[tuple[str, bytes]] = field(default_factory=list)
    idps: list[FakeIdP] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    findings: list[str] = field(default_factory=list)

    def add_file(self, path: Path) -> None:
        self.files.append(path)

    def add_output(self, label: str, data: bytes) -> None:
        if data:
            self.outputs.append((label, data))

    def check_now(self, label: str, data: bytes) -> None:
        """Scan ``data`` at once and keep only what is found: for output polled many times
        (metrics), which would cost too much memory kept until the session's end. A secret in
        it must exist already, so nothing is missed by not waiting."""
        self.findings.extend(self._findings(label, data, self.needles()))

    def add_idp(self, idp: FakeIdP) -> None:
        self.idps.append(idp)

    def add_secret(self, value: str) -> None:
        self.secrets.add(value)

    def needles(self) -> dict[bytes, str]:
        kinds: dict[bytes, str] = {}
        for idp in self.idps:
            for token in idp.ledger.issued_tokens():
                kinds[token.encode()] = "token"
        for secret in self.secrets:
            kinds[secret.encode()] = "client secret"
        return kinds

    def scan(self) -> list[str]:
        """Human-readable findings. The leaked value is never repeated, only fingerprinted."""
        kinds = self.needles()
        problems: list[str] = list(self.findings)
        sources: list[tuple[str, bytes]] = []
        for path in self.files:
            try:
                sources.append((str(path), path.read_bytes()))
            except OSError as exc:
                problems.append(f"{path}: registered log file cannot be read ({exc.strerror})")
        sources.extend(self.outputs)
        for label, data in sources:
            problems.extend(self._findings(label, data, kinds))
        return problems

    @staticmethod
    def _findings(label: str, data: bytes, kinds: dict[bytes, str]) -> list[str]:
        problems = []
        for needle, offset in find_leaks(data, set(kinds)):
            fingerprint = hashlib.sha256(needle).hexdigest()[:12]
            problems.append(
                f"{label}: byte {offset}: a {kinds[needle]} (sha256 {fingerprint}...) "
                "appears in refresherd's output"
            )
        return problems

    @property
    def bytes_scanned(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists()) + sum(
            len(d) for _, d in self.outputs
        )


LEAKS = LeakRegistry()


@pytest.fixture(scope="session", autouse=True)
def _no_secret_leaked_anywhere() -> Iterator[LeakRegistry]:
    """The one final check: no token an IdP of this suite issued, and no client secret, in any
    byte any refresherd process of this suite wrote. Fails the run (an error at teardown)."""
    yield LEAKS
    problems = LEAKS.scan()
    assert not problems, "secrets leaked into refresherd output:\n" + "\n".join(problems[:50])


# --------------------------------------------------------------------------- small helpers


def wait_until(
    predicate: Callable[[], T], *, timeout: float = DEADLINE, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or predicate!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string.
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(
    path: Path,
    *,
    database: Path | str | PgDatabase,
    providers: Mapping[str, Mapping[str, object]],
    listen: str = "127.0.0.1:0",
    log_level: str = "info",
    daemon: Mapping[str, object] | None = None,
    schedule: Mapping[str, object] | None = None,
    server: Mapping[str, object] | None = None,
    tables: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """The config at ``path``; ``tables`` are more sections, by name (``{"api": {...}}``)."""
    if isinstance(database, PgDatabase):
        lines = ["[daemon]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in database.config_entries().items()]
    else:
        lines = ["[daemon]", f"database = {toml_value(database)}"]
    for key, value in (daemon or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    lines += ["", "[server]", f"listen = {toml_value(listen)}"]
    for key, value in (server or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    lines += ["", "[log]", f"level = {toml_value(log_level)}", 'format = "json"']
    if schedule:
        lines += ["", "[schedule]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in schedule.items()]
    for name, table in providers.items():
        lines += ["", f"[providers.{name}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    for name, table in (tables or {}).items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_secret(path: Path, secret: str) -> Path:
    """``secret`` in a new 0600 file at ``path``, as a config names it; registered in
    :data:`LEAKS`, so that it may never show in refresherd's output."""
    LEAKS.add_secret(secret)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return path


# --------------------------------------------------------------------------- the fake IdP


class IdPHandle:
    """A FakeIdP with its own random client credentials, served from a background thread."""

    def __init__(self, directory: Path, name: str, *, port: int = 0, **settings: Any) -> None:
        self.name = name
        self.client_id = f"client-{name}"
        self.client_secret = "cs_" + os.urandom(18).hex()
        self.idp = FakeIdP(clients={self.client_id: self.client_secret}, port=port, **settings)
        self.port = port
        self.secret_file = write_secret(directory / f"{name}.client-secret", self.client_secret)
        self._stack: contextlib.ExitStack | None = None
        LEAKS.add_idp(self.idp)

    @property
    def ledger(self) -> Any:
        return self.idp.ledger

    @property
    def faults(self) -> Any:
        return self.idp.faults

    @property
    def token_url(self) -> str:
        if self._stack is None:
            return f"http://127.0.0.1:{self.port}/connect/token"
        return self.idp.token_url

    def start(self) -> IdPHandle:
        assert self._stack is None
        stack = contextlib.ExitStack()
        stack.enter_context(running_in_thread(self.idp))
        self._stack = stack
        return self

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def rotate_client_secret(self) -> str:
        new = "cs_" + os.urandom(18).hex()
        LEAKS.add_secret(new)
        self.idp.set_client_secret(self.client_id, new)
        return new

    def provider(self, **overrides: object) -> dict[str, object]:
        """The [providers.NAME] table for this IdP (secret by file, never inline or on argv)."""
        table: dict[str, object] = {
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret_file": str(self.secret_file),
            "refresh_token_usage": self.idp.usage,
            "grace_period": f"{self.idp.grace_period:g}s",
            "request_timeout": "10s",
        }
        table.update(overrides)
        return table

    def token_lines(
        self, provider: str, count: int, *, prefix: str = "ts", with_access_token: bool = True
    ) -> list[dict[str, object]]:
        """``tokens import`` lines: one new authorization (token family) per token set."""
        lines = []
        for i in range(count):
            token_set_id = f"{prefix}-{i:04d}"
            response = dict(self.idp.issue(user=token_set_id))
            if not with_access_token:
                response.pop("access_token")
                response.pop("expires_in")
            lines.append({"id": token_set_id, "provider": provider, **response})
        return lines


# idp_factory's type, for the tests that take it.
IdPFactory = Callable[..., IdPHandle]


@pytest.fixture
def idp_factory(tmp_path: Path) -> Iterator[IdPFactory]:
    """``idp_factory(name="idp", serve=True, port=0, **FakeIdP settings)`` → a served IdP."""
    handles: list[IdPHandle] = []

    def make(name: str = "idp", *, serve: bool = True, **settings: Any) -> IdPHandle:
        handle = IdPHandle(tmp_path, name, **settings)
        handles.append(handle)
        if serve:
            handle.start()
        return handle

    yield make
    for handle in reversed(handles):
        handle.stop()


# --------------------------------------------------------------------------- the CLI


def refresherd_argv(config: Path | None, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "refresherd"]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, *args]


def run_cli(
    config: Path | None,
    *args: str,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEADLINE,
) -> subprocess.CompletedProcess[str]:
    """Run one ``refresherd`` command; its output joins the leak scan (stdout unless --reveal)."""
    argv = refresherd_argv(config, *args)
    LEAKS.add_output("argv of refresherd " + " ".join(args), "\0".join(argv).encode())
    proc = subprocess.run(
        argv,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )
    label = "refresherd " + " ".join(args)
    LEAKS.add_output(label + " (stderr)", proc.stderr.encode())
    if "--reveal" not in args:
        LEAKS.add_output(label + " (stdout)", proc.stdout.encode())
    return proc


def import_tokens(config: Path, lines: Sequence[Mapping[str, object]]) -> None:
    body = "".join(json.dumps(line) + "\n" for line in lines)
    proc = run_cli(config, "tokens", "import", "-", input=body)
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(lines)} token set(s)" in proc.stdout


# --------------------------------------------------------------------------- the database


def database_at_version(path: Path, version: int) -> sqlite3.Connection:
    """A database as refresherd left it at schema ``version`` (the first ``version``
    migrations), open for the test to add old rows; use it as a context manager."""
    from refresherd.store.migrations import SQLITE, split_sql

    conn = sqlite3.connect(path)
    for migration in SQLITE[:version]:
        for statement in split_sql(migration):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def read_rows(database: Path | PgDatabase) -> dict[str, dict[str, Any]]:
    """Every token set as stored, by id (a plain read, as an application of ours would do)."""
    if isinstance(database, PgDatabase):
        return read_store_rows(database.location)
    conn = sqlite3.connect(database, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM token_sets").fetchall()
    finally:
        conn.close()
    return {row["id"]: dict(row) for row in rows}


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(text: str, name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels`` (0 if there is none)."""
    total = 0.0
    want = set(labels.items())
    for (sample, have), value in parse_metrics(text).items():
        if sample == name and want <= have:
            total += value
    return total


# --------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """``python -m refresherd --config PATH run`` as a real subprocess, logging to a file."""

    def __init__(self, config: Path, log_path: Path, *, env: Mapping[str, str] | None = None):
        self.config = config
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] | None = None
        self.returncode: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, wait_listening: bool = True) -> DaemonProcess:
        assert self.proc is None, "start() once per DaemonProcess"
        LEAKS.add_file(self.log_path)
        argv = refresherd_argv(self.config, "run")
        LEAKS.add_output(f"argv of the daemon logging to {self.log_path}", "\0".join(argv).encode())
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        if wait_listening:
            self.address = self.wait_for_address()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_address(self, timeout: float = DEADLINE) -> tuple[str, int]:
        def find() -> tuple[str, int] | None:
            # "listening" rather than "refresherd started": it comes after the signal
            # handlers are installed, so a test may signal the daemon as soon as it returns.
            for line in self.lines():
                value = line.get("address") if line.get("event") == "listening" else None
                if isinstance(value, str):
                    host, _, port = value.rpartition(":")
                    return host.strip("[]"), int(port)
            if not self.running():
                pytest.fail(f"refresherd exited with {self.proc.returncode}:\n{self.log_text()}")  # type: ignore[union-attr]
            return None

        return wait_until(find, timeout=timeout, what="refresherd to report its listen address")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"refresherd did not exit within {timeout:.0f}s:\n{self.tail()}")
        return self.returncode

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM, then the exit code (the daemon drains in-flight refreshes first)."""
        if self.running():
            self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.returncode = self.proc.wait()

    # -- the log ------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def lines(self) -> list[dict[str, Any]]:
        """Every log line, JSON decoded; a line that is not JSON comes as ``{"raw": line}``."""
        out: list[dict[str, Any]] = []
        for raw in self.log_text().splitlines():
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            out.append(value if isinstance(value, dict) else {"raw": raw})
        return out

    def events(self, event: str, **fields: object) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def wait_for_event(
        self, event: str, *, timeout: float = DEADLINE, count: int = 1, **fields: object
    ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            hits = self.events(event, **fields)
            if len(hits) >= count:
                return hits
            if not self.running():
                pytest.fail(f"refresherd exited while waiting for {event!r}:\n{self.tail()}")
            return None

        return wait_until(found, timeout=timeout, what=f"log event {event!r} {fields or ''}")

    # -- HTTP ---------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        assert self.address is not None
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{path}"

    def get(self, path: str) -> httpx.Response:
        response = httpx.get(self.url(path), timeout=30)
        LEAKS.check_now(f"GET {path} of the daemon logging to {self.log_path}", response.content)
        return response

    def metrics(self) -> str:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text


# daemons' type, for the tests that take it.
Daemons = Callable[..., DaemonProcess]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """``daemons(config, name="daemon", start=True)``: daemons that never outlive the test."""
    made: list[DaemonProcess] = []

    def make(config: Path, name: str = "daemon", *, start: bool = True, **kw: Any) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path / f"{name}.log", **kw)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in made:
        if daemon.running():
            daemon.kill()


# --------------------------------------------------------------------------- the notify socket


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET: (socket, path)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    try:
        yield sock, path
    finally:
        sock.close()


def drain_notifications(sock: socket.socket) -> list[str]:
    """Every notification line waiting on ``sock`` (sd_notify sends lines in one datagram)."""
    messages: list[str] = []
    while True:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return messages
        messages.extend(data.decode().splitlines())


@pytest.fixture
def anyio_backend() -> str:
    """The daemon runs on asyncio; `@pytest.mark.anyio` tests run there unless a module says
    otherwise (tests/test_client.py also runs the client on trio). Without this, anyio's
    plugin runs them on every backend installed, and trio is (for the client's tests)."""
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files holding `slow` tests first (stable otherwise): with `--dist loadfile` a file is
    one unit of work, handed out in this order, and a minute-long file that starts last is the
    whole suite's tail on two cores."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
