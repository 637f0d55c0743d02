"""An IdP that answers badly, end to end: the real daemon against the real FakeIdP, whose
spoilt answers come after it has processed the grant (the token has rotated). DESIGN.md's
failure table: a malformed 2xx may have consumed a one-time token, so it is retried at once with
the same token inside the grace window; a re-use token backs off. No crash, a clear error that
names what was wrong, the token set kept, nothing lost."""

from __future__ import annotations

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
    write_config,
)

from refresherd.idp.transport import MAX_BODY_BYTES
from refresherd.testing import FaultKind

SPOILT = [
    pytest.param(FaultKind.TRUNCATED_AFTER_ROTATE, "the body is not valid JSON", id="truncated"),
    pytest.param(
        FaultKind.HUGE_AFTER_ROTATE, f"response body over {MAX_BODY_BYTES} bytes", id="huge"
    ),
    pytest.param(
        FaultKind.WRONG_TYPES_AFTER_ROTATE,
        "access_token is required and must be a non-empty string",
        id="wrong-types",
    ),
    pytest.param(
        FaultKind.DUPLICATE_KEYS_AFTER_ROTATE,
        "the JSON object has 'refresh_token' more than once",
        id="duplicate-keys",
    ),
    pytest.param(FaultKind.GARBAGE_AFTER_ROTATE, "the body is not valid JSON", id="html"),
]


def setup(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, fault: FaultKind, **idp: object
) -> tuple[IdPHandle, DaemonProcess, str]:
    handle = idp_factory(access_token_lifetime=3600, grace_period=10, **idp)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"idp": handle.provider()},
        schedule={"backoff_initial": "1s", "backoff_max": "2s"},
    )
    # No access token: the set is due at once, and its first refresh meets the fault.
    lines = handle.token_lines("idp", 1, with_access_token=False)
    import_tokens(config, lines)
    handle.faults.add(fault)
    return handle, daemons(config), str(lines[0]["refresh_token"])


@pytest.mark.parametrize(("fault", "detail"), SPOILT)
def test_a_spoilt_answer_to_a_one_time_token_is_retried_in_grace_and_nothing_is_lost(
    fault: FaultKind, detail: str, tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp, daemon, imported = setup(tmp_path, idp_factory, daemons, fault)
    (done,) = daemon.wait_for_event("refresh", token_set="ts-0000", outcome="refreshed")
    assert done["attempt"] == 2
    (retry,) = daemon.events("refresh retry")
    assert retry["reason"] == "malformed_response"
    assert retry["grace"] is True and retry["attempt"] == 1
    assert detail in retry["detail"], retry
    text = daemon.metrics()
    assert metric(text, "refresherd_refresh_failures_total", reason="malformed_response") == 1
    assert metric(text, "refresherd_grace_retries_total", provider="idp") == 1
    assert metric(text, "refresherd_refresh_success_total", provider="idp") == 1
    # The IdP saw the token twice: rotated on the spoilt answer, then re-used inside grace.
    assert idp.ledger.faults_injected == {fault.value: 1}
    assert idp.ledger.reuses_in_grace == 1
    assert idp.ledger.reuses_outside_grace == 0 and idp.ledger.invalid_grants == 0
    assert daemon.running()
    assert daemon.stop() == 0
    row = read_rows(tmp_path / "tokens.db")["ts-0000"]
    assert row["state"] == "active" and row["last_error"] is None
    assert row["refresh_token"] != imported
    assert row["refresh_token"] in idp.ledger.live_refresh_tokens("ts-0000")
    assert row["attempt_started_at"] is None  # the journal is resolved


def test_a_spoilt_answer_to_a_reuse_token_backs_off_and_keeps_the_token(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp, daemon, imported = setup(
        tmp_path, idp_factory, daemons, FaultKind.TRUNCATED_AFTER_ROTATE, usage="reuse"
    )
    (failed,) = daemon.wait_for_event("refresh", token_set="ts-0000", outcome="failed")
    assert failed["reason"] == "malformed_response"
    assert "the body is not valid JSON" in failed["detail"]
    daemon.wait_for_event("refresh", token_set="ts-0000", outcome="refreshed")
    assert not daemon.events("refresh retry")  # re-use: ordinary backoff, no grace retry
    text = daemon.metrics()
    assert metric(text, "refresherd_refresh_failures_total", reason="malformed_response") == 1
    assert metric(text, "refresherd_grace_retries_total", provider="idp") == 0
    assert daemon.stop() == 0
    row = read_rows(tmp_path / "tokens.db")["ts-0000"]
    assert row["state"] == "active"
    assert row["refresh_token"] == imported  # a re-use IdP keeps the token
    assert idp.ledger.is_live(imported)
    assert idp.ledger.invalid_grants == 0


def test_a_grant_without_content_type_is_read(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp, daemon, imported = setup(tmp_path, idp_factory, daemons, FaultKind.NO_CONTENT_TYPE)
    (done,) = daemon.wait_for_event("refresh", token_set="ts-0000", outcome="refreshed")
    assert done["attempt"] == 1
    assert metric(daemon.metrics(), "refresherd_refresh_failures_total") == 0
    assert idp.ledger.faults_injected == {"no_content_type": 1}
    assert daemon.stop() == 0
    row = read_rows(tmp_path / "tokens.db")["ts-0000"]
    assert row["state"] == "active" and row["refresh_token"] != imported
    assert row["refresh_token"] in idp.ledger.live_refresh_tokens("ts-0000")
    assert idp.ledger.requests == 1
