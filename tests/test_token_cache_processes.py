"""The token cache's promise with real processes: a daemon answering GET /v1/tokens/ID from
memory, and the CLI, another process on the same database, rotating and deleting the set. A
GET that begins after the other process's commit never returns the old token."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from api_daemon import PROVIDER, api_config
from conftest import (
    Daemons,
    IdPFactory,
    import_tokens,
    metric,
    read_rows,
    run_cli,
)
from databases import Database

GONE = "404"


def test_a_get_after_another_process_commits_never_returns_the_old_token(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, db: Database
) -> None:
    handle = idp_factory(grace_period=5.0, usage="one_time")
    config, bearer = api_config(tmp_path, handle, database=db)
    import_tokens(config, handle.token_lines(PROVIDER, 1))
    daemon = daemons(config)
    headers = {"Authorization": f"Bearer {bearer}"}
    url = daemon.url("/v1/tokens/ts-0000")

    def token(client: httpx.Client) -> str:
        response = client.get(url, headers=headers)
        if response.status_code == 404:
            return GONE
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    with httpx.Client(timeout=30) as client:
        first = token(client)
        assert first == read_rows(db)["ts-0000"]["access_token"]

        # Readers all along: when each GET began, and what it got.
        seen: list[tuple[float, str]] = []
        stop = threading.Event()

        def read_all_along() -> None:
            with httpx.Client(timeout=30) as own:
                while not stop.is_set():
                    began = time.monotonic()
                    seen.append((began, token(own)))

        readers = [threading.Thread(target=read_all_along) for _ in range(2)]
        for reader in readers:
            reader.start()
        # (when the other process's commit had returned, the token it stored)
        committed: list[tuple[float, str]] = [(0.0, first)]
        try:
            for _ in range(3):
                time.sleep(0.3)  # reads from memory in between
                proc = run_cli(config, "refresh", "ts-0000")
                assert proc.returncode == 0, proc.stderr
                done = time.monotonic()
                stored = str(read_rows(db)["ts-0000"]["access_token"])
                assert stored != committed[-1][1]
                committed.append((done, stored))
                assert token(client) == stored  # the very next GET
            time.sleep(0.3)
            proc = run_cli(config, "tokens", "remove", "ts-0000")
            assert proc.returncode == 0, proc.stderr
            committed.append((time.monotonic(), GONE))
            assert token(client) == GONE
            time.sleep(0.3)
        finally:
            stop.set()
            for reader in readers:
                reader.join()

    # Grants in the order the IdP made them: the CLI's, and any the daemon made for a GET
    # that found the set due while the CLI's attempt was journaled (a forced refresh makes
    # it due, for crash recovery), which is newer than the commit before it.
    minted = {value: i for i, value in enumerate(handle.ledger.access_tokens)}
    minted[GONE] = len(minted)
    for began, got in seen:
        latest = max((k for k, (done, _) in enumerate(committed) if done <= began))
        assert minted[got] >= minted[committed[latest][1]], (began, got, committed)
    hits = metric(daemon.metrics(), "refresherd_api_token_reads_total", result="hit")
    misses = metric(daemon.metrics(), "refresherd_api_token_reads_total", result="miss")
    # The readers were answered from memory between the commits (not a test of a cache that
    # never holds anything), and went to the database after each.
    assert hits > 4 * misses > 0, (hits, misses)
    assert handle.ledger.refreshes >= 3
