"""The short chaos run of CI: the daemon SIGKILLed every 1-4 s for 45 s against IdPs that
inject faults into a quarter of the token requests. The long run is ``tests/chaos.py``
(docs/reliability.md); both use the same harness."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import CHAOS_FAULTS, ChaosSettings, run_chaos


@pytest.mark.slow
def test_sigkill_every_few_seconds_under_idp_faults_loses_nothing(tmp_path: Path) -> None:
    report = run_chaos(ChaosSettings(workdir=tmp_path / "chaos", duration=45.0, token_sets=20))
    print(report.format())
    assert report.kills >= 10, report.format()
    # Every kind of fault was exercised, and the daemon kept rotating through all of it.
    assert set(report.faults) == {k.value for k in CHAOS_FAULTS}, report.format()
    assert report.rotations > report.kills, report.format()
    assert report.faults_total >= 0.2 * report.requests, report.format()
    assert report.min_version >= 3, report.format()  # every set went through several rotations
    # The promise: nothing lost, no token spent outside its grace window, nothing invalidated,
    # no stored grant replaced by an older one, a clean stop at the end, no secret in any output.
    assert report.lost == 0, report.format()
    assert report.reuses_outside_grace == 0, report.format()
    assert report.invalid_grants == 0, report.format()
    assert report.invalidated == 0, report.format()
    assert report.version_regressions == 0, report.format()
    assert report.final_exit_code == 0, report.format()
    assert report.leaks == 0, report.format()
    assert report.ok
