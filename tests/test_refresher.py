"""The Refresher end to end: a real FakeIdP on loopback, a real SqliteStore, real metrics and the
real structlog output. One test per row of DESIGN.md's failure table, each checking the outcome,
what is stored, the metric and the log line; then single-flight, leases, crash recovery and
isolation between token sets.

Nothing here is timed: waits are polls with generous deadlines, and the grace periods are short
(4-5 s) only so that the module stays quick.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import io
import itertools
import json
import logging
import math
import random
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from refresh_parts import RefreshParts, build_refresher

from refresherd import logs as refresher_logs
from refresherd import ownership, policy
from refresherd.clock import Clock
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.idp.failures import Ambiguous
from refresherd.metrics import Metrics
from refresherd.model import RefreshTokenUsage, Secret, State, TokenSet
from refresherd.refresh.outcome import RefreshResult
from refresherd.refresh.refresher import Refresher
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.store import NewTokenSet
from refresherd.store.sqlite import SqliteStore
from refresherd.testing import FakeIdP, FaultKind

CLIENT_ID = "refresherd-test"
CLIENT_SECRET = "cs_refresher-test-9d2f7e4b1a"
ROTATED_SECRET = "cs_rotated-at-the-idp-5c8e3f"
PROVIDER = "p"
DEADLINE = 30.0  # for polls: generous, never a performance claim

SCHEDULE = ScheduleConfig(
    refresh_fraction=0.8,
    min_margin=60.0,
    jitter=0.1,
    min_interval=1.0,
    default_expires_in=3600.0,
    backoff_initial=10.0,
    backoff_max=600.0,
    retry_after_max=20.0,
    circuit_backoff_initial=1.0,
    circuit_backoff_max=2.0,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- logs


# Everything this module logged, and every IdP it used: scanned for leaks at the end.
_MODULE_LOG: list[str] = []
_MODULE_IDPS: list[FakeIdP] = []


class LogCapture:
    """refresherd's structlog output, as JSON lines in memory."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.text.splitlines():
            if raw.strip():
                value = json.loads(raw)  # every line is JSON: a plain text line fails here
                assert isinstance(value, dict)
                out.append(value)
        return out

    def events(self, event: str, **fields: object) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def at_level(self, level: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("level") == level]

    def outcome_line(self, token_set: str) -> dict[str, Any]:
        """The one 'refresh' line of a token set's refresh."""
        lines = self.events("refresh", token_set=token_set)
        assert len(lines) == 1, f"expected one 'refresh' line for {token_set}, got {lines}"
        return lines[0]


def _secrets_of(idps: list[FakeIdP]) -> set[str]:
    values = {CLIENT_SECRET, ROTATED_SECRET}
    for idp in idps:
        values |= idp.ledger.issued_tokens()
    return values


