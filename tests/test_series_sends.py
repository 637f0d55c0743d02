"""The sends of one grace window side by side (refresherd.refresh.series._Sends): answers in
the order they land, a wait that gives up without abandoning a send, a send's own error raised
rather than waited for, and close() ending every send, even for a caller being cancelled.

Real asyncio tasks on the daemon's loop; the refresher-level behaviour (hedges, a cancelled
refresh) is in tests/test_refresher.py."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from refresherd.model import Attempt, Grant, Secret
from refresherd.refresh.series import _Answer, _Sends

ATTEMPT = Attempt(version=1, started_at=0.0, owner="owner-a", sends=1, settled=0)


def answer(access_token: str) -> _Answer:
    grant = Grant(
        access_token=Secret(access_token),
        refresh_token=None,
        expires_in=3600,
        token_type="Bearer",
        scope=None,
    )
    return _Answer(ATTEMPT, grant, None, 0.0)


async def after(seconds: float, access_token: str) -> _Answer:
    await anyio.sleep(seconds)
    return answer(access_token)


async def raising(message: str) -> _Answer:
    """A send that fails past its own handling (a bug)."""
    await anyio.sleep(0)
    raise RuntimeError(message)


def token(a: _Answer | None) -> str:
    assert a is not None and a.grant is not None
    return a.grant.access_token.reveal()


@pytest.mark.anyio
async def test_answers_come_in_the_order_they_land() -> None:
    sends = _Sends()
    sends.start(after(0.2, "slow"))
    sends.start(after(0.01, "fast"))
    assert token(await sends.next()) == "fast"
    assert token(await sends.next()) == "slow"
    await sends.close()


@pytest.mark.anyio
async def test_a_wait_that_gives_up_leaves_the_send_out() -> None:
    sends = _Sends()
    sends.start(after(0.2, "late"))
    assert await sends.next(timeout=0.01) is None
    assert token(await sends.next()) == "late"


@pytest.mark.anyio
async def test_what_a_send_raises_is_raised_not_waited_for() -> None:
    sends = _Sends()
    sends.start(after(5.0, "never"))
    sends.start(raising("a bug past the send's own handling"))
    with anyio.fail_after(2), pytest.raises(RuntimeError, match="a bug"):
        await sends.next()
    await sends.close()


@pytest.mark.anyio
async def test_close_ends_every_send_even_for_a_cancelled_caller() -> None:
    ended: list[str] = []

    async def stalled(name: str) -> _Answer:
        try:
            await anyio.sleep(30)
        finally:
            ended.append(name)
        return answer(name)

    sends = _Sends()
    sends.start(stalled("first"))
    sends.start(stalled("hedge"))
    await anyio.sleep(0.01)
    with anyio.CancelScope() as scope:
        scope.cancel()  # the caller is being cancelled: close still waits for both
        await sends.close()
    assert sorted(ended) == ["first", "hedge"]
    assert sends.grants() == []


@pytest.mark.anyio
async def test_a_grant_that_landed_unread_is_kept_through_close() -> None:
    sends = _Sends()
    sends.start(after(0.0, "landed"))
    sends.start(after(30.0, "stalled"))
    await anyio.sleep(0.05)  # the first has landed; nobody read it (the series was cancelled)
    await sends.close()
    assert [g.access_token.reveal() for g in sends.grants()] == ["landed"]


@pytest.mark.anyio
async def test_a_grant_whose_answer_is_in_but_not_yet_run_is_kept_through_close() -> None:
    """A send whose awaited I/O has completed (its future resolved: the IdP's answer is in,
    the task is runnable) when close() runs must finish with its grant, as under an anyio task
    group, whose cancellation never lands on a task whose awaited future is already done."""
    loop = asyncio.get_running_loop()
    bytes_in: asyncio.Future[None] = loop.create_future()

    async def answered() -> _Answer:
        await bytes_in  # aiohttp's read of the response body, resolved by data_received
        return answer("rotated")

    sends = _Sends()
    sends.start(answered())
    await anyio.sleep(0.01)  # the send is out, waiting for the answer
    bytes_in.set_result(None)  # the answer lands (a protocol callback) ...
    await sends.close()  # ... and the series' owner closes in the same loop iteration
    assert [g.access_token.reveal() for g in sends.grants()] == ["rotated"]


@pytest.mark.anyio
async def test_a_send_cancelled_by_anything_but_close_is_raised_not_waited_for() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()

    async def stray() -> _Answer:
        await never
        return answer("never")

    sends = _Sends()
    sends.start(stray())
    await anyio.sleep(0.01)
    never.cancel()  # a library's stray CancelledError, say: no answer will ever come
    with anyio.fail_after(2), pytest.raises(RuntimeError, match="cancelled outside"):
        await sends.next()
    assert await sends.close() is None  # raised already: nothing left to say


@pytest.mark.anyio
async def test_close_hands_back_an_error_nobody_read() -> None:
    sends = _Sends()
    sends.start(after(0.0, "grant"))
    sends.start(raising("a bug after another send brought the grant"))
    assert token(await sends.next()) == "grant"  # the series ends here, with its grant
    await anyio.sleep(0.01)
    error = await sends.close()
    assert isinstance(error, RuntimeError) and "a bug" in str(error)
