"""Secrets on a running daemon: what another local user or process could see. The database and
its -wal/-shm files are 0600 whatever the umask; the argv of the process holds no secret; metric
labels carry no token-set id and no secret; a secret file readable by others draws a warning
at start. (Log lines, CLI output, argv and every HTTP answer are also scanned for every secret
by the session-wide leak check in conftest.py.)"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Daemons,
    IdPFactory,
    find_leaks,
    import_tokens,
    parse_metrics,
    wait_until,
    write_config,
)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Processes started meanwhile inherit umask 000: only refresherd's own modes protect."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_files_are_private_and_argv_and_labels_hold_no_secret(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, permissive_umask: None
) -> None:
    idp = idp_factory(access_token_lifetime=4, grace_period=5)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml", database=db, providers={"idp": idp.provider()}
    )
    import_tokens(config, idp.token_lines("idp", 3))
    daemon = daemons(config)
    wait_until(lambda: idp.ledger.refreshes >= 6, what="two rounds of refreshes")

    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    owners = Path(f"{db}.owners")
    assert stat.S_IMODE(owners.stat().st_mode) == 0o700
    locks = list(owners.iterdir())
    assert locks and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in locks)

    secrets = {t.encode() for t in idp.ledger.issued_tokens()} | {idp.client_secret.encode()}
    cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
    assert b"run" in cmdline.split(b"\0")
    assert not find_leaks(cmdline, secrets), "a secret on the daemon's command line"

    samples = parse_metrics(daemon.metrics())
    values = {value for _, labels in samples for _, value in labels}
    assert "idp" in values
    assert not any(value.startswith("ts-") for value in values), "a token-set id as a label"
    assert not find_leaks("\n".join(values).encode(), secrets)
    assert daemon.stop() == 0


def test_a_secret_file_readable_by_others_draws_a_warning_at_start(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory()
    idp.secret_file.chmod(0o644)
    config = write_config(
        tmp_path / "refresherd.toml",
        database=tmp_path / "tokens.db",
        providers={"idp": idp.provider()},
    )
    daemon = daemons(config)
    (warning,) = daemon.wait_for_event("config")
    assert warning["level"] == "warning"
    assert str(idp.secret_file) in warning["warning"]
    assert "readable by group or others" in warning["warning"]
    assert daemon.stop() == 0