def _leaks(text: str, values: set[str]) -> list[str]:
    # Report a fingerprint, never the value itself.
    return [f"{v[:6]}... ({len(v)} chars)" for v in values if v and v in text]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """refresherd's own logging setup, writing to memory; undone afterwards (it is global)."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    capture = LogCapture()
    refresher_logs.configure(level="debug", fmt="json", stream=capture.stream)
    try:
        yield capture
    finally:
        refresher_logs.reset()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        _MODULE_LOG.append(capture.text)


# --------------------------------------------------------------------------- the harness


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Harness:
    store: SqliteStore
    idp: FakeIdP
    metrics: Metrics
    providers: dict[str, ProviderConfig]
    endpoints: dict[str, TokenEndpoint]
    # The refresher and the parts it was built from (its providers' live set, storage pause,
    # leases, grants), as the daemon hands them out.
    parts: RefreshParts
    extra_refreshers: list[Refresher] = field(default_factory=list)

    @property
    def refresher(self) -> Refresher:
        return self.parts.refresher

    async def add(
        self, token_set_id: str, *, provider: str = PROVIDER, user: str | None = None
    ) -> str:
        """Authorize a user at the IdP and store the token set; returns its refresh token."""
        issued = self.idp.issue(user or token_set_id)
        now = time.time()
        refresh_token = str(issued["refresh_token"])
        await self.store.add(
            NewTokenSet(
                id=token_set_id,
                provider=provider,
                refresh_token=Secret(refresh_token),
                access_token=Secret(str(issued["access_token"])),
                expires_at=now + 3600,
                next_refresh_at=now + 2880,
                token_type="Bearer",
                scope=str(issued["scope"]),
            ),
            now=now,
        )
        return refresh_token

    async def get(self, token_set_id: str) -> TokenSet:
        ts = await self.store.get(token_set_id)
        assert ts is not None
        return ts

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def successes(self, provider: str = PROVIDER) -> float:
        return self.metric("refresherd_refresh_success_total", provider=provider)

    def failures(self, reason: str, provider: str = PROVIDER) -> float:
        return self.metric("refresherd_refresh_failures_total", provider=provider, reason=reason)

    def grace_retries(self, provider: str = PROVIDER) -> float:
        return self.metric("refresherd_grace_retries_total", provider=provider)

    def another_refresher(self, owner: str) -> Refresher:
        """A second worker on the same database (as another daemon would be)."""
        other = build_refresher(
            store=self.store,
            providers=self.providers,
            endpoints=self.endpoints,
            schedule=SCHEDULE,
            metrics=Metrics(),
            owner=owner,
            lease_duration=30.0,
            rng=random.Random(2),
        ).refresher
        self.extra_refreshers.append(other)
        return other


def provider_config(
    name: str,
    token_url: str,
    *,
    usage: str = "one_time",
    grace_period: float = 4.0,
    request_timeout: float = 5.0,
    scope: str | None = None,
) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        token_url=token_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token_usage=RefreshTokenUsage(usage),
        grace_period=grace_period,
        request_timeout=request_timeout,
        connect_timeout=2.0,
        scope=scope,
    )


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    usage: str = "one_time",
    grace_period: float = 4.0,
    idp_grace_period: float | None = None,
    reuse_returns_refresh_token: bool = True,
    request_timeout: float = 5.0,
    scope: str | None = None,
    token_url: str | None = None,
    extra_providers: dict[str, str] | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Harness]:
    """A served FakeIdP, a SqliteStore in tmp_path and a Refresher for provider ``p`` (owner-a)."""
    store = await SqliteStore.open(tmp_path / "tokens.db")
    idp = FakeIdP(
        clients={CLIENT_ID: CLIENT_SECRET},
        usage=usage,  # type: ignore[arg-type]
        grace_period=grace_period if idp_grace_period is None else idp_grace_period,
        access_token_lifetime=3600,
        reuse_returns_refresh_token=reuse_returns_refresh_token,
    )
    _MODULE_IDPS.append(idp)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            providers = {
                PROVIDER: provider_config(
                    PROVIDER,
                    token_url or idp.token_url,
                    usage=usage,
                    grace_period=grace_period,
                    request_timeout=request_timeout,
                    scope=scope,
                )
            }
            for name, url in (extra_providers or {}).items():
                providers[name] = provider_config(name, url, grace_period=grace_period)
            endpoints = {name: TokenEndpoint(p) for name, p in providers.items()}
            metrics = Metrics()
            parts = build_refresher(
                store=store,
                providers=providers,
                endpoints=endpoints,
                schedule=SCHEDULE,
                metrics=metrics,
                owner="owner-a",
                lease_duration=30.0,
                clock=clock,
                rng=random.Random(1),
                # No owner in this module holds a lock file: each counts as gone once it
                # stops holding the lease, as a crashed process would.
            )
            h = Harness(store, idp, metrics, providers, endpoints, parts)
            try:
                yield h
            finally:
                for endpoint in endpoints.values():
                    await endpoint.aclose()
                tg.cancel_scope.cancel()
    finally:
        await store.close()


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    with anyio.fail_after(DEADLINE):
        while not predicate():
            await anyio.sleep(0.02)


def assert_unchanged(before: TokenSet, after: TokenSet, *, error_noted: bool = False) -> None:
    """Tokens, state, plan and failure count as before; with ``error_noted`` the refused send's
    error may be on record (a provider problem is noted, never held against the token set)."""
    assert after.refresh_token == before.refresh_token
    assert after.access_token == before.access_token
    assert after.version == before.version
    assert after.state is before.state
    assert after.next_refresh_at == before.next_refresh_at
    assert after.expires_at == before.expires_at
    assert after.failures == before.failures
    assert after.invalid_reason == before.invalid_reason
    assert after.lease_owner is None
    if error_noted:
        assert after.last_error is not None and after.last_error.startswith("invalid_client")
        assert after.attempt is None  # a 401 settles it: nothing was consumed
    else:
        assert after.last_error == before.last_error
        assert after.attempt == before.attempt


def assert_no_secret_in(result: RefreshResult, *values: str) -> None:
    for text in (repr(result), str(result.detail), str(result.reason)):
        for value in (CLIENT_SECRET, ROTATED_SECRET, *values):
            assert value not in text


# --------------------------------------------------------------------------- success


@pytest.mark.anyio
async def test_success_persists_the_rotated_token_and_reports_once(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path) as h:
        old = await h.add("ts-1")
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()

        assert result.outcome == "refreshed" and result.ok and not result.coalesced
        assert result.detail == "sends=1"
        stored = await h.get("ts-1")
        assert result.token_set == stored
        new = stored.refresh_token.reveal()
        assert new != old
        assert h.idp.ledger.is_live(new)
        assert stored.access_token is not None
        assert stored.access_token.reveal() in h.idp.ledger.issued_tokens()
        assert stored.version == 2
        assert stored.state is State.ACTIVE
        assert stored.attempt is None  # journal cleared
        assert stored.lease_owner is None and stored.lease_until is None
        assert stored.last_error is None and stored.failures == 0
        assert stored.expires_at is not None
        assert before + 3600 <= stored.expires_at <= after + 3600
        # Planned ahead of expiry, not in a tight loop.
        assert after + 600 < stored.next_refresh_at < stored.expires_at - 60
        assert stored.last_refresh_at is not None and before <= stored.last_refresh_at <= after

        assert h.successes() == 1
        assert h.metric("refresherd_refresh_failures_total", provider=PROVIDER, reason="x") == 0
        assert h.metric("refresherd_refresh_duration_seconds_count", provider=PROVIDER) == 1
        assert h.metric("refresherd_refreshes_in_flight") == 0
        assert h.idp.ledger.requests == 1 and h.idp.ledger.concurrent_uses == 0

        line = logs.outcome_line("ts-1")
        assert line["level"] == "info"
        assert line["outcome"] == "refreshed"
        assert line["provider"] == PROVIDER
        assert logs.at_level("warning") == [] and logs.at_level("error") == []
        assert_no_secret_in(result, old, new)


@pytest.mark.anyio
async def test_reuse_idp_omitting_refresh_token_keeps_the_old_one(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, usage="reuse", reuse_returns_refresh_token=False) as h:
        old = await h.add("ts-1")
        first = await h.get("ts-1")
        result = await h.refresher.refresh("ts-1")

        assert result.outcome == "refreshed"
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() == old
        assert stored.access_token != first.access_token
        assert stored.version == 2
        assert h.idp.ledger.is_live(old)
        assert h.successes() == 1
        assert logs.outcome_line("ts-1")["outcome"] == "refreshed"


@pytest.mark.anyio
async def test_unknown_token_set_is_not_found(tmp_path: Path, logs: LogCapture) -> None:
    async with harness(tmp_path) as h:
        result = await h.refresher.refresh("nope")
        assert result.outcome == "not_found"
        assert h.idp.ledger.requests == 0


@pytest.mark.anyio
async def test_token_set_of_a_provider_no_longer_configured_is_kept_and_deferred(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path) as h:
        old = await h.add("ts-1", provider="removed-from-config")
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        assert (result.outcome, result.reason) == ("unknown_provider", "unknown_provider")
        stored = await h.get("ts-1")
        assert stored.state is State.ACTIVE and stored.refresh_token.reveal() == old
        assert stored.next_refresh_at >= before + SCHEDULE.backoff_max
        assert stored.lease_owner is None
        assert h.idp.ledger.requests == 0
        assert h.failures("unknown_provider", provider="removed-from-config") == 1
        assert logs.outcome_line("ts-1")["level"] == "warning"


# --------------------------------------------------------------------------- not sent


@pytest.mark.anyio
async def test_connect_error_backs_off_with_the_same_token(
    tmp_path: Path, logs: LogCapture
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/connect/token"
    async with harness(tmp_path, token_url=url) as h:
        old = await h.add("ts-1")
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()

        assert result.outcome == "failed"
        assert result.reason == "connect_error"
        stored = await h.get("ts-1")
        assert stored.state is State.FAILING
        assert stored.refresh_token.reveal() == old
        assert stored.version == 1
        assert stored.failures == 1
        assert stored.invalid_reason is None
        assert stored.last_error is not None and stored.last_error.startswith("connect_error")
        # backoff_delay(1): initial * [0.5, 1.0)
        initial = SCHEDULE.backoff_initial
        assert before + initial * 0.5 <= stored.next_refresh_at <= after + initial
        assert stored.attempt is None  # the IdP never saw it: nothing to recover
        assert stored.lease_owner is None
        assert h.idp.ledger.is_live(old)  # never sent

        assert h.failures("connect_error") == 1
        assert h.successes() == 0
        line = logs.outcome_line("ts-1")
        assert line["level"] == "warning"
        assert (line["outcome"], line["reason"]) == ("failed", "connect_error")

        # The next failure backs off further (exponential), still the same token.
        before = time.time()
        again = await h.refresher.refresh("ts-1")
        assert again.reason == "connect_error"
        stored = await h.get("ts-1")
        assert stored.failures == 2
        assert stored.next_refresh_at >= before + 2 * initial * 0.5
        assert stored.refresh_token.reveal() == old
        assert h.failures("connect_error") == 2


# --------------------------------------------------------------------------- ambiguous


AMBIGUOUS_FAULTS = [
    pytest.param(FaultKind.DROP_AFTER_ROTATE, {}, "network_error", id="drop"),
    pytest.param(FaultKind.ERROR_AFTER_ROTATE, {}, "server_error", id="error500"),
    pytest.param(FaultKind.GARBAGE_AFTER_ROTATE, {}, "malformed_response", id="garbage"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "params", "reason"), AMBIGUOUS_FAULTS)
async def test_ambiguous_one_time_retries_inside_grace_and_succeeds(
    tmp_path: Path, logs: LogCapture, kind: FaultKind, params: dict[str, Any], reason: str
) -> None:
    async with harness(tmp_path, grace_period=4.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(kind, **params)
        result = await h.refresher.refresh("ts-1")

        assert result.outcome == "refreshed", result
        assert result.detail == "sends=2"
        ledger = h.idp.ledger
        assert ledger.requests == 2
        assert ledger.refreshes == 2  # the lost answer, then the grace reuse
        assert ledger.reuses_in_grace == 1
        assert ledger.reuses_outside_grace == 0
        stored = await h.get("ts-1")
        new = stored.refresh_token.reveal()
        assert new != old and ledger.is_live(new)
        assert ledger.family_has_live_token(ledger.family_of(new))
        assert stored.version == 2 and stored.state is State.ACTIVE
        assert stored.attempt is None and stored.failures == 0

        assert h.grace_retries() == 1
        assert h.failures(reason) == 1
        assert h.successes() == 1
        [retry] = logs.events("refresh retry", token_set="ts-1")
        assert retry["reason"] == reason and retry["grace"] is True and retry["attempt"] == 1
        assert logs.outcome_line("ts-1")["outcome"] == "refreshed"
        assert logs.at_level("error") == []


@pytest.mark.anyio
async def test_ambiguous_twice_then_the_third_send_succeeds_inside_grace(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, grace_period=4.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.DROP_AFTER_ROTATE, times=2)
        result = await h.refresher.refresh("ts-1")
        assert result.outcome == "refreshed" and result.detail == "sends=3"
        assert h.idp.ledger.reuses_in_grace == 2 and h.idp.ledger.reuses_outside_grace == 0
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() != old
        assert h.idp.ledger.is_live(stored.refresh_token.reveal())
        assert h.grace_retries() == 2
        assert [line["attempt"] for line in logs.events("refresh retry")] == [1, 2]


@pytest.mark.anyio
async def test_a_stalled_send_is_hedged_not_waited_out(tmp_path: Path, logs: LogCapture) -> None:
    """The IdP rotates, then holds the answer: a second send goes out beside the first (which
    is kept open) after about a second, not after most of the window."""
    async with harness(tmp_path, grace_period=5.0, request_timeout=10.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.SLOW, delay=6.0, process_first=True)
        began = time.monotonic()
        result = await h.refresher.refresh("ts-1")
        took = time.monotonic() - began

        assert result.outcome == "refreshed" and result.detail == "sends=2", result
        assert took < 4.0  # the hedge's answer, not the stalled one (6 s)
        ledger = h.idp.ledger
        assert ledger.requests == 2 and ledger.reuses_in_grace == 1
        assert ledger.reuses_outside_grace == 0
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() != old and ledger.is_live(
            stored.refresh_token.reveal()
        )
        assert stored.attempt is None
        [hedge] = logs.events("refresh hedge", token_set="ts-1")
        assert hedge["attempt"] == 2 and hedge["in_flight"] == 1
        assert h.grace_retries() == 1
        assert h.failures("timeout") == 0


def _sends_running() -> list[asyncio.Task[Any]]:
    """This loop's tasks that are a series' send (Series._answer) still running."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "Series._answer"
    ]


