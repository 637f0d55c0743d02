"""``[daemon] workers``: the real ``refresherd run`` primary with real worker processes, a real
FakeIdP on loopback and a real SQLite file. Nothing here times performance."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    import_tokens,
    metric,
    read_rows,
    wait_until,
    write_config,
)

from refresherd.config import load_config
from refresherd.testing import FaultKind
from refresherd.workers import process_share, share, worker_config


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the primary's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def scrape(daemon: DaemonProcess) -> str:
    assert daemon.address is not None
    host, port = daemon.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def start(
    tmp_path: Path,
    idp: IdPHandle,
    daemons: Daemons,
    *,
    sets: int,
    workers: int = 2,
    **daemon_keys: object,
) -> DaemonProcess:
    """A daemon of ``workers`` processes, all started, then ``sets`` token sets due at once
    (imported into the running daemon, so that a slow worker start cannot leave it idle)."""
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": idp.provider()},
        daemon={"workers": workers, "concurrency": 8, **daemon_keys},
    )
    daemon = daemons(config)
    for index in range(1, workers):
        daemon.wait_for_event("refresherd started", worker=index)
    import_tokens(config, idp.token_lines("p", sets, with_access_token=False))
    return daemon


def test_workers_share_the_work_and_metrics_add_up(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    # Each request takes 50 ms at the IdP, so that neither process can do it all alone.
    idp = idp_factory(grace_period=20, latency=0.05)
    daemon = start(tmp_path, idp, daemons, sets=300, workers=3)
    wait_until(lambda: idp.ledger.refreshes == 300, what="every set refreshed once")
    # /metrics on the primary counts every process's refreshes.
    wait_until(
        lambda: metric(scrape(daemon), "refresherd_refresh_success_total", provider="p") == 300,
        what="the merged success counter to reach 300",
    )
    text = scrape(daemon)
    assert metric(text, "refresherd_worker_processes") == 2
    assert metric(text, "refresherd_refresh_duration_seconds_count", provider="p") == 300
    # The database-wide figures once, from the primary, the database's exporter (metric() adds
    # up every matching sample: a worker's figures merged in would double them).
    wait_until(
        lambda: metric(scrape(daemon), "refresherd_token_sets", provider="p") == 300,
        what="the token-set count of the primary's gauge cycle",
    )
    assert metric(scrape(daemon), "refresherd_database_exporter") == 1
    [elected] = daemon.events("this daemon now exports the database-wide figures")
    assert "worker" not in elected
    by_process = {0: 0, 1: 0, 2: 0}
    for line in daemon.events("refresh", outcome="refreshed"):
        by_process[line.get("worker", 0)] += 1
    assert sum(by_process.values()) == 300
    assert all(count > 0 for count in by_process.values()), by_process
    ledger = idp.ledger
    assert ledger.concurrent_uses == 0 and ledger.reuses_outside_grace == 0
    rows = read_rows(tmp_path / "tokens.db")
    assert all(idp.ledger.is_live(row["refresh_token"]) for row in rows.values())
    primary = daemon.pid
    workers = children(primary)
    assert len(workers) == 2
    assert daemon.stop() == 0
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the primary"
    assert len(daemon.events("refresherd stopped")) == 3  # the primary and both workers


def test_sigterm_to_every_process_at_once_drains_them_all(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """What systemd does at stop (KillMode=control-group): SIGTERM to the primary and to each
    worker. The primary's own request to its workers must not count as a second signal, which
    would drop the drain."""
    idp = idp_factory(grace_period=30)
    # Each process has 4 slots (concurrency 8 shared out): both are busy with slow answers.
    idp.faults.add(FaultKind.SLOW, times=20, delay=3.0)
    daemon = start(tmp_path, idp, daemons, sets=20)
    wait_until(lambda: idp.ledger.refreshes >= 8, what="both processes' requests at the IdP")
    [worker] = children(daemon.pid)
    daemon.send_signal(signal.SIGTERM)
    os.kill(worker, signal.SIGTERM)
    code = daemon.wait_exit()
    log = daemon.tail(60)
    assert code == 0, log
    assert not alive(worker), log
    assert not daemon.events("second stop signal: cancelling at once"), log
    shutting_down = daemon.events("shutting down", worker=1)
    assert len(shutting_down) == 1 and shutting_down[0]["in_flight"] >= 1, daemon.log_text()
    assert not [line for line in daemon.lines() if "shutdown timeout" in str(line.get("event"))]
    # Every refresh granted at the IdP was persisted: nothing lost, nothing left to recover.
    rows = read_rows(tmp_path / "tokens.db")
    refreshed = [row for row in rows.values() if row["version"] == 2]
    # (A slow send is hedged: its grace re-send is a second grant of the same rotation.)
    rotations = idp.ledger.refreshes - idp.ledger.reuses_in_grace
    assert len(refreshed) == rotations, (idp.ledger.snapshot(), log)
    for token_set_id, row in rows.items():
        assert idp.ledger.is_live(row["refresh_token"]), (token_set_id, log)
        assert row["attempt_started_at"] is None and row["lease_owner"] is None, (row, log)


def test_a_second_signal_to_the_primary_ends_every_process_at_once(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=60)
    # The first 8 requests (both processes' 4 slots) are answered after 15 s; the rest at once.
    idp.faults.add(FaultKind.SLOW, times=8, delay=15.0)
    daemon = start(tmp_path, idp, daemons, sets=20)
    wait_until(lambda: idp.ledger.refreshes >= 8, what="both processes' requests at the IdP")
    held_until = time.monotonic() + 15.0
    [worker] = children(daemon.pid)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait_for_event("shutting down")
    daemon.send_signal(signal.SIGTERM)
    # Neither the answers (15 s) nor the drain (shutdown_timeout, 20 s) are waited for.
    assert daemon.wait_exit(timeout=12.0) == 0, daemon.tail(40)
    assert not alive(worker)
    assert daemon.events("second stop signal: cancelling at once")
    # Nothing lost: what was in flight is journaled, and a new start finishes it in grace
    # (once the IdP is done with the abandoned requests, so that no use overlaps another).
    time.sleep(max(0.0, held_until + 1.0 - time.monotonic()))
    again = daemons(daemon.config, "again")
    wait_until(
        lambda: all(
            row["version"] == 2 and row["attempt_started_at"] is None
            for row in read_rows(tmp_path / "tokens.db").values()
        ),
        what="every set refreshed and no attempt left open",
    )
    assert again.stop() == 0
    for row in read_rows(tmp_path / "tokens.db").values():
        assert idp.ledger.is_live(row["refresh_token"])
    ledger = idp.ledger
    # (Overlapping sends of one token are expected here: a slow send is hedged inside its
    # window, deliberately. What must never happen is a send outside it.)
    assert ledger.reuses_outside_grace == 0 and ledger.invalid_grants == 0, ledger.snapshot()


def test_a_killed_worker_is_started_again_and_the_counts_never_go_down(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=20)
    daemon = start(tmp_path, idp, daemons, sets=40)
    wait_until(lambda: idp.ledger.refreshes == 40, what="every set refreshed once")
    wait_until(
        lambda: metric(scrape(daemon), "refresherd_refresh_success_total", provider="p") == 40,
        what="the merged success counter to reach 40",
    )
    [worker] = children(daemon.pid)
    os.kill(worker, signal.SIGKILL)
    daemon.wait_for_event("worker process ended unasked; starting it again", worker=1)
    replaced = wait_until(
        lambda: [pid for pid in children(daemon.pid) if pid != worker], what="a new worker"
    )
    assert len(replaced) == 1
    text = scrape(daemon)
    assert metric(text, "refresherd_worker_restarts_total") == 1
    # The dead worker's counts stay in the totals.
    assert metric(text, "refresherd_refresh_success_total", provider="p") == 40
    # New work still gets done.
    import_tokens(daemon.config, idp.token_lines("p", 10, prefix="late", with_access_token=False))
    wait_until(lambda: idp.ledger.refreshes == 50, what="the sets added later refreshed")
    assert daemon.stop() == 0


HUNG_AFTER = 6.0


def test_a_hung_worker_is_killed_and_started_again(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=20)
    # Not the least (3 s): a worker starved of CPU on a loaded machine may be silent that long.
    daemon = start(tmp_path, idp, daemons, sets=20, worker_timeout=f"{HUNG_AFTER:g}s")
    wait_until(lambda: idp.ledger.refreshes == 20, what="every set refreshed once")
    [worker] = children(daemon.pid)
    # Stopped, as a worker whose event loop is stuck: alive, and silent.
    os.kill(worker, signal.SIGSTOP)
    try:
        daemon.wait_for_event(
            "worker sent no metrics for too long: taken for hung; killing it",
            worker=1,
            pid=worker,
        )
        replaced = wait_until(
            lambda: [pid for pid in children(daemon.pid) if pid != worker], what="a new worker"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert len(replaced) == 1
    assert not alive(worker)
    assert metric(scrape(daemon), "refresherd_worker_restarts_total") == 1
    # A worker that only works hard is not taken for hung: the new one runs past the limit.
    import_tokens(daemon.config, idp.token_lines("p", 30, prefix="late", with_access_token=False))
    wait_until(lambda: idp.ledger.refreshes == 50, what="the sets added later refreshed")
    time.sleep(HUNG_AFTER + 1)
    assert children(daemon.pid) == replaced
    assert metric(scrape(daemon), "refresherd_worker_restarts_total") == 1
    assert daemon.stop() == 0


def test_a_worker_restarted_after_the_database_changed_in_the_file_refuses_and_stays_down(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=20)
    daemon = start(tmp_path, idp, daemons, sets=5)
    [worker] = children(daemon.pid)  # start() waited for it
    config = daemon.config
    config.write_text(config.read_text().replace("tokens.db", "other.db"))
    os.kill(worker, signal.SIGKILL)
    daemon.wait_for_event(
        "worker cannot start with the config file as it is now; not starting it again: "
        "restart the daemon (or fix the file)",
        worker=1,
        exit_code=78,
    )
    assert "daemon.database is now" in daemon.log_text()
    assert children(daemon.pid) == []
    assert not (tmp_path / "other.db").exists()
    assert daemon.stop() == 0


def test_a_killed_primary_leaves_no_worker_behind(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=20)
    daemon = start(tmp_path, idp, daemons, sets=5)
    [worker] = children(daemon.pid)  # start() waited for it
    daemon.kill()
    wait_until(lambda: not alive(worker), what="the orphaned worker to stop by itself")
    assert daemon.events("the primary process is gone; stopping", worker=1)
    assert daemon.events("refresherd stopped", worker=1, exit_code=0)


def test_sighup_reloads_the_workers_too(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory(grace_period=20)
    daemon = start(tmp_path, idp, daemons, sets=2)
    daemon.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for_event("config reloaded", count=2)
    assert {line.get("worker") for line in reloaded} == {None, 1}
    assert daemon.stop() == 0


def test_limits_are_the_whole_daemons_shared_out(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={
            "p": {
                "token_url": "https://idp.example/token",
                "client_id": "c",
                "client_secret_env": "SECRET",
                "max_connections": 7,
                "max_concurrent_refreshes": 5,
                "max_requests_per_second": 9.0,
            }
        },
        daemon={"workers": 3, "concurrency": 10},
    )
    loaded = load_config(config, env={"SECRET": "x"})
    parts = [process_share(loaded, i) for i in range(3)]
    assert [c.daemon.concurrency for c in parts] == [4, 3, 3]
    assert [c.providers["p"].max_connections for c in parts] == [3, 2, 2]
    assert [c.providers["p"].max_concurrent_refreshes for c in parts] == [2, 2, 1]
    assert [c.providers["p"].max_requests_per_second for c in parts] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize(("total", "workers"), [(1, 1), (7, 3), (64, 2), (5, 5), (100, 7)])
def test_shares_add_up_to_the_total(total: int, workers: int) -> None:
    parts = [share(total, workers, i) for i in range(workers)]
    assert sum(parts) == total and max(parts) - min(parts) <= 1 and min(parts) >= 1


def test_worker_config_takes_the_primarys_count_and_refuses_what_it_cannot_run(
    tmp_path: Path,
) -> None:
    provider = {
        "token_url": "https://idp.example/token",
        "client_id": "c",
        "client_secret_env": "S",
    }
    path = write_config(
        tmp_path / "c.toml",
        database=tmp_path / "tokens.db",
        providers={"p": {**provider, "max_connections": 3}},
        daemon={"workers": 2, "concurrency": 3},
    )
    config = load_config(path, env={"S": "x"})
    database = str(tmp_path / "tokens.db")
    # The file says 2; the primary started 3 before the file was edited: 3 it is.
    index, running = worker_config(config, "2/3", database)
    assert (index, running.daemon.workers) == (2, 3)
    for arg, expected in [
        ("1", "INDEX/COUNT"),
        ("x/2", "INDEX/COUNT"),
        ("0/2", "1 <= INDEX < COUNT"),
        ("2/2", "1 <= INDEX < COUNT"),
        ("1/4", "daemon.concurrency: expected at least 4"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            worker_config(config, arg, database)
    with pytest.raises(ValueError, match="needs a restart of the daemon"):
        worker_config(config, "1/2", str(tmp_path / "old.db"))
