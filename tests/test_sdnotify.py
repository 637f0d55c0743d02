"""systemd's notify protocol, against a real datagram socket, from a real daemon process."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from conftest import (
    Daemons,
    IdPFactory,
    drain_notifications,
    wait_until,
    write_config,
)

from refresherd.sdnotify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.notify("READY=1")  # a no-op, and no error


def test_messages_reach_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    notifier.notify("READY=1", "STATUS=hello")
    assert drain_notifications(sock) == ["READY=1", "STATUS=hello"]


def test_messages_reach_an_abstract_socket() -> None:
    name = f"refresherd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(1)
        Notifier(env={"NOTIFY_SOCKET": "@" + name}).notify("STOPPING=1")
        assert sock.recv(100) == b"STOPPING=1"


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env=mine).watchdog_interval == 2.0
    other = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env=other).watchdog_interval is None
    assert Notifier(env={"WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_a_vanished_manager_is_not_an_error(tmp_path: Path) -> None:
    Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify("READY=1")


def test_daemon_sends_ready_watchdog_stopping_in_order(
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    sock, path = notify_socket
    idp = idp_factory()
    config = write_config(
        tmp_path / "config.toml",
        database=tmp_path / "tokens.db",
        providers={"idp": idp.provider()},
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    daemon = daemons(config, env=env)
    received: list[str] = []

    def watchdog_seen_twice() -> bool:
        received.extend(drain_notifications(sock))
        return received.count("WATCHDOG=1") >= 2

    wait_until(watchdog_seen_twice, what="READY=1 and two WATCHDOG=1 pings")
    daemon.send_signal(signal.SIGHUP)
    wait_until(
        lambda: received.extend(drain_notifications(sock)) or "RELOADING=1" in received,
        what="RELOADING=1 after SIGHUP",
    )
    assert daemon.stop() == 0
    received.extend(drain_notifications(sock))

    assert "READY=1" in received and "STOPPING=1" in received, received
    ready = received.index("READY=1")
    first_watchdog = received.index("WATCHDOG=1")
    stopping = received.index("STOPPING=1")
    assert ready < first_watchdog < stopping
    # READY comes once the store and listener are up: after it, the daemon answers.
    reloading = received.index("RELOADING=1")
    assert "READY=1" in received[reloading:], "READY=1 again after the reload"
    assert received.index("STATUS=refreshing token sets") >= 0
