"""The adaptive limit on refreshes in flight, end to end: a real ``refresherd run`` process
against a real FakeIdP on loopback, which counts the requests it handles at once.
Nothing here times performance; the limits are what is checked."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import (
    DaemonProcess,
    Daemons,
    Database,
    IdPFactory,
    import_tokens,
    metric,
    wait_until,
    write_config,
)

from refresherd.concurrency import INITIAL


def refreshed(daemon: DaemonProcess) -> float:
    return metric(daemon.metrics(), "refresherd_refresh_success_total", provider="p")


def test_the_idp_never_sees_more_than_the_provider_caps_allow(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    # A backlog far above the cap, with the default (auto) concurrency and connection pool:
    # the adaptive limit may want more, the provider's cap holds it.
    idp = idp_factory(latency=0.05, usage="reuse")
    provider = idp.provider(max_concurrent_refreshes=5)
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": provider})
    import_tokens(config, idp.token_lines("p", 150, with_access_token=False))  # due at once
    daemon = daemons(config)
    limits: list[float] = []

    def done() -> bool:
        limits.append(metric(daemon.metrics(), "refresherd_concurrency_limit", provider="p"))
        return refreshed(daemon) >= 150

    wait_until(done, interval=0.05, what="150 refreshes")
    assert 1 <= idp.ledger.peak_requests_in_flight <= 5, idp.ledger.snapshot()
    assert max(limits) <= 5


def test_a_backlog_raises_the_limit_and_a_quiet_daemon_keeps_it(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    # 1,500 sets due at once, the IdP 50 ms away and steady: the limit leaves its start and
    # the IdP sees more requests at once than it did; once the backlog is done, nothing is in
    # flight, and the limit, not in use, stays where the backlog left it.
    idp = idp_factory(latency=0.05, usage="reuse")
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    import_tokens(config, idp.token_lines("p", 1500, with_access_token=False))
    daemon = daemons(config)
    wait_until(lambda: refreshed(daemon) >= 1500, interval=0.1, what="1,500 refreshes")
    text = daemon.metrics()
    after = metric(text, "refresherd_concurrency_limit", provider="p")
    assert after > INITIAL
    assert idp.ledger.peak_requests_in_flight > INITIAL, idp.ledger.snapshot()
    requests = idp.ledger.requests
    time.sleep(1.0)
    text = daemon.metrics()
    assert metric(text, "refresherd_refreshes_in_flight") == 0
    assert idp.ledger.requests == requests
    assert metric(text, "refresherd_concurrency_limit", provider="p") == after
