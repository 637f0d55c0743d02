"""Background loops kept running through their own faults (refresherd.supervisor): the backoff
decision, the supervisor around real loop functions, and the real daemon surviving a loop that
fails."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    Daemons,
    IdPFactory,
    import_tokens,
    metric,
    parse_metrics,
    wait_until,
    write_config,
)

from refresherd import logs
from refresherd.metrics import BACKGROUND_TASKS, Metrics
from refresherd.supervisor import (
    HEALTHY_RUN,
    RESTART_INITIAL,
    RESTART_MAX,
    failures_in_a_row,
    restart_delay,
    supervise,
)

FAILED = "background task failed; starting it again"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """refresherd's logging, into memory: a function that returns the lines so far."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logs.reset()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def failures(metrics: Metrics, task: str) -> float:
    value = metrics.registry.get_sample_value(
        "refresherd_background_task_failures_total", {"task": task}
    )
    return value or 0.0


# --------------------------------------------------------------------------- the decision


def test_the_restart_delay_grows_exponentially_with_jitter_up_to_a_cap() -> None:
    assert restart_delay(1, rand=1.0) == RESTART_INITIAL
    assert restart_delay(1, rand=0.0) == RESTART_INITIAL / 2  # never near zero
    assert [restart_delay(n, rand=1.0) for n in (1, 2, 3, 4)] == [
        RESTART_INITIAL * 2**k for k in range(4)
    ]
    assert restart_delay(50, rand=1.0) == RESTART_MAX
    assert restart_delay(10_000, rand=0.5) == pytest.approx(RESTART_MAX * 0.75)
    for n in range(1, 40):
        for rand in (0.0, 0.3, 1.0):
            assert RESTART_INITIAL / 2 <= restart_delay(n, rand=rand) <= RESTART_MAX


def test_a_long_healthy_run_starts_the_backoff_over() -> None:
    assert failures_in_a_row(0, 0.1) == 1
    assert failures_in_a_row(5, 0.1) == 6
    assert failures_in_a_row(5, HEALTHY_RUN - 1) == 6
    assert failures_in_a_row(5, HEALTHY_RUN) == 1


# --------------------------------------------------------------------------- the supervisor


@pytest.mark.anyio
async def test_a_loop_that_raises_is_logged_counted_and_started_again(
    log_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    metrics = Metrics()
    runs = 0
    resumed = anyio.Event()

    async def scan() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"year {runs} is out of range")
        resumed.set()
        await anyio.sleep_forever()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: supervise("expiry", scan, metrics=metrics, rng=random.Random(1)))
            await resumed.wait()
            tg.cancel_scope.cancel()  # shutdown ends it, not counted as a failure
    assert runs == 3
    assert failures(metrics, "expiry") == 2
    lines = [line for line in log_lines() if line["event"] == FAILED]
    assert [line["failures_in_a_row"] for line in lines] == [1, 2]
    for line, expected in zip(lines, ("year 1", "year 2"), strict=True):
        assert line["task"] == "expiry" and line["level"] == "error"
        assert "Traceback" in line["exception"] and expected in line["exception"]
        assert "in scan" in line["exception"]  # the loop's own frame
    assert lines[1]["restart_in"] > lines[0]["restart_in"]


@pytest.mark.anyio
async def test_a_failure_inside_the_loop_s_own_task_group_is_restarted_too() -> None:
    """As in the hook dispatcher: a delivery task's exception reaches the supervisor wrapped in
    an ExceptionGroup."""
    metrics = Metrics()
    runs = 0

    async def dispatcher() -> None:
        nonlocal runs
        runs += 1

        async def deliver() -> None:
            if runs == 1:
                raise AttributeError("'bytes' object has no attribute 'encode'")

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)

    with anyio.fail_after(30):
        await supervise("hooks", dispatcher, metrics=metrics, rng=random.Random(1))
    assert runs == 2  # the second run returned: the supervisor with it
    assert failures(metrics, "hooks") == 1


@pytest.mark.anyio
async def test_cancellation_is_never_caught() -> None:
    metrics = Metrics()
    started = anyio.Event()

    async def gauges() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: supervise("gauges", gauges, metrics=metrics))
                await started.wait()
                scope.cancel()
    assert scope.cancelled_caught
    assert failures(metrics, "gauges") == 0


@pytest.mark.anyio
async def test_a_base_exception_is_not_a_failure_to_restart_after() -> None:
    class Stop(BaseException):
        pass

    async def loop() -> None:
        raise Stop

    metrics = Metrics()
    with pytest.raises(Stop):
        await supervise("gauges", loop, metrics=metrics)
    assert failures(metrics, "gauges") == 0


@pytest.mark.anyio
async def test_task_names_are_the_bounded_label_values() -> None:
    async def loop() -> None:
        pass

    with pytest.raises(ValueError, match="unknown background task"):
        await supervise("ts-0001", loop, metrics=Metrics())
    assert set(BACKGROUND_TASKS) == {"hooks", "expiry", "gauges"}


# --------------------------------------------------------------------------- the daemon


def test_the_daemon_survives_a_background_loop_that_fails(
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    """A real fault: a refresh-token lifetime of 100,000,000 days (check-config takes it) and
    a warning horizon as long put the expiry past the year 9999, which the expiry watcher's
    warning cannot spell. The watcher fails at every scan; the daemon logs it, counts it,
    starts the watcher again with growing delays, and goes on refreshing."""
    idp = idp_factory(access_token_lifetime=3, grace_period=5)
    db = tmp_path / "tokens.db"
    config = write_config(
        tmp_path / "c.toml",
        database=db,
        providers={"p": idp.provider(refresh_token_lifetime="100000000d")},
        schedule={"refresh_token_expiry_warning": "100000000d"},
    )
    import_tokens(config, idp.token_lines("p", 1))
    daemon = daemons(config)
    lines = daemon.wait_for_event(FAILED, task="expiry", count=2)
    assert [line["failures_in_a_row"] for line in lines[:2]] == [1, 2]
    assert "year" in lines[0]["exception"] and "Traceback" in lines[0]["exception"]
    assert lines[1]["restart_in"] > lines[0]["restart_in"]
    text = daemon.metrics()
    assert metric(text, "refresherd_background_task_failures_total", task="expiry") >= 2
    # Every task's series exists from the start, so increase() sees a first failure.
    present = {
        dict(labels).get("task")
        for name, labels in parse_metrics(text)
        if name == "refresherd_background_task_failures_total"
    }
    assert present == set(BACKGROUND_TASKS)
    assert metric(text, "refresherd_background_task_failures_total", task="gauges") == 0
    # Still alive, and still refreshing.
    wait_until(lambda: idp.ledger.refreshes >= 1, what="a refresh after the watcher failed")
    assert daemon.get("/healthz").status_code == 200
    assert daemon.running()
    assert daemon.stop() == 0
