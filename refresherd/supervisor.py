"""The daemon's background loops, kept running through their own faults.

Each loop (hook delivery, the expiry watcher, the database gauges) handles the failures it
expects, such as a :class:`StoreError`. Anything else is a fault nobody foresaw, and it must
not end the daemon, whose refreshes do not depend on these loops. :func:`supervise` runs one:
an unexpected exception is logged once with the loop's name and traceback, counted in
``refresherd_background_task_failures_total{task}``, and the loop is started again after a
backoff (:func:`policy.backoff_delay`: exponential, jittered, capped), which starts over once
the loop has run well for a while. Cancellation is shutdown and is never caught: it ends the
loop and its supervisor.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from refresherd import policy
from refresherd.logs import get_logger
from refresherd.metrics import BACKGROUND_TASKS, Metrics

log = get_logger("refresherd.supervisor")

RESTART_INITIAL: Final = 1.0
# A loop that keeps failing is tried again at least this often: a fault that goes away (a
# store that answers again) is recovered from without a restart of the daemon.
RESTART_MAX: Final = 300.0
# A loop that ran this long before it failed starts over from the first delay.
HEALTHY_RUN: Final = 600.0


def failures_in_a_row(previous: int, ran: float) -> int:
    """The count of failures the backoff is planned from, after one that ended a run of
    ``ran`` seconds: a long healthy run forgets the earlier ones."""
    return 1 if ran >= HEALTHY_RUN else previous + 1


def restart_delay(failures: int, *, rand: float) -> float:
    """Seconds before a loop that failed ``failures`` times in a row is started again."""
    return policy.backoff_delay(failures, initial=RESTART_INITIAL, maximum=RESTART_MAX, rand=rand)


async def supervise(
    task: str,
    loop: Callable[[], Awaitable[None]],
    *,
    metrics: Metrics,
    rng: random.Random | None = None,
) -> None:
    """Run ``loop`` until it returns or is cancelled, starting it again after a failure.

    ``task`` names it in the log and the metric: one of :data:`BACKGROUND_TASKS`, so that the
    label stays bounded."""
    if task not in BACKGROUND_TASKS:
        raise ValueError(f"unknown background task {task!r}")
    rng = rng or random.Random()
    failures = 0
    while True:
        started = anyio.current_time()
        try:
            await loop()
        except Exception:  # not BaseException: cancellation (shutdown) must pass
            failures = failures_in_a_row(failures, anyio.current_time() - started)
            delay = restart_delay(failures, rand=rng.random())
            metrics.background_task_failures.labels(task).inc()
            log.exception(
                "background task failed; starting it again",
                task=task,
                failures_in_a_row=failures,
                restart_in=round(delay, 1),
            )
        else:
            return
        await anyio.sleep(delay)
