"""Hooks against real receivers on loopback: an HTTP server (down for a while, then up, across
a daemon restart) and a real script run as the command hook."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    free_port,
    import_tokens,
    metric,
    read_rows,
    run_cli,
    wait_until,
    write_config,
    write_secret,
)
from databases import Database

from refresherd.clock import SystemClock
from refresherd.events import EventQueue
from refresherd.hooks import SIGNATURE_HEADER, Hooks
from refresherd.metrics import Metrics
from refresherd.model import Secret
from refresherd.settings import HooksConfig
from refresherd.store.sqlite import SqliteStore
from refresherd.testing import FaultKind

PROVIDER = "idp"

# The command hook: appends the event it reads on stdin to events.jsonl next to itself; fails
# (exit 3) the first time, so that the retry path runs too.
SCRIPT = """\
import pathlib, sys
here = pathlib.Path(__file__).parent
event = sys.stdin.read()
marker = here / "failed-once"
if not marker.exists():
    marker.write_text("")
    sys.exit(3)
with open(here / "events.jsonl", "a") as fh:
    fh.write(event.strip() + "\\n")
"""


class Receiver:
    """A webhook receiver: a real HTTP server on loopback, recording what it is sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@contextmanager
def receiver(port: int | None = None, *, start: bool = True) -> Iterator[Receiver]:
    r = Receiver(port or free_port())
    if start:
        r.start()
    try:
        yield r
    finally:
        r.stop()


def new_secret(directory: Path) -> tuple[str, Path]:
    secret = "whk_" + os.urandom(16).hex()
    return secret, write_secret(directory / "webhook.secret", secret)


def verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER.lower()], expected)
    event = json.loads(body)
    assert headers["x-refresherd-event-id"] == event["id"]
    assert headers["x-refresherd-event"] == event["type"]
    assert headers["content-type"] == "application/json"


def script(directory: Path) -> list[str]:
    path = directory / "on_event.py"
    path.write_text(SCRIPT)
    return [sys.executable, str(path)]


