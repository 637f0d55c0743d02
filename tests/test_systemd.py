"""systemd/refresherd.service: what the unit declares, `systemd-analyze verify` and `security`
on it, and the daemon run the way the unit has systemd run it (credentials, notify socket,
watchdog, the unit's own reload command, SIGTERM). No running systemd is needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    Daemons,
    IdPFactory,
    drain_notifications,
    read_rows,
    run_cli,
    wait_until,
    write_config,
)

from refresherd.daemon import SERVER_STOP_TIMEOUT
from refresherd.refresh.grants import PERSIST_DEADLINE
from refresherd.settings import EX_CONFIG, DaemonConfig, parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "refresherd.service"
CREDENTIALS_DROPIN = ROOT / "systemd" / "credentials.conf"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (.ci/run installs Debian's systemd package)",
)


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys stay repeated, as systemd reads them."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: list[tuple[str, str, str]], key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def one(entries: list[tuple[str, str, str]], key: str, section: str = "Service") -> str:
    found = values(entries, key, section)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def seconds(value: str) -> float:
    """A systemd time span as this suite uses them ("30s", "2s", "1min")."""
    return parse_duration(value.replace("min", "m"), file="unit", key="time span")


UNIT_ENTRIES = parse_unit(UNIT.read_text(encoding="utf-8"))
DROPIN_ENTRIES = parse_unit(CREDENTIALS_DROPIN.read_text(encoding="utf-8"))


def credential_names() -> list[str]:
    return [v.partition(":")[0] for v in values(DROPIN_ENTRIES, "LoadCredential")]


# --------------------------------------------------------------------------- the unit as text


def test_the_unit_declares_notify_watchdog_restart_user_directories_and_reload() -> None:
    u = UNIT_ENTRIES
    assert one(u, "Type") == "notify"
    assert one(u, "NotifyAccess") == "main"
    assert seconds(one(u, "WatchdogSec")) >= 10
    assert one(u, "Restart") == "on-failure"
    # A configuration error (exit 78) is not fixed by restarting.
    assert str(EX_CONFIG) in one(u, "RestartPreventExitStatus").split()
    assert one(u, "DynamicUser") == "yes"
    assert one(u, "StateDirectory") == "refresherd"
    assert one(u, "ConfigurationDirectory") == "refresherd"
    assert shlex.split(one(u, "ExecStart")) == [
        "/usr/local/bin/refresherd",
        "--config",
        "/etc/refresherd/config.toml",  # ConfigurationDirectory
        "run",
    ]
    assert shlex.split(one(u, "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]
    # systemd must wait longer than the daemon's own drain, a grant still being persisted at the
    # drain deadline, and the listener's close.
    drain = (
        DaemonConfig(database=Path("x")).shutdown_timeout + PERSIST_DEADLINE + SERVER_STOP_TIMEOUT
    )
    assert seconds(one(u, "TimeoutStopSec")) > drain
    # The example config keeps its database in the StateDirectory.
    example = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    assert 'database = "/var/lib/refresherd/tokens.db"' in example


def test_the_credentials_dropin_loads_secrets_as_credentials() -> None:
    loads = values(DROPIN_ENTRIES, "LoadCredential")
    assert loads, "the drop-in loads at least one credential"
    for load in loads:
        name, _, path = load.partition(":")
        assert name and "/" not in name and path.startswith("/"), load
    assert {s for s, _, _ in DROPIN_ENTRIES} == {"Service"}


# --------------------------------------------------------------------------- systemd-analyze


@needs_systemd_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """The unit and the credentials drop-in as installed; only ExecStart points at this
    environment's refresherd (verify checks that the binary exists and is executable)."""
    refresherd = shutil.which("refresherd", path=str(Path(sys.executable).parent))
    assert refresherd, "the refresherd script is installed with the package"
    text = UNIT.read_text(encoding="utf-8")
    assert text.count("ExecStart=/usr/local/bin/refresherd ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(
        text.replace("ExecStart=/usr/local/bin/refresherd ", f"ExecStart={refresherd} "),
        encoding="utf-8",
    )
    dropin = tmp_path / f"{UNIT.name}.d"
    dropin.mkdir()
    shutil.copy(CREDENTIALS_DROPIN, dropin / CREDENTIALS_DROPIN.name)
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify only warns (exit 0) about unknown keys and unparsable values: any output fails.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_ok() -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(
        r"Overall exposure level for refresherd\.service: (\d+\.\d+) (\w+)", result.stdout
    )
    assert found, result.stdout[-2000:]
    exposure, rating = float(found.group(1)), found.group(2)
    assert exposure <= 2.0 and rating == "OK", result.stdout[-4000:]


# --------------------------------------------------------------------------- run as systemd would


def test_the_daemon_keeps_the_units_promises(
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    """The environment systemd gives the unit's main process: the secret as a credential named
    in the drop-in, $NOTIFY_SOCKET, $WATCHDOG_USEC from WatchdogSec; then the unit's own
    ExecReload command, then SIGTERM (KillSignal's default) and TimeoutStopSec."""
    sock, path = notify_socket
    idp = idp_factory()
    credentials = tmp_path / "credentials"  # systemd's read-only $CREDENTIALS_DIRECTORY
    credentials.mkdir(mode=0o700)
    name = credential_names()[0]
    (credentials / name).write_text(idp.client_secret, encoding="utf-8")
    (credentials / name).chmod(0o400)
    provider = idp.provider()
    del provider["client_secret_file"]
    provider["client_secret_credential"] = name
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "config.toml", database=db, providers={"visma": provider})
    watchdog = seconds(one(UNIT_ENTRIES, "WatchdogSec"))
    env = {
        **os.environ,
        "CREDENTIALS_DIRECTORY": str(credentials),
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": str(int(watchdog * 1_000_000)),
    }
    line = idp.token_lines("visma", 1, with_access_token=False)[0]
    imported = run_cli(config, "tokens", "import", "-", input=json.dumps(line) + "\n", env=env)
    assert imported.returncode == 0, imported.stderr
    daemon = daemons(config, env=env)
    received: list[str] = []

    def seen(message: str, count: int = 1) -> bool:
        received.extend(drain_notifications(sock))
        return received.count(message) >= count

    wait_until(lambda: seen("READY=1"), what="READY=1")
    # READY=1 means the store is open and the listener answers.
    assert daemon.get("/readyz").status_code == 200
    wait_until(lambda: seen("WATCHDOG=1", 2), timeout=watchdog / 2 * 3, what="watchdog pings")
    # The secret came through $CREDENTIALS_DIRECTORY: the token set was refreshed with it.
    wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="a refresh")

    reload_argv = [
        str(daemon.pid) if arg == "$MAINPID" else arg
        for arg in shlex.split(one(UNIT_ENTRIES, "ExecReload"))
    ]
    subprocess.run(reload_argv, check=True, timeout=30)
    daemon.wait_for_event("config reloaded")
    wait_until(lambda: seen("READY=1", 2), what="READY=1 again after RELOADING=1")
    assert "RELOADING=1" in received[received.index("READY=1") + 1 :]

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=seconds(one(UNIT_ENTRIES, "TimeoutStopSec"))) == 0
    received.extend(drain_notifications(sock))
    ready, first_watchdog = received.index("READY=1"), received.index("WATCHDOG=1")
    assert ready < first_watchdog < received.index("STOPPING=1"), received
