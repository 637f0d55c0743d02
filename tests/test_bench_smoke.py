"""bench/run.py works end to end on a tiny run: it starts the fake IdP and the daemon, refreshes,
and writes its report. Nothing about speed is checked (benchmarks are separate from tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "run.py"


def run_script(script: str, *args: str, timeout: float = 240) -> str:
    """bench/``script`` run to its end with ``args``; its standard output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_bench(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "report.json"
    stdout = run_script(BENCH.name, "--out", str(out), "--log-level", "warning", *args)
    assert "machine:" in stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(report, dict)
    return report


@pytest.mark.slow
def test_throughput_bench_reports_daemon_and_bare_loops(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "throughput", "--sets", "200", "--concurrency", "4")
    daemon = report["daemon"]
    assert isinstance(daemon, dict)
    # Every set was refreshed exactly once, none failed: the daemon did the real work.
    assert (daemon["refreshes"], daemon["failures"]) == (200, 0)
    bare = report["bare"]
    assert isinstance(bare, dict) and set(bare) == {"httpx", "aiohttp"}
    for key in ("ratio_vs_aiohttp", "ratio_vs_httpx", "import_s", "startup_s", "machine"):
        assert key in report
    # Where the daemon's loop was, over the same span as its rate (none if every refresh was
    # seen in one scrape): a share of one core (a little over one is /proc's 10 ms ticks), and
    # the refreshes in flight, sampled from the first scrape that saw one.
    if daemon["per_second"] is not None:
        assert isinstance(daemon["loop_core_share"], float)
        assert 0 <= daemon["loop_core_share"] <= 1.5
        assert isinstance(daemon["mean_in_flight"], float)
        assert 0 <= daemon["mean_in_flight"] <= 200


@pytest.mark.slow
def test_throughput_bench_with_worker_processes_and_a_two_process_bare_loop(
    tmp_path: Path,
) -> None:
    report = run_bench(
        tmp_path,
        "--daemon-workers",
        "2",
        "throughput",
        "--sets",
        "200",
        "--concurrency",
        "4",
        "--bare",
        "aiohttp",
        "--bare-processes",
        "2",
    )
    daemon = report["daemon"]
    assert isinstance(daemon, dict)
    # Counted from the primary's /metrics: every process's refreshes, merged.
    assert (daemon["refreshes"], daemon["failures"], daemon["workers"]) == (200, 0, 2)
    bare = report["bare"]
    assert isinstance(bare, dict) and set(bare) == {"aiohttp", "aiohttp x2"}
    assert "ratio_vs_aiohttp x2" in report


@pytest.mark.slow
def test_scale_bench_reports_lateness_memory_and_startup(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "scale",
        "--sizes",
        "300",
        "--rate",
        "50",
        "--window",
        "2",
        "--latency",
        "0.01",
        "--lead",
        "4",
        "--drain",
        "20",
    )
    runs = report["runs"]
    assert isinstance(runs, list) and len(runs) == 1
    run = runs[0]
    # The 100 sets of the window were refreshed, the 200 others (due an hour out) were not.
    assert (run["due_in_window"], run["refreshed"], run["failures"]) == (100, 100, 0)
    for key in ("import_s", "startup_s", "rss_mb", "lateness_p99_s", "cpu_ms_per_refresh"):
        assert run[key] is not None


@pytest.mark.slow
def test_fleet_bench_runs_both_backends_and_survives_a_kill(
    tmp_path: Path, postgres_server: str
) -> None:
    out = tmp_path / "fleet.json"
    run_script(
        "fleet.py",
        "--sets",
        "300",
        "--daemons",
        "2",
        "--kill-one",
        # Slow enough (about 2 s a run) that the kill at 20 % lands mid-run.
        "--latency",
        "0.05",
        "--concurrency",
        "4",
        "--postgres",
        postgres_server,
        "--out",
        str(out),
    )
    runs = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert [(r["backend"], r["daemons"]) for r in runs] == [("sqlite", 2), ("postgresql", 2)]
    for r in runs:
        # Every set refreshed, as the database says, after one daemon died mid-run.
        assert r["killed_first"], r
        assert r["done"] >= 300 and sum(r["shares"]) >= 300, r
        assert r["per_second"] is not None and r["per_second"] > 0, r


@pytest.mark.slow
def test_reads_bench_reports_the_token_api_against_a_bare_handler(tmp_path: Path) -> None:
    # aiohttp, the client every checkout has: TCP and the unix socket, one short round.
    report = run_bench(
        tmp_path, "reads", "--sets", "5", "--seconds", "1", "--repeat", "1", "--client", "aiohttp"
    )
    rounds = report["rounds"]
    assert isinstance(rounds, list) and {r["transport"] for r in rounds} == {"tcp", "unix"}
    for row in rounds:
        for who in ("daemon", "bare"):
            # Every GET answered 200 with the bodies the daemon gave: the real work was done.
            assert row[who]["requests"] > 0 and row[who]["errors"] == 0, row
            assert row[who]["p99_ms"] > 0 and row[who]["cpu_us_per_get"] > 0
        assert row["ratio"] > 0 and row["cpu_ratio"] > 0
    assert set(report["summary"]) == {"uvicorn/tcp", "uvicorn/unix"}


def test_request_cost_bench_reports_each_variant() -> None:
    """bench/request_cost.py: every variant sends its requests (a failed one ends the run with
    an error) and reports CPU per request."""
    stdout = run_script("request_cost.py", "--requests", "300", timeout=120)
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| ")]
    measured = {(row[1].strip(), row[2].strip()): float(row[3]) for row in rows[1:]}
    variants = ("aiohttp", "anyio-scope", "deadline", "transport")
    assert set(measured) == {(v, run) for v in variants for run in ("1", "2")}
    assert all(cpu > 0 for cpu in measured.values())


@pytest.mark.slow
def test_refresh_cost_bench_reports_the_loops_cpu_per_refresh() -> None:
    """bench/refresh_cost.py: a real daemon refreshes every imported set against the canned
    IdP (it exits with an error if one is missing or failed) and reports CPU per refresh."""
    # Enough for a few of its scrapes (every 0.1 s) between the first and the last.
    stdout = run_script("refresh_cost.py", "--sets", "3000", "--repeat", "1")
    [row] = [line for line in stdout.splitlines() if line.startswith("| default |")]
    loop, process = (float(cell) for cell in row.split("|")[3:5])
    assert 0 < loop <= process