def hooks_config(
    tmp_path: Path,
    handle: IdPHandle,
    hooks: dict[str, object] | None,
    *,
    name: str = "config.toml",
    database: Database | None = None,
    **schedule: object,
) -> Path:
    """A config with a [hooks] section of ``hooks`` (None: no [hooks] at all)."""
    return write_config(
        tmp_path / name,
        database=database if database is not None else tmp_path / "tokens.db",
        providers={PROVIDER: handle.provider()},
        schedule=schedule or None,
        tables={"hooks": hooks} if hooks is not None else None,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_enqueue_delivers_a_signed_webhook_and_runs_the_command(tmp_path: Path) -> None:
    """The call the expiry detection makes (Hooks.enqueue), against real receivers."""
    secret, _ = new_secret(tmp_path)
    store = await SqliteStore.open(tmp_path / "tokens.db")
    metrics = Metrics()
    with receiver() as r:
        config = HooksConfig(
            webhook_url=r.url,
            webhook_secret=Secret(secret),
            command=tuple(script(tmp_path)),
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        hooks = Hooks(store=store, config=config, metrics=metrics)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(hooks.run)
                event_id = await hooks.enqueue(
                    "refresh_token.expiring",
                    "ts-1",
                    PROVIDER,
                    refresh_expires_at=1_900_000_000.0,
                    refresh_expires_at_rfc3339="2030-03-17T17:46:40Z",
                )
                assert event_id is not None

                # Done when both deliveries are recorded: the script's file may exist before
                # its line is written, and its exit is seen after that.
                def delivered(target: str) -> float | None:
                    return metrics.registry.get_sample_value(
                        "refresherd_hook_deliveries_total",
                        {"target": target, "outcome": "delivered"},
                    )

                with anyio.fail_after(60):
                    while not (delivered("webhook") and delivered("command")):
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            await hooks.aclose()
            await store.close()
    [(headers, body)] = r.received
    verify(secret, headers, body)
    event = json.loads(body)
    assert event == {
        "id": event_id,
        "type": "refresh_token.expiring",
        "token_set": "ts-1",
        "provider": PROVIDER,
        "occurred_at": event["occurred_at"],
        "refresh_expires_at": 1_900_000_000.0,
        "refresh_expires_at_rfc3339": "2030-03-17T17:46:40Z",
    }
    # The command failed once (exit 3), was retried, and got the same event on stdin.
    [line] = (tmp_path / "events.jsonl").read_text().splitlines()
    assert json.loads(line) == event
    sample = metrics.registry.get_sample_value
    assert (
        sample("refresherd_hook_deliveries_total", {"target": "command", "outcome": "failed"}) == 1
    )
    assert (
        sample("refresherd_hook_deliveries_total", {"target": "webhook", "outcome": "delivered"})
        == 1
    )
    assert (
        sample("refresherd_hook_deliveries_total", {"target": "command", "outcome": "delivered"})
        == 1
    )


def test_invalidation_reaches_a_receiver_that_was_down_across_a_restart(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0)
    secret, secret_file = new_secret(tmp_path)
    port = free_port()
    config = hooks_config(
        tmp_path,
        handle,
        {
            "webhook_url": f"http://127.0.0.1:{port}/hook",
            "webhook_secret_file": str(secret_file),
            "backoff_initial": "100ms",
            "backoff_max": "500ms",
        },
    )
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    handle.idp.revoke(str(lines[0]["refresh_token"]))
    first = daemons(config, "first")
    import_tokens(config, lines)
    # The receiver is down: the daemon keeps trying, with backoff.
    first.wait_for_event("notification failed, will retry", count=2, target="webhook")
    assert read_rows(tmp_path / "tokens.db")["ts-0000"]["state"] == "invalidated"
    assert first.stop() == 0
    # Queued in the database, not lost with the process.
    with receiver(port) as r:
        second = daemons(config, "second")
        wait_until(lambda: r.received, what="the webhook to be delivered after the restart")
        second.wait_for_event("notification delivered", target="webhook")
        text = second.metrics()
        assert (
            metric(text, "refresherd_hook_deliveries_total", target="webhook", outcome="delivered")
            == 1
        )
        assert second.stop() == 0
    headers, body = r.received[0]
    verify(secret, headers, body)
    event = json.loads(body)
    assert event["type"] == "token_set.invalidated"
    assert (event["token_set"], event["provider"], event["reason"]) == (
        "ts-0000",
        PROVIDER,
        "invalid_grant",
    )
    # At least once: every copy received is the same event (same id), for receivers to dedupe.
    assert {json.loads(b)["id"] for _, b in r.received} == {event["id"]}
    # No token in the payload.
    for token in (lines[0]["refresh_token"], lines[0].get("access_token")):
        assert token is None or str(token) not in body.decode()


def test_recovery_after_failures_runs_the_command_hook(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory(grace_period=5.0, usage="reuse")
    config = hooks_config(
        tmp_path,
        handle,
        {"command": script(tmp_path), "backoff_initial": "100ms", "backoff_max": "500ms"},
        backoff_initial="500ms",
        backoff_max="1s",
    )
    handle.faults.add(FaultKind.SERVER_ERROR, times=2)
    daemon = daemons(config)
    import_tokens(config, handle.token_lines(PROVIDER, 1, with_access_token=False))
    events_file = tmp_path / "events.jsonl"
    wait_until(events_file.exists, what="the command hook to record the recovery")
    daemon.wait_for_event("notification delivered", target="command")
    [line] = events_file.read_text().splitlines()
    event = json.loads(line)
    assert event["type"] == "token_set.recovered"
    assert (event["token_set"], event["failures"]) == ("ts-0000", 2)
    assert "server_error" in event["last_error"]
    assert daemon.events("notification failed, will retry", target="command")
    assert daemon.stop() == 0


@pytest.mark.anyio
async def test_a_command_that_hangs_is_killed_and_finally_given_up(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "tokens.db")
    metrics = Metrics()
    pid_file = tmp_path / "hook.pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    config = HooksConfig(
        command=(sys.executable, "-c", hang),
        command_timeout=0.5,
        backoff_initial=0.05,
        backoff_max=0.05,
        give_up_after=0.01,  # the first failure is the last
    )
    hooks = Hooks(store=store, config=config, metrics=metrics)
    given_up = {"target": "command", "outcome": "given_up"}
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            assert await hooks.enqueue("token_set.invalidated", "ts-1", PROVIDER, reason="x")
            with anyio.fail_after(60):
                while not metrics.registry.get_sample_value(
                    "refresherd_hook_deliveries_total", given_up
                ):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert await store.pending_hooks() == 0
        # The hung process was killed, not left behind.
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        await hooks.aclose()
        await store.close()


@pytest.mark.anyio
async def test_events_are_queued_without_hooks_and_taken_for_the_configured_types(
    tmp_path: Path,
) -> None:
    """Queuing needs no [hooks] (the CLI, a daemon without them); a dispatcher takes the
    events for its own targets, and only the types its config names."""
    store = await SqliteStore.open(tmp_path / "tokens.db")
    metrics = Metrics()
    hooks = Hooks(
        store=store,
        config=HooksConfig(command=("true",), events=("token_set.invalidated",)),
        metrics=metrics,
    )
    try:
        queue = EventQueue(store=store, metrics=metrics, clock=SystemClock())
        assert await queue.enqueue("refresh_token.expiring", "ts-1", PROVIDER) is not None
        assert await queue.enqueue("token_set.invalidated", "ts-1", PROVIDER) is not None
        with pytest.raises(ValueError, match="unknown event type"):
            await queue.enqueue("token_set.deleted", "ts-1", PROVIDER)
        # Nothing in the delivery queue until a dispatcher takes the events.
        assert await store.pending_hooks() == 0
        # A dispatcher without targets takes nothing: it would drop them.
        idle = Hooks(store=store, config=HooksConfig(), metrics=metrics)
        await idle._expand()
        await idle.aclose()
        await hooks._expand()
        [delivery] = await store.claim_hook_deliveries(now=time.time(), until=time.time(), limit=9)
        assert (delivery.event_type, delivery.target) == ("token_set.invalidated", "command")
        # Taken once: a second dispatcher (another daemon of the fleet) finds nothing.
        assert (
            await store.expand_events(targets=["command"], event_types=(), now=time.time(), limit=9)
            == 0
        )
    finally:
        await hooks.aclose()
        await store.close()


def test_an_absolute_expiry_within_the_horizon_reaches_the_webhook_once(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    handle = idp_factory()
    secret, secret_file = new_secret(tmp_path)
    with receiver() as r:
        config = write_config(
            tmp_path / "config.toml",
            database=tmp_path / "tokens.db",
            providers={PROVIDER: handle.provider(refresh_token_lifetime="1h")},
            schedule={"refresh_token_expiry_warning": "2h"},
            tables={"hooks": {"webhook_url": r.url, "webhook_secret_file": str(secret_file)}},
        )
        import_tokens(config, handle.token_lines(PROVIDER, 2))
        daemon = daemons(config)
        wait_until(lambda: len(r.received) >= 2, what="two refresh_token.expiring events")
        for headers, body in r.received:
            verify(secret, headers, body)
        events = sorted(r.events(), key=lambda e: e["token_set"])
        assert [e["type"] for e in events] == ["refresh_token.expiring"] * 2
        assert [e["token_set"] for e in events] == ["ts-0000", "ts-0001"]
        assert all(e["provider"] == PROVIDER and e["refresh_expires_at"] for e in events)
        assert daemon.stop() == 0
        # A restart does not announce the same expiry again.
        again = daemons(config, name="again")
        again.wait_for_event("listening")
        wait_until(
            lambda: (
                metric(again.metrics(), "refresherd_refresh_tokens_expiring", provider=PROVIDER)
                == 2
                or None
            ),
            what="the expiry scan after the restart",
        )
        assert again.stop() == 0
        assert len(r.received) == 2


def check_invalidated_event(secret: str, r: Receiver, lines: list[dict[str, object]]) -> None:
    """``r`` got one signed token_set.invalidated event for ts-0000, with no token in it."""
    [(headers, body)] = r.received
    verify(secret, headers, body)
    event = json.loads(body)
    assert (event["type"], event["token_set"], event["provider"], event["reason"]) == (
        "token_set.invalidated",
        "ts-0000",
        PROVIDER,
        "invalid_grant",
    )
    for token in (lines[0]["refresh_token"], lines[0].get("access_token")):
        assert token is None or str(token) not in body.decode()


def database_invalidations(daemon: DaemonProcess) -> float:
    return metric(
        daemon.metrics(),
        "refresherd_database_invalidations_total",
        provider=PROVIDER,
        reason="invalid_grant",
    )


def test_an_invalidation_by_refresherd_refresh_is_delivered_by_a_daemon_with_hooks(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    """The one-shot CLI, with a config that has no [hooks], invalidates a set: the event is
    queued in the database, and a daemon with [hooks] started later delivers it."""
    handle = idp_factory()
    secret, secret_file = new_secret(tmp_path)
    cli_config = hooks_config(tmp_path, handle, None, name="cli.toml", database=db)
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    import_tokens(cli_config, lines)
    handle.idp.revoke(str(lines[0]["refresh_token"]))
    run_cli(cli_config, "refresh", "ts-0000")
    assert read_rows(db)["ts-0000"]["state"] == "invalidated"

    with receiver() as r:
        config = hooks_config(
            tmp_path,
            handle,
            {"webhook_url": r.url, "webhook_secret_file": str(secret_file)},
            name="daemon.toml",
            database=db,
        )
        daemon = daemons(config)
        wait_until(lambda: r.received, what="the CLI's invalidation to reach the webhook")
        daemon.wait_for_event("notification delivered", target="webhook")
        # The daemon invalidated nothing itself, yet exports the database's count of it: what
        # the alert RefresherdTokenSetsInvalidated reads.
        wait_until(lambda: database_invalidations(daemon) == 1, what="the database's count")
        assert metric(daemon.metrics(), "refresherd_invalidations_total", provider=PROVIDER) == 0
        assert daemon.stop() == 0
    check_invalidated_event(secret, r, lines)


def test_a_daemon_without_hooks_queues_what_a_daemon_with_hooks_delivers(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    """Two daemons on one database: the one without [hooks] invalidates a set, the one with
    [hooks] delivers the event; the database-wide count of it is exported once, by the
    daemon that holds the exporter role (the first one, here), and not by the other."""
    handle = idp_factory()
    secret, secret_file = new_secret(tmp_path)
    plain_config = hooks_config(tmp_path, handle, None, name="plain.toml", database=db)
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    handle.idp.revoke(str(lines[0]["refresh_token"]))
    plain = daemons(plain_config, "plain")
    import_tokens(plain_config, lines)
    plain.wait_for_event("refresh", outcome="invalidated", token_set="ts-0000")
    assert not plain.events("notification delivered")

    with receiver() as r:
        config = hooks_config(
            tmp_path,
            handle,
            {"webhook_url": r.url, "webhook_secret_file": str(secret_file)},
            name="hooks.toml",
            database=db,
        )
        delivering = daemons(config, "delivering")
        wait_until(lambda: r.received, what="the other daemon's invalidation at the webhook")
        delivering.wait_for_event("notification delivered", target="webhook")
        # The database-wide figure from one daemon only (the alerts and the dashboard sum it
        # across instances); each process's own counter says who invalidated.
        wait_until(lambda: database_invalidations(plain) == 1, what="the count")
        wait_until(
            lambda: "refresherd_database_exporter 0.0" in delivering.metrics(),
            what="the second daemon to find the role taken",
        )
        assert "refresherd_database_invalidations_total" not in delivering.metrics()
        assert "refresherd_database_exporter 1.0" in plain.metrics()
        assert metric(plain.metrics(), "refresherd_invalidations_total", provider=PROVIDER) == 1
        assert (
            metric(delivering.metrics(), "refresherd_invalidations_total", provider=PROVIDER) == 0
        )
        assert delivering.stop() == 0
        assert plain.stop() == 0
    check_invalidated_event(secret, r, lines)


def test_events_no_daemon_delivers_are_dropped_after_give_up_after(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """No daemon of the database has a hook target: the queue stays bounded."""
    handle = idp_factory()
    config = hooks_config(tmp_path, handle, {"give_up_after": "1s"})
    lines = handle.token_lines(PROVIDER, 1, with_access_token=False)
    import_tokens(config, lines)
    handle.idp.revoke(str(lines[0]["refresh_token"]))
    run_cli(config, "refresh", "ts-0000")
    assert read_rows(tmp_path / "tokens.db")["ts-0000"]["state"] == "invalidated"
    time.sleep(1.5)
    daemon = daemons(config)
    [dropped] = daemon.wait_for_event(
        "notifications dropped: no daemon with [hooks] took them in time"
    )
    assert dropped["events"] == 1
    assert daemon.stop() == 0
