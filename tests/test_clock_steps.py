"""The wall clock stepped (NTP) under a running daemon: neither a refresh storm nor a missed
refresh. The daemon runs under libfaketime, whose offset file is rewritten mid-run, with the
monotonic clock left true (FAKETIME_DONT_FAKE_MONOTONIC), as after a real step. The fake IdP
runs in this process on the true clock and judges expiry; its ledger says when each refresh
happened."""

from __future__ import annotations

import glob
import itertools
import os
import time
from pathlib import Path

import pytest
from conftest import (
    DaemonProcess,
    Daemons,
    IdPFactory,
    IdPHandle,
    import_tokens,
    read_rows,
    wait_until,
    write_config,
)

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (Debian package faketime; .ci/run installs it)",
)

SETS = 10
LIFETIME = 20  # access tokens: refreshed about 10 s after each grant (half the lifetime)
# Long enough for every set's one refresh after the step, shorter than the next planned one.
STEP_WINDOW = 6.0


def run_with_a_clock_step(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons, step: str
) -> tuple[IdPHandle, DaemonProcess, float, dict[str, str]]:
    """A daemon with 10 fresh sets; its wall clock stepped by ``step``; two refresh cycles."""
    idp = idp_factory(access_token_lifetime=LIFETIME, grace_period=5)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "refresherd.toml",
        database=db,
        providers={"p": idp.provider()},
        daemon={"poll_interval": "500ms"},
        # Plans as for single sets: no import spread, so none is due before the step.
        schedule={"import_spread": 0.0},
    )
    import_tokens(config, idp.token_lines("p", SETS))
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=str(LIBFAKETIME),
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    daemon = daemons(config, env=env)
    # Ready means the scheduler has taken its first reading of the clocks.
    wait_until(lambda: daemon.get("/readyz").status_code == 200, what="the daemon to be ready")
    family = {idp.ledger.family_of(row["refresh_token"]): i for i, row in read_rows(db).items()}
    assert idp.ledger.refreshes == 0  # nothing is due yet: planned ~10 s after the import
    stepped = time.monotonic()
    offset.write_text(step + "\n")
    # Two cycles: the refresh the step causes, then the next one, planned on the new clock.
    wait_until(
        lambda: min(row["version"] for row in read_rows(db).values()) >= 3,
        what="two refreshes of every set after the step",
    )
    return idp, daemon, stepped, family


def assert_once_each_then_on_time(idp: IdPHandle, stepped: float, family: dict[str, str]) -> None:
    events = [e for e in idp.ledger.events if e["kind"] in ("issue", "refreshed")]
    # Exactly one refresh per set right after the step: no storm, no tight loop, none missed.
    just_after = [e for e in events if e["kind"] == "refreshed" and e["t"] < stepped + STEP_WINDOW]
    assert sorted(family[str(e["family"])] for e in just_after) == sorted(family.values())
    # And never an access token left to expire at the IdP: each grant is followed by the next
    # before its lifetime is over (as the IdP's own, true clock measures it).
    for fam in family:
        times = [float(e["t"]) for e in events if e["family"] == fam]  # type: ignore[arg-type]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 3 and max(gaps) < LIFETIME, (family[fam], gaps)
    assert idp.ledger.reuses_outside_grace == 0 and idp.ledger.invalid_grants == 0


@pytest.mark.slow
def test_wall_clock_stepped_back_an_hour_refreshes_each_set_once_and_misses_none(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp, daemon, stepped, family = run_with_a_clock_step(tmp_path, idp_factory, daemons, "-1h")
    [warning] = daemon.events(
        "wall clock stepped back: token sets planned on the old clock are due now"
    )
    assert warning["token_sets"] == SETS and warning["level"] == "warning"
    assert warning["step"] >= 3599
    assert_once_each_then_on_time(idp, stepped, family)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_wall_clock_stepped_forward_an_hour_refreshes_each_set_once(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp, daemon, stepped, family = run_with_a_clock_step(tmp_path, idp_factory, daemons, "+1h")
    assert not daemon.events(
        "wall clock stepped back: token sets planned on the old clock are due now"
    )
    assert_once_each_then_on_time(idp, stepped, family)
    assert daemon.stop() == 0