@pytest.mark.anyio
async def test_a_refresh_cancelled_with_sends_out_ends_every_send(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The sends of a grace window run in tasks the series owns, not its caller's scope: a
    refresh cancelled (shutdown past its deadline) while the first send and its hedge are both
    stalled must end both before it returns, and leave the journal to finish the series inside
    the window."""
    async with harness(tmp_path, grace_period=6.0, request_timeout=10.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.SLOW, delay=8.0, process_first=True, times=2)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(h.refresher.refresh, "ts-1")
                while h.idp.ledger.requests < 2:  # the stalled send, then its hedge
                    await anyio.sleep(0.02)
                assert len(_sends_running()) == 2
                tg.cancel_scope.cancel()
        assert _sends_running() == []
        stored = await h.get("ts-1")
        assert stored.attempt is not None and stored.attempt.sends == 2
        assert stored.refresh_token.reveal() == old  # no grant came back: none to store

        # The series goes on inside the window (the IdP rotated on the first send).
        result = await h.refresher.refresh("ts-1")
        assert result.outcome == "refreshed", result
        ledger = h.idp.ledger
        assert ledger.reuses_outside_grace == 0 and ledger.reuses_in_grace == 2
        assert ledger.is_live((await h.get("ts-1")).refresh_token.reveal())


@pytest.mark.anyio
async def test_fast_failures_are_spaced_over_the_window(tmp_path: Path, logs: LogCapture) -> None:
    """Seven 500s in a row after rotating, then an answer: the sends are spread over the
    window (a count of five sends, fired back to back, used to give up after milliseconds)."""
    async with harness(tmp_path, grace_period=5.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.ERROR_AFTER_ROTATE, times=7)
        result = await h.refresher.refresh("ts-1")

        assert result.outcome == "refreshed" and result.detail == "sends=8", result
        ledger = h.idp.ledger
        assert ledger.requests == 8 and ledger.reuses_outside_grace == 0
        sent = [e["t"] for e in ledger.events if str(e["kind"]).startswith("refreshed")]
        assert len(sent) == 8
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        assert min(gaps) >= 0.07  # never back to back
        assert sent[-1] - sent[0] >= 1.5  # spread over the window, not spent in a burst
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() != old and stored.attempt is None
        assert len(logs.events("refresh retry", token_set="ts-1")) == 7


@pytest.mark.anyio
async def test_a_window_spent_on_failures_is_named_missed(tmp_path: Path, logs: LogCapture) -> None:
    """Every send lost after the IdP rotated: when the window closes, the set is invalidated
    as refresherd's loss (grace_window_missed), not as the customer's revocation, and the
    token is never sent again."""
    async with harness(tmp_path, grace_period=2.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.random(1.0, [FaultKind.DROP_AFTER_ROTATE], seed=1)
        began = time.time()
        result = await h.refresher.refresh("ts-1")
        assert (result.outcome, result.reason) == ("invalidated", "grace_window_missed"), result
        ledger = h.idp.ledger
        sends = ledger.requests
        assert 3 <= sends <= policy.MAX_UNSETTLED_SENDS
        assert ledger.reuses_outside_grace == 0
        stored = await h.get("ts-1")
        assert stored.state is State.INVALIDATED
        assert stored.invalid_reason == "grace_window_missed"
        assert stored.refresh_token.reveal() == old  # kept, as the record of what was lost
        assert stored.last_error is not None and f"after {sends} send(s)" in stored.last_error
        assert stored.attempt is None
        [missed] = logs.events("grace window missed", token_set="ts-1")
        assert missed["sends"] == sends and missed["level"] == "error"
        assert abs(_rfc3339_seconds(str(missed["series_started_at"])) - began) <= 1.0
        assert (
            h.metric(
                "refresherd_invalidations_total", provider=PROVIDER, reason="grace_window_missed"
            )
            == 1
        )
        # The hook event says so too, with the series (queued in the database).
        with sqlite3.connect(tmp_path / "tokens.db") as conn:
            payloads = [
                json.loads(row[0])
                for row in conn.execute(
                    "SELECT payload FROM hook_events WHERE event_type = 'token_set.invalidated'"
                )
            ]
        [event] = payloads
        assert event["reason"] == "grace_window_missed" and event["sends"] == sends
        assert event["series_started_at"] == missed["series_started_at"]
        # Never sent again, whoever asks.
        h.idp.faults.clear()
        again = await h.refresher.refresh("ts-1")
        assert again.outcome == "invalidated" and ledger.requests == sends


def _rfc3339_seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "params", "reason"), AMBIGUOUS_FAULTS)
async def test_ambiguous_reuse_token_backs_off_without_a_grace_retry(
    tmp_path: Path, logs: LogCapture, kind: FaultKind, params: dict[str, Any], reason: str
) -> None:
    # A grace period in the provider config means nothing for re-use tokens.
    async with harness(tmp_path, usage="reuse", grace_period=4.0, request_timeout=1.5) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(kind, **params)
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()

        assert result.outcome == "failed"
        assert result.reason == reason
        assert h.idp.ledger.requests == 1
        assert h.idp.ledger.reuses_in_grace == 0
        stored = await h.get("ts-1")
        assert stored.state is State.FAILING
        assert stored.refresh_token.reveal() == old
        assert h.idp.ledger.is_live(old)
        assert stored.version == 1 and stored.failures == 1
        assert stored.last_error is not None and stored.last_error.startswith(reason)
        initial = SCHEDULE.backoff_initial
        assert before + initial * 0.5 <= stored.next_refresh_at <= after + initial
        # Nothing on record: a re-use token's sends are not journaled (a send cannot spend
        # it, so crash recovery and other processes have nothing to learn from one).
        assert stored.attempt is None
        assert stored.lease_owner is None

        assert h.grace_retries() == 0
        assert h.failures(reason) == 1
        assert logs.events("refresh retry") == []
        line = logs.outcome_line("ts-1")
        assert (line["level"], line["outcome"], line["reason"]) == ("warning", "failed", reason)


@pytest.mark.anyio
@pytest.mark.parametrize(("usage", "journaled"), [("one_time", True), ("reuse", False)])
async def test_only_a_one_time_tokens_send_is_journaled(
    tmp_path: Path, usage: str, journaled: bool
) -> None:
    """A one-time token's send is on disk before it leaves (crash recovery and the other
    processes keep its grace window from it); a re-use token cannot be spent by a send, so
    its refresh is a claim and a save, with no journal write between."""
    async with harness(tmp_path, usage=usage) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.SLOW, delay=0.3, process_first=False)
        results: list[RefreshResult] = []

        async def refresh() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        writes = h.store.writes
        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            await wait_for(lambda: h.idp.ledger.requests == 1, "the request")
            during = await h.get("ts-1")
            assert during.lease_owner == "owner-a"
            if journaled:
                assert during.attempt is not None
                assert (during.attempt.sends, during.attempt.owner) == (1, "owner-a")
            else:
                assert during.attempt is None

        [result] = results
        assert result.outcome == "refreshed" and result.detail == "sends=1"
        # The claim, the journal (one-time only) and the grant.
        assert h.store.writes - writes == (3 if journaled else 2)
        stored = await h.get("ts-1")
        assert stored.attempt is None and stored.version == 2
        assert h.idp.ledger.is_live(stored.refresh_token.reveal())
        if usage == "reuse":
            assert stored.refresh_token.reveal() == old  # the same token came back


@pytest.mark.anyio
async def test_ambiguous_then_next_refresh_of_a_reuse_token_succeeds(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, usage="reuse") as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        assert (await h.refresher.refresh("ts-1")).outcome == "failed"
        result = await h.refresher.refresh("ts-1")
        assert result.outcome == "refreshed"
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() == old
        assert stored.state is State.ACTIVE and stored.failures == 0 and stored.attempt is None


# --------------------------------------------------------------------------- rate limited


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_beyond_the_window_waits_as_told_bounded(
    tmp_path: Path, logs: LogCapture, status: int
) -> None:
    async with harness(tmp_path, grace_period=4.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.RETRY_AFTER, status=status, retry_after=300)
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()

        assert result.outcome == "failed"
        assert result.reason == "rate_limited"
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() == old and h.idp.ledger.is_live(old)
        assert stored.version == 1
        assert stored.state is State.FAILING
        # Retry-After 300 s, bounded by retry_after_max.
        bound = SCHEDULE.retry_after_max
        assert before + bound <= stored.next_refresh_at <= after + bound
        assert stored.attempt is None  # not processed: nothing to recover
        assert h.idp.ledger.requests == 1 and h.idp.ledger.refreshes == 0
        assert h.failures("rate_limited") == 1
        assert h.grace_retries() == 0
        line = logs.outcome_line("ts-1")
        assert (line["level"], line["reason"]) == ("warning", "rate_limited")


@pytest.mark.anyio
async def test_retry_after_on_a_reuse_token_sets_the_next_time(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, usage="reuse") as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.RETRY_AFTER, status=503, retry_after=3)
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()
        assert (result.outcome, result.reason) == ("failed", "rate_limited")
        stored = await h.get("ts-1")
        assert before + 3 <= stored.next_refresh_at <= after + 3
        assert stored.refresh_token.reveal() == old and stored.state is State.FAILING


@pytest.mark.anyio
async def test_a_short_retry_after_with_nothing_consumed_reschedules_as_told(
    tmp_path: Path, logs: LogCapture
) -> None:
    """A 429 on the first send consumed nothing: no window runs, so the set is rescheduled
    as told (not resent inside this refresh: a short Retry-After repeated would make that a
    loop), the journal is cleared, and the next refresh is an ordinary first send."""
    async with harness(tmp_path, grace_period=5.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.RETRY_AFTER, status=429, retry_after=1)
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        assert (result.outcome, result.reason) == ("failed", "rate_limited"), result
        stored = await h.get("ts-1")
        assert stored.refresh_token.reveal() == old and stored.state is State.FAILING
        assert stored.attempt is None  # settled: nothing for a window to recover
        assert before + 1.0 <= stored.next_refresh_at <= time.time() + SCHEDULE.min_interval + 1
        assert h.grace_retries() == 0 and h.failures("rate_limited") == 1

        again = await h.refresher.refresh("ts-1")
        assert again.outcome == "refreshed" and again.detail == "sends=1"
        assert h.idp.ledger.requests == 2 and h.idp.ledger.reuses_in_grace == 0


# --------------------------------------------------------------------------- invalid_grant


@pytest.mark.anyio
async def test_invalid_grant_invalidates_once_and_stops(tmp_path: Path, logs: LogCapture) -> None:
    async with harness(tmp_path) as h:
        old = await h.add("ts-1")
        h.idp.revoke(old)
        result = await h.refresher.refresh("ts-1")

        assert result.outcome == "invalidated"
        assert result.reason == "invalid_grant"
        stored = await h.get("ts-1")
        assert stored.state is State.INVALIDATED
        assert stored.invalid_reason == "invalid_grant"
        assert stored.last_error is not None and "invalid_grant" in stored.last_error
        assert stored.refresh_token.reveal() == old  # kept for the record, never sent again
        assert stored.attempt is None and stored.lease_owner is None
        assert (
            h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="invalid_grant")
            == 1
        )
        assert h.failures("invalid_grant") == 1
        [error] = logs.at_level("error")
        assert error["event"] == "refresh" and error["outcome"] == "invalidated"
        assert error["token_set"] == "ts-1" and error["reason"] == "invalid_grant"
        assert logs.outcome_line("ts-1") == error

        # Later refreshes do not contact the IdP, count nothing and log nothing new.
        requests = h.idp.ledger.requests
        later = await h.refresher.refresh("ts-1")
        assert later.outcome == "invalidated"
        assert h.idp.ledger.requests == requests
        assert (
            h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="invalid_grant")
            == 1
        )
        assert len(logs.at_level("error")) == 1
        assert (await h.get("ts-1")).state is State.INVALIDATED


@pytest.mark.anyio
async def test_invalid_grant_after_a_sibling_stored_a_newer_grant_adopts_it(
    tmp_path: Path, logs: LogCapture
) -> None:
    # No grace at the IdP: once the sibling used the token, ours is refused outright.
    async with harness(tmp_path, grace_period=0.0) as h:
        # An IdP that punishes the late reuse with no more than the refusal: this test is about
        # adopting the sibling's grant (with "family" the IdP would revoke it too).
        h.idp.reuse_revokes = "none"
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.SLOW, delay=1.0, process_first=False)
        results: list[RefreshResult] = []

        async def ours() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ours)
            await wait_for(lambda: h.idp.ledger.requests == 1, "our request at the IdP")
            # The sibling (another worker) refreshes the same token and stores its grant.
            sibling = TokenEndpoint(h.providers[PROVIDER])
            try:
                grant = await sibling.refresh(Secret(old), timeout=5.0)
            finally:
                await sibling.aclose()
            assert grant.refresh_token is not None
            now = time.time()
            saved = await h.store.save_grant(
                "ts-1",
                owner="owner-sibling",
                expected_version=1,
                sent_refresh_token=Secret(old),
                access_token=grant.access_token,
                refresh_token=grant.refresh_token,
                token_type=grant.token_type,
                scope=grant.scope,
                expires_at=now + 3600,
                next_refresh_at=now + 2880,
                now=now,
            )
            assert saved is not None and saved.version == 2

        [result] = results
        assert result.outcome == "adopted"
        assert result.reason == "sibling_won"
        assert h.idp.ledger.invalid_grants == 1  # ours was refused...
        stored = await h.get("ts-1")
        assert stored.state is State.ACTIVE  # ...and yet nothing was invalidated
        assert stored.refresh_token == grant.refresh_token
        assert h.idp.ledger.is_live(grant.refresh_token.reveal())
        assert stored.version == 2 and stored.invalid_reason is None
        assert stored.lease_owner is None
        assert result.token_set is not None
        assert result.token_set.refresh_token == stored.refresh_token
        assert result.token_set.version == stored.version
        assert h.metric("refresherd_refresh_adopted_total", provider=PROVIDER) == 1
        assert (
            h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="invalid_grant")
            == 0
        )
        line = logs.outcome_line("ts-1")
        assert (line["level"], line["outcome"]) == ("info", "adopted")
        assert logs.at_level("error") == []


@pytest.mark.anyio
async def test_invalid_grant_inside_the_window_of_an_unresolved_attempt_retries_once(
    tmp_path: Path, logs: LogCapture
) -> None:
    # The IdP honours no grace period although the provider config promises one: the rotated
    # token of the lost answer is gone, and the old one is refused. One retry, then give up
    # with a reason that says an unresolved attempt preceded it.
    async with harness(tmp_path, grace_period=4.0, idp_grace_period=0.0) as h:
        old = await h.add("ts-1")
        h.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        result = await h.refresher.refresh("ts-1")

        assert result.outcome == "invalidated"
        assert result.reason == "invalid_grant_after_unresolved_attempt"
        assert h.idp.ledger.requests == 3  # the lost answer, then invalid_grant twice
        assert h.idp.ledger.invalid_grants == 2
        stored = await h.get("ts-1")
        assert stored.state is State.INVALIDATED
        assert stored.invalid_reason == "invalid_grant_after_unresolved_attempt"
        assert stored.refresh_token.reveal() == old
        assert stored.attempt is None
        reason = "invalid_grant_after_unresolved_attempt"
        assert h.metric("refresherd_invalidations_total", provider=PROVIDER, reason=reason) == 1
        assert h.grace_retries() == 2
        assert [line["reason"] for line in logs.events("refresh retry")] == [
            "network_error",
            "invalid_grant",
        ]
        [error] = logs.at_level("error")
        assert error["event"] == "refresh" and error["reason"] == reason


# --------------------------------------------------------------------------- invalid_client


@pytest.mark.anyio
async def test_invalid_client_opens_the_provider_circuit_and_a_probe_closes_it(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path) as h:
        await h.add("ts-1")
        await h.add("ts-2")
        before_1, before_2 = await h.get("ts-1"), await h.get("ts-2")
        h.idp.set_client_secret(CLIENT_ID, ROTATED_SECRET)

        result = await h.refresher.refresh("ts-1")
        assert result.outcome == "circuit_open"
        assert result.reason == "invalid_client"
        assert_unchanged(before_1, await h.get("ts-1"), error_noted=True)
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 1
        assert h.failures("invalid_client") == 1
        assert h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="x") == 0
        assert h.idp.ledger.invalid_clients == 1
        [opened] = logs.events(
            "provider circuit open: the IdP refused our client credentials", provider=PROVIDER
        )
        assert opened["level"] == "error" and opened["reason"] == "invalid_client"
        assert logs.outcome_line("ts-1")["outcome"] == "circuit_open"

        # While open, no refresh of that provider is sent.
        requests = h.idp.ledger.requests
        blocked = await h.refresher.refresh("ts-2")
        assert blocked.outcome == "circuit_open"
        assert h.idp.ledger.requests == requests
        assert_unchanged(before_2, await h.get("ts-2"))  # not even sent

        # The first probe after the pause meets the same wrong secret: open again, longer.
        outcomes: list[str] = []

        async def probe_until_sent() -> RefreshResult:
            while True:
                sent_before = h.idp.ledger.requests
                r = await h.refresher.refresh("ts-2")
                outcomes.append(r.outcome)
                if h.idp.ledger.requests > sent_before:
                    assert h.idp.ledger.requests == sent_before + 1  # one probe, not more
                    return r
                assert r.outcome == "circuit_open"
                await anyio.sleep(0.05)

        with anyio.fail_after(DEADLINE):
            reopened = await probe_until_sent()
        assert reopened.outcome == "circuit_open"
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 1
        assert_unchanged(before_2, await h.get("ts-2"), error_noted=True)

        # The operator fixes the secret; the next probe succeeds and closes the circuit.
        h.idp.set_client_secret(CLIENT_ID, CLIENT_SECRET)
        with anyio.fail_after(DEADLINE):
            probe = await probe_until_sent()
        assert probe.outcome == "refreshed"
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 0
        assert logs.events("provider circuit closed", provider=PROVIDER)
        assert (await h.refresher.refresh("ts-1")).outcome == "refreshed"
        assert h.successes() == 2
        assert (await h.get("ts-1")).state is State.ACTIVE
        assert h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="x") == 0


@pytest.mark.anyio
async def test_a_probe_cancelled_midway_does_not_keep_the_provider_paused(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path) as h:
        await h.add("ts-1")
        await h.add("ts-2")
        h.idp.set_client_secret(CLIENT_ID, ROTATED_SECRET)
        assert (await h.refresher.refresh("ts-1")).outcome == "circuit_open"
        h.idp.set_client_secret(CLIENT_ID, CLIENT_SECRET)
        h.idp.faults.add(FaultKind.SLOW, delay=2.0)

        # Once the pause is over, ts-2's refresh is the probe; its caller goes away while the
        # request is out (cancellation: a shutdown, a token-API client that hung up).
        sent_before = h.idp.ledger.requests
        with anyio.fail_after(DEADLINE):
            while True:
                done: list[RefreshResult] = []

                async def attempt(into: list[RefreshResult]) -> None:
                    into.append(await h.refresher.refresh("ts-2"))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(attempt, done)
                    while not done and h.idp.ledger.requests == sent_before:
                        await anyio.sleep(0.01)
                    if not done:
                        tg.cancel_scope.cancel()
                if not done:
                    break
                assert done[0].outcome == "circuit_open"
                await anyio.sleep(0.05)

        # The provider must not stay paused for good: a later refresh probes again.
        with anyio.fail_after(DEADLINE):
            while (result := await h.refresher.refresh("ts-1")).outcome == "circuit_open":
                await anyio.sleep(0.05)
        assert result.outcome == "refreshed"
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 0


@pytest.mark.anyio
async def test_invalid_client_leaves_no_unresolved_attempt_behind(
    tmp_path: Path, logs: LogCapture
) -> None:
    # invalid_client is a definite "not processed": the send must not count as the first of a
    # grace series. Otherwise a later invalid_grant (the customer revoked us meanwhile) looks
    # like the aftermath of a lost answer: a useless resend and the wrong invalidation reason.
    async with harness(tmp_path, grace_period=4.0) as h:
        old = await h.add("ts-1")
        before = await h.get("ts-1")
        h.idp.set_client_secret(CLIENT_ID, ROTATED_SECRET)
        assert (await h.refresher.refresh("ts-1")).outcome == "circuit_open"
        stored = await h.get("ts-1")
        assert stored.attempt is None
        assert stored.state is before.state and stored.version == before.version
        assert stored.next_refresh_at == before.next_refresh_at
        assert stored.failures == before.failures
        assert stored.refresh_token.reveal() == old and stored.access_token == before.access_token
        assert stored.last_error is not None and stored.last_error.startswith("invalid_client")

        h.idp.set_client_secret(CLIENT_ID, CLIENT_SECRET)
        h.idp.revoke(old)
        sent = h.idp.ledger.requests
        with anyio.fail_after(DEADLINE):
            while (result := await h.refresher.refresh("ts-1")).outcome == "circuit_open":
                await anyio.sleep(0.05)
        assert (result.outcome, result.reason) == ("invalidated", "invalid_grant")
        assert h.idp.ledger.requests == sent + 1


# --------------------------------------------------------------------------- other 4xx


@pytest.mark.anyio
async def test_other_oauth_error_fails_with_long_backoff(tmp_path: Path, logs: LogCapture) -> None:
    # Asking for a scope beyond the grant: invalid_scope, a configuration problem.
    async with harness(tmp_path, scope="admin") as h:
        old = await h.add("ts-1")
        before = time.time()
        result = await h.refresher.refresh("ts-1")
        after = time.time()

        assert result.outcome == "failed"
        assert result.reason == "oauth_error"
        assert result.detail is not None and "invalid_scope" in result.detail
        stored = await h.get("ts-1")
        assert stored.state is State.FAILING
        assert stored.refresh_token.reveal() == old and h.idp.ledger.is_live(old)
        assert stored.version == 1 and stored.invalid_reason is None
        assert stored.last_error is not None and "invalid_scope" in stored.last_error
        long = SCHEDULE.backoff_max
        assert before + long * 0.5 <= stored.next_refresh_at <= after + long
        assert stored.attempt is None
        assert h.failures("oauth_error") == 1
        line = logs.outcome_line("ts-1")
        assert (line["level"], line["reason"]) == ("warning", "oauth_error")


# --------------------------------------------------------------------------- single-flight, lease


@pytest.mark.anyio
async def test_single_flight_fifty_callers_one_request(tmp_path: Path, logs: LogCapture) -> None:
    async with harness(tmp_path, grace_period=0.0) as h:
        await h.add("ts-1")
        h.idp.faults.add(FaultKind.SLOW, delay=0.5)
        results: list[RefreshResult] = []

        async def call() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)

        assert len(results) == 50
        assert {r.outcome for r in results} == {"refreshed"}
        assert sum(not r.coalesced for r in results) == 1
        assert {r.token_set.version for r in results if r.token_set} == {2}
        assert h.idp.ledger.requests == 1
        assert h.idp.ledger.concurrent_uses == 0
        assert h.metric("refresherd_singleflight_coalesced_total") == 49
        assert h.successes() == 1
        assert h.metric("refresherd_refreshes_in_flight") == 0
        logs.outcome_line("ts-1")  # one line for one refresh, not fifty


@pytest.mark.anyio
async def test_second_worker_is_refused_while_the_first_holds_the_lease(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, grace_period=0.0) as h:
        await h.add("ts-1")
        other = h.another_refresher("owner-b")
        h.idp.faults.add(FaultKind.SLOW, delay=1.5)
        results: list[RefreshResult] = []

        async def first() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_for(lambda: h.idp.ledger.requests == 1, "the first worker's request")
            held = await h.get("ts-1")
            assert held.lease_owner == "owner-a"
            assert held.attempt is not None and held.attempt.owner == "owner-a"
            refused = await other.refresh("ts-1")
            assert refused.outcome == "leased"
            assert refused.detail == "leased by owner-a"
            assert h.idp.ledger.requests == 1  # the second worker sent nothing

        assert [r.outcome for r in results] == ["refreshed"]
        assert h.idp.ledger.concurrent_uses == 0
        # Once released, the second worker refreshes the newer version.
        later = await other.refresh("ts-1")
        assert later.outcome == "refreshed"
        assert later.token_set is not None and later.token_set.version == 3
        assert h.idp.ledger.is_live(later.token_set.refresh_token.reveal())


# --------------------------------------------------------------------------- crash recovery


@pytest.mark.anyio
async def test_journaled_attempt_of_a_dead_owner_is_continued_inside_grace(
    tmp_path: Path, logs: LogCapture
) -> None:
    async with harness(tmp_path, grace_period=5.0) as h:
        old = await h.add("ts-1")
        # A predecessor claimed the row, journaled the send, sent it, and died before the answer
        # reached the disk: the IdP rotated the token, we never saw the new one.
        dead = "owner-dead"
        t0 = time.time()
        claimed = await h.store.claim("ts-1", owner=dead, now=t0, lease_until=t0 + 60)
        assert isinstance(claimed, TokenSet)
        journal = await h.store.begin_attempt(
            "ts-1", owner=dead, version=1, now=t0, keep_since=math.inf
        )
        assert journal is not None and journal.sends == 1
        h.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        lost = TokenEndpoint(h.providers[PROVIDER])
        try:
            with pytest.raises(Ambiguous):
                await lost.refresh(Secret(old), timeout=5.0)
        finally:
            await lost.aclose()
        assert h.idp.ledger.refreshes == 1  # consumed at the IdP
        # Its owner is found dead (ownership.is_alive); its leases are dropped.
        assert await h.store.clear_leases_of([dead]) == 1

        # We continue the series. Slow the IdP a little (less than a hedge waits) to look at
        # the journal mid-flight.
        h.idp.faults.add(FaultKind.SLOW, delay=0.3, process_first=False)
        results: list[RefreshResult] = []

        async def recover() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(recover)
            await wait_for(lambda: h.idp.ledger.requests == 2, "the recovery request")
            during = await h.get("ts-1")
            assert during.attempt is not None
            assert during.attempt.started_at == t0  # the window counts from the first send
            assert during.attempt.sends == 2
            assert during.attempt.owner == "owner-a"
            assert during.lease_owner == "owner-a"

        [result] = results
        assert result.outcome == "refreshed"
        assert result.detail == "sends=2"
        assert h.idp.ledger.reuses_in_grace == 1
        assert h.idp.ledger.reuses_outside_grace == 0
        stored = await h.get("ts-1")
        assert h.idp.ledger.is_live(stored.refresh_token.reveal())
        assert stored.refresh_token.reveal() != old
        assert stored.attempt is None and stored.version == 2


@pytest.mark.anyio
async def test_a_settled_journal_outside_the_grace_window_starts_a_new_series(
    tmp_path: Path, logs: LogCapture
) -> None:
    """An old series whose every send was answered "not processed": the token was never
    consumed, so a new series starts (with a fresh window)."""
    async with harness(tmp_path, grace_period=5.0) as h:
        await h.add("ts-1")
        t0 = time.time() - 3600
        assert isinstance(
            await h.store.claim("ts-1", owner="owner-dead", now=t0, lease_until=t0 + 60),
            TokenSet,
        )
        await h.store.begin_attempt("ts-1", owner="owner-dead", version=1, now=t0, keep_since=t0)
        await h.store.settle_send("ts-1", version=1, started_at=t0)
        h.idp.faults.add(FaultKind.SLOW, delay=0.3, process_first=False)
        results: list[RefreshResult] = []

        async def go() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)  # the dead owner's lease expired long ago: claimable
            await wait_for(lambda: h.idp.ledger.requests == 1, "the request")
            during = await h.get("ts-1")
            assert during.attempt is not None
            assert during.attempt.started_at > t0 + 3000 and during.attempt.sends == 1
        assert results[0].outcome == "refreshed" and results[0].detail == "sends=1"


@pytest.mark.anyio
async def test_an_unresolved_journal_outside_the_grace_window_is_a_missed_window(
    tmp_path: Path, logs: LogCapture
) -> None:
    """A series with a send the IdP may have processed, whose window closed while no daemon
    ran: sending the token again would be a reuse outside grace (the IdP revokes the family,
    some IdPs every token of the user). Nothing is sent; the set is named a missed window
    (it used to start a fresh series and be recorded as a plain invalid_grant)."""
    async with harness(tmp_path, grace_period=5.0) as h:
        await h.add("ts-1")
        t0 = time.time() - 60
        assert isinstance(
            await h.store.claim("ts-1", owner="owner-dead", now=t0, lease_until=t0 + 30),
            TokenSet,
        )
        await h.store.begin_attempt("ts-1", owner="owner-dead", version=1, now=t0, keep_since=t0)
        await h.store.begin_attempt(
            "ts-1", owner="owner-dead", version=1, now=t0 + 1, keep_since=t0
        )
        result = await h.refresher.refresh("ts-1")
        assert (result.outcome, result.reason) == ("invalidated", "grace_window_missed"), result
        assert h.idp.ledger.requests == 0
        stored = await h.get("ts-1")
        assert stored.state is State.INVALIDATED and stored.invalid_reason == "grace_window_missed"
        assert stored.last_error is not None and "after 2 send(s)" in stored.last_error
        [missed] = logs.events("grace window missed", token_set="ts-1")
        assert missed["sends"] == 2 and missed["unsettled"] == 2


@pytest.mark.anyio
async def test_a_store_error_on_an_outcome_path_pauses_storage(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The database refuses the write that records an outcome (here: a set whose provider left
    the configuration, recorded for a much later look): the refresh ends as storage_error and
    the storage pause starts, as for any refused write. It used to escape as an exception
    ("refresh crashed"), with no pause, no metric and the lease left behind."""
    async with harness(tmp_path) as h:
        await h.add("orphan", provider="gone")
        now = time.time()
        claimed = await h.store.claim("orphan", owner="owner-a", now=now, lease_until=now + 30)
        assert isinstance(claimed, TokenSet)  # as the scheduler hands it over
        lock = sqlite3.connect(tmp_path / "tokens.db", isolation_level=None, timeout=30)
        try:
            lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            result = await h.refresher.refresh("orphan", claimed=claimed)
        finally:
            lock.rollback()
            lock.close()
        assert (result.outcome, result.reason) == ("storage_error", "storage_error"), result
        assert h.parts.storage.paused
        assert h.metric("refresherd_storage_pauses_total", reason="locked") == 1
        assert logs.events("storage refuses writes: refreshes paused until a probe write succeeds")
        assert not logs.events("refresh crashed")


