"""deadlines.fail_after: anyio.fail_after, except that a pause of the whole process (SIGSTOP, a
frozen VM) does not cut short a body whose answer arrived meanwhile. The pause is simulated by a
clock that jumps forward, as the monotonic clock does across a SIGSTOP; the end-to-end case
(a real daemon stopped and continued) is tests/test_races.py."""

from __future__ import annotations

import asyncio
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


def _stall_loop(seconds: float) -> None:
    """Block the event loop, so that timers due meanwhile all fire in one turn after it."""
    time.sleep(seconds)


async def test_an_answer_that_lands_as_the_deadline_passes_is_kept() -> None:
    """The answer is in (the future the body awaits is done) when the deadline fires in the
    same turn of the loop: the body resumes with the answer (say a rotated token), never a
    CancelledError in its place, and no cancellation is left behind for later."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, _stall_loop, 0.15)
    loop.call_later(0.04, answer.set_result, "rotated token")
    async with deadlines.fail_after(0.05):
        got = await answer
    assert got == "rotated token"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await anyio.sleep(0.01)  # nothing pending: a stray cancellation would land here


async def test_a_cancellation_from_outside_goes_on_up_as_it_came() -> None:
    with anyio.move_on_after(0.05) as outer:
        async with deadlines.fail_after(5.0):
            await anyio.sleep(30)
    assert outer.cancelled_caught


async def test_outside_cancellation_and_the_deadline_together_stay_a_cancellation() -> None:
    """Shutdown cancels the task in the same turn as the deadline passes: the cancellation
    is not turned into TimeoutError (which a caller would handle as a slow IdP)."""
    loop = asyncio.get_running_loop()
    with anyio.CancelScope() as outer:
        loop.call_later(0.01, _stall_loop, 0.15)
        loop.call_later(0.04, outer.cancel)
        async with deadlines.fail_after(0.05):
            await anyio.sleep(30)
    assert outer.cancelled_caught
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_body_that_swallows_the_cancellation_is_cancelled_again() -> None:
    swallowed = 0
    with pytest.raises(TimeoutError):
        async with deadlines.fail_after(0.05):
            try:
                await anyio.sleep(30)
            except asyncio.CancelledError:
                swallowed += 1
            await anyio.sleep(30)
    assert swallowed == 1


async def test_after_a_timeout_the_task_carries_no_cancellation() -> None:
    """Each cancellation the deadline sent is taken back: an enclosing scope and the rest of
    the task go on as if none had been sent."""
    task = asyncio.current_task()
    assert task is not None
    with anyio.CancelScope() as outer:
        with pytest.raises(TimeoutError):
            async with deadlines.fail_after(0.02):
                await anyio.sleep(30)
        assert task.cancelling() == 0
        await anyio.sleep(0.01)
    assert not outer.cancelled_caught


async def test_a_deadline_in_a_shielded_scope_still_times_out() -> None:
    with anyio.CancelScope(shield=True), pytest.raises(TimeoutError):
        async with deadlines.fail_after(0.02):
            await anyio.sleep(30)


async def test_an_outer_scope_cancelled_in_the_same_turn_ends_where_it_should() -> None:
    """The body waits on a task (aiohttp waits on its writer so): the deadline's cancellation
    and an enclosing scope's land together, and the one CancelledError that comes out carries
    the deadline's message. The scope still takes it for its own and ends there, as it did
    when the deadline was an anyio scope."""
    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(asyncio.sleep(30))
    with anyio.CancelScope() as outer:
        loop.call_later(0.01, _stall_loop, 0.15)
        loop.call_later(0.05, outer.cancel)
        async with deadlines.fail_after(0.04):
            await inner
    assert outer.cancelled_caught
    assert inner.cancelled()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
