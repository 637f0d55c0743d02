"""deadlines.fail_after: anyio.fail_after, except that a pause of the whole process (SIGSTOP, a
frozen VM) does not cut short a body whose answer arrived meanwhile. The pause is simulated by a
clock that jumps forward, as the monotonic clock does across a SIGSTOP; the end-to-end case
(a real daemon stopped and continued) is tests/test_races.py."""

from __future__ import annotations

import time

import anyio
import pytest

from refresherd import deadlines

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_body_that_finishes_in_time_is_left_alone() -> None:
    async with deadlines.fail_after(5.0):
        await anyio.sleep(0.01)


async def test_a_body_that_overruns_gets_timeout_error() -> None:
    reached = False
    with pytest.raises(TimeoutError):
        async with deadlines.fail_after(0.05):
            await anyio.sleep(30)
            reached = True
    assert not reached


async def test_after_a_pause_the_body_gets_a_moment_to_read_what_is_waiting() -> None:
    jumped = 0.0

    def clock() -> float:
        return time.monotonic() + jumped

    async with deadlines.fail_after(0.05, clock=clock):
        await anyio.sleep(0.01)  # the timer is running
        # The process "stops" for an hour: its timer fires an hour late.
        jumped = 3600.0
        await anyio.sleep(0.3)  # longer than the deadline, shorter than AFTER_PAUSE
    assert deadlines.AFTER_PAUSE > 0.3


async def test_after_a_pause_a_body_that_still_hangs_times_out() -> None:
    jumped = 0.0

    def clock() -> float:
        return time.monotonic() + jumped

    with pytest.raises(TimeoutError):
        async with deadlines.fail_after(0.05, clock=clock):
            await anyio.sleep(0.01)
            jumped = 3600.0
            await anyio.sleep(30)


async def test_what_the_body_raises_comes_out_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with deadlines.fail_after(5.0):
            raise KeyError("x")