class SteppedClock:
    """The system's clocks, with the wall clock steppable (NTP, a VM restored)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.anyio
async def test_a_wall_clock_step_back_does_not_stretch_a_wait_past_the_window(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The wall clock steps back 8 s while the series waits to send again: the wait is planned
    on the monotonic clock, so the next send still goes out inside the window (found by
    review: planned on the wall clock, it went out 8 s late, a reuse outside grace)."""
    clock = SteppedClock()
    async with harness(tmp_path, grace_period=4.0, clock=clock) as h:
        await h.add("ts-1")
        h.idp.faults.add(FaultKind.ERROR_AFTER_ROTATE)  # rotated, then a 500
        results: list[RefreshResult] = []

        async def go() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await wait_for(lambda: h.failures("server_error") >= 1, "the 500")
            clock.offset = -8.0
        assert results[0].outcome == "refreshed", results
        assert h.idp.ledger.reuses_outside_grace == 0 and h.idp.ledger.reuses_in_grace == 1


@pytest.mark.anyio
async def test_a_hedge_waiting_for_a_pooled_connection_never_leaves_after_the_window(
    tmp_path: Path, logs: LogCapture
) -> None:
    """One connection to the IdP, held by a send the IdP rotated and then stalled (7 s, past
    the 4 s window): the hedge waits for that connection; it must give up (not sent) before
    the window closes rather than leave late as a reuse (found by review: it left at 7 s and
    the IdP revoked the family, the stored token with it)."""
    async with harness(tmp_path, grace_period=4.0, request_timeout=10.0) as h:
        one = dataclasses.replace(h.providers[PROVIDER], max_connections=1)
        endpoint = TokenEndpoint(one)
        h.parts.providers.reconfigure(
            providers={PROVIDER: one}, endpoints={PROVIDER: endpoint}, schedule=SCHEDULE
        )
        try:
            await h.add("ts-1")
            h.idp.faults.add(FaultKind.SLOW, delay=7.0, process_first=True)
            result = await h.refresher.refresh("ts-1")
            await anyio.sleep(0.5)
        finally:
            await endpoint.aclose()
        ledger = h.idp.ledger
        assert ledger.reuses_outside_grace == 0, ledger.snapshot()
        stored = await h.get("ts-1")
        assert result.outcome == "refreshed", result  # the stalled send's answer, kept open
        assert ledger.is_live(stored.refresh_token.reveal())


# --------------------------------------------------------------------------- isolation


@pytest.mark.anyio
async def test_a_fault_in_one_token_set_does_not_touch_others(
    tmp_path: Path, logs: LogCapture
) -> None:
    down = f"http://127.0.0.1:{closed_port()}/connect/token"
    async with harness(tmp_path, grace_period=4.0, extra_providers={"down": down}) as h:
        await h.add("slow")
        await h.add("good")
        revoked = await h.add("revoked")
        await h.add("unreachable", provider="down")
        h.idp.revoke(revoked)
        # The first request to arrive gets the fault: make sure it is the slow set's.
        h.idp.faults.add(FaultKind.SLOW, delay=4.0)
        results: dict[str, RefreshResult] = {}

        async def run(token_set_id: str) -> None:
            results[token_set_id] = await h.refresher.refresh(token_set_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "slow")
            await wait_for(lambda: h.idp.ledger.requests == 1, "the slow set's request")
            for token_set_id in ("good", "revoked", "unreachable"):
                tg.start_soon(run, token_set_id)

        assert results["slow"].outcome == "refreshed" and results["slow"].detail == "sends=2"
        assert results["good"].outcome == "refreshed" and results["good"].detail == "sends=1"
        assert results["revoked"].outcome == "invalidated"
        assert results["unreachable"].outcome == "failed"
        assert results["unreachable"].reason == "connect_error"

        for token_set_id in ("slow", "good"):
            stored = await h.get(token_set_id)
            assert stored.state is State.ACTIVE and stored.failures == 0
            assert stored.last_error is None and stored.attempt is None
            assert h.idp.ledger.is_live(stored.refresh_token.reveal())
        assert (await h.get("revoked")).state is State.INVALIDATED
        assert (await h.get("unreachable")).state is State.FAILING
        assert h.idp.ledger.reuses_in_grace == 1 and h.idp.ledger.reuses_outside_grace == 0
        assert h.successes() == 2
        assert h.grace_retries() == 1
        assert h.failures("connect_error", provider="down") == 1
        assert h.failures("connect_error") == 0
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 0
        assert [line["token_set"] for line in logs.at_level("error")] == ["revoked"]
        for token_set_id in results:
            logs.outcome_line(token_set_id)


# --------------------------------------------------------------------------- secrets


# ---- review fixes: provider-wide invalid_grant, another live owner's attempt -------------------


@pytest.mark.anyio
async def test_an_invalid_grant_storm_pauses_the_provider_instead_of_invalidating_everyone(
    tmp_path: Path, logs: LogCapture
) -> None:
    """Another app's tokens, a wrong realm: the IdP answers invalid_grant for every set. The
    first refusals invalidate (one could be a customer's revocation); from the third in a row
    with no success between, the provider is paused and the sets are kept."""
    async with harness(tmp_path) as h:
        for n in range(1, 6):
            await h.add(f"ts-{n}")
        for n in range(1, 6):
            h.idp.revoke((await h.get(f"ts-{n}")).refresh_token.reveal())
        outcomes = [(await h.refresher.refresh(f"ts-{n}")).outcome for n in range(1, 6)]
        assert outcomes == ["invalidated", "invalidated", "failed", "circuit_open", "circuit_open"]
        assert (await h.get("ts-3")).state is State.FAILING
        for n in (4, 5):
            assert (await h.get(f"ts-{n}")).state is State.ACTIVE  # never sent
        assert h.idp.ledger.requests == 3
        assert h.metric("refresherd_provider_circuit_open", provider=PROVIDER) == 1
        assert (
            h.metric("refresherd_invalidations_total", provider=PROVIDER, reason="invalid_grant")
            == 2
        )
        [line] = [e for e in logs.lines() if "several token sets in a row" in e.get("event", "")]
        assert line["level"] == "error" and line["provider"] == PROVIDER


@pytest.mark.anyio
async def test_a_success_between_refusals_resets_the_storm_count(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for n in range(1, 5):
            await h.add(f"ts-{n}")
        for n in (1, 2, 4):
            h.idp.revoke((await h.get(f"ts-{n}")).refresh_token.reveal())
        outcomes = [(await h.refresher.refresh(f"ts-{n}")).outcome for n in range(1, 5)]
        assert outcomes == ["invalidated", "invalidated", "refreshed", "invalidated"]


@pytest.mark.anyio
async def test_a_live_owners_unresolved_attempt_is_not_sent_again(tmp_path: Path) -> None:
    """A process paused past its lease (SIGSTOP) still lives and may still be sending: the set
    is not refreshed by anyone else while that attempt's window is open."""
    async with harness(tmp_path, grace_period=20.0) as h:
        await h.add("ts-1")
        with ownership.OwnerLock(h.store.path) as paused:
            t0 = time.time()
            assert isinstance(
                await h.store.claim("ts-1", owner=paused, now=t0, lease_until=t0 + 60),
                TokenSet,
            )
            assert await h.store.begin_attempt(
                "ts-1", owner=paused, version=1, now=t0, keep_since=math.inf
            )
            # Its lease lapses (paused), the row is free to claim again.
            await h.store.renew_lease("ts-1", owner=paused, lease_until=t0 - 1)
            result = await h.refresher.refresh("ts-1")
            assert result.outcome == "leased"
            assert result.reason == "attempt_in_flight_elsewhere"
            assert h.idp.ledger.requests == 0
            stored = await h.get("ts-1")
            assert stored.lease_owner is None and stored.next_refresh_at > t0
        # The owner is gone now: its attempt is continued, inside the window.
        result = await h.refresher.refresh("ts-1")
        assert result.outcome == "refreshed"
        assert h.idp.ledger.requests == 1


@pytest.mark.anyio
async def test_an_interrupted_manual_refresh_is_due_at_once(tmp_path: Path) -> None:
    """`refresherd refresh ID` journaled a send, then died: whatever its plan said, the set is
    due now, so that a daemon continues the attempt inside the grace window."""
    async with harness(tmp_path) as h:
        await h.add("ts-1")
        planned = (await h.get("ts-1")).next_refresh_at
        t0 = time.time()
        assert planned > t0 + 60
        await h.store.claim("ts-1", owner="owner-cli", now=t0, lease_until=t0 + 60)
        await h.store.begin_attempt("ts-1", owner="owner-cli", version=1, now=t0, keep_since=0)
        assert (await h.get("ts-1")).next_refresh_at <= t0


def test_no_token_or_client_secret_in_any_log_line_of_this_module() -> None:
    """Runs last (file order): every token any FakeIdP of this module issued, and the client
    secrets, against everything refresherd logged in this module."""
    text = "".join(_MODULE_LOG)
    if not _MODULE_IDPS or not text:
        pytest.skip("run with the rest of the module")
    values = _secrets_of(_MODULE_IDPS)
    assert len(values) > 20  # the scan has something to look for
    assert "refresh" in text  # and something to look in
    assert _leaks(text, values) == []


@pytest.mark.anyio
async def test_a_cancelled_caller_does_not_cancel_the_flight_nor_fail_its_waiters(
    tmp_path: Path,
) -> None:
    """With Refresher.run, a refresh flies in the refresher's task group: the first caller
    (an API client that disconnects, say) can go away without touching it."""
    async with harness(tmp_path, usage="reuse") as h, anyio.create_task_group() as tg:
        await tg.start(h.refresher.run)
        await h.add("ts-1")
        h.idp.hold_requests()
        results: list[RefreshResult] = []

        first = anyio.CancelScope()

        async def first_caller() -> None:
            with first:
                await h.refresher.refresh("ts-1")

        async def waiter() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        tg.start_soon(first_caller)
        with anyio.fail_after(60):
            while h.idp.held_requests < 1:
                await anyio.sleep(0.01)
        tg.start_soon(waiter)
        with anyio.fail_after(60):
            while h.metric("refresherd_singleflight_coalesced_total") < 1:
                await anyio.sleep(0.01)
        first.cancel()  # the caller that started the flight goes away
        with anyio.fail_after(60):
            while not first.cancelled_caught:
                await anyio.sleep(0.01)
        assert not results  # the waiter still waits: the request is held at the IdP
        # The request is still at the IdP: released, it completes and is persisted.
        h.idp.release_requests()
        with anyio.fail_after(60):
            while not results:
                await anyio.sleep(0.01)
        [result] = results
        assert result.outcome == "refreshed"
        assert h.idp.ledger.refreshes == 1
        assert (await h.get("ts-1")).version == 2
        h.refresher.close()


@pytest.mark.anyio
@pytest.mark.parametrize("running", [True, False], ids=["daemon's keeper", "own keeper"])
async def test_a_refresh_held_at_the_idp_keeps_renewing_its_lease(
    tmp_path: Path, running: bool
) -> None:
    """A slow IdP does not cost us the row: in a running refresher one keeper renews the lease
    of every refresh in flight; without run() (the CLI) each refresh renews its own."""
    async with harness(tmp_path, usage="reuse") as h, anyio.create_task_group() as tg:
        h.parts.leases.duration = 1.2
        if running:
            await tg.start(h.refresher.run)
        await h.add("ts-1")
        h.idp.hold_requests()
        results: list[RefreshResult] = []

        async def caller() -> None:
            results.append(await h.refresher.refresh("ts-1"))

        tg.start_soon(caller)
        with anyio.fail_after(60):
            while h.idp.held_requests < 1:
                await anyio.sleep(0.01)
        first = (await h.get("ts-1")).lease_until
        assert first is not None
        # Renewed, and renewed again: each time further out than the one before.
        for _ in range(2):
            with anyio.fail_after(60):
                while (until := (await h.get("ts-1")).lease_until) == first:
                    await anyio.sleep(0.05)
            assert until is not None and until > first
            first = until
        h.idp.release_requests()
        with anyio.fail_after(60):
            while not results:
                await anyio.sleep(0.01)
        assert results[0].outcome == "refreshed"
        row = await h.get("ts-1")
        assert (row.version, row.lease_owner) == (2, None)
        h.refresher.close()


# --------------------------------------------------------------------------- the collector


@pytest.mark.anyio
@pytest.mark.parametrize("usage", ["reuse", "one_time"])
async def test_a_refresh_leaves_nothing_for_the_cyclic_collector(
    tmp_path: Path, logs: LogCapture, usage: str
) -> None:
    """`refresherd run` lets the collector's youngest generation grow to tens of thousands of
    objects (cli/run.py): safe only while a refresh's objects are freed by their reference
    counts, so that what waits for a collection is not sockets, leases or grants. Counted
    with DEBUG_SAVEALL over sequential refreshes, the FakeIdP's (same process) included."""
    count = 60
    async with harness(tmp_path, usage=usage) as h, anyio.create_task_group() as tg:
        # As in the daemon: flights in the refresher's group, one lease keeper for all.
        await tg.start(h.refresher.run)
        ids = [f"ts-{i}" for i in range(count + 1)]
        for token_set_id in ids:
            await h.add(token_set_id)
        # The first refresh makes what lives for the process (a connection, first-use caches).
        assert (await h.refresher.refresh(ids[0])).outcome == "refreshed"
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for token_set_id in ids[1:]:
                assert (await h.refresher.refresh(token_set_id)).outcome == "refreshed"
            gc.collect()
            left = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        h.refresher.close()
        # Without the refresher's lease keeper (each refresh then renews in a task of its own,
        # cancelled at the end: a CancelledError and its traceback's frames), 32 a refresh.
        assert left.total() / count < 1.0, left.most_common(10)
