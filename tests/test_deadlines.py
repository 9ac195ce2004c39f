"""Handler time limits (`ecoworker.deadlines.Deadlines`): one timer for all handlers, each
still cancelled at its own deadline, and a cancel that is not ours stays a cancel."""

from __future__ import annotations

import asyncio

import pytest

from ecoworker.deadlines import Deadlines

SLACK = 0.08  # how late a deadline may fire on a busy 2-core machine


async def sleeper(seconds: float, cancelled: list[bool] | None = None) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.append(True)
        raise
    return "done"


async def test_a_handler_past_its_deadline_is_cancelled_and_raises_timeout() -> None:
    """A coroutine still running at its deadline is cancelled (it sees CancelledError) and the
    caller gets TimeoutError, at the deadline; nothing stays watched afterwards."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    cancelled: list[bool] = []
    start = loop.time()
    with pytest.raises(TimeoutError):
        await deadlines.run(sleeper(10, cancelled), start + 0.2)
    assert cancelled == [True]
    assert 0.2 <= loop.time() - start < 0.2 + SLACK
    assert len(deadlines) == 0
    # the cancel was taken back: the task is not left "cancelling" (a later timeout in it works)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_each_handler_times_out_at_its_own_deadline() -> None:
    """Handlers started in turn, each with an earlier deadline than the one before (the timer
    must move earlier), and one that finishes in time: each expires at its own deadline."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    start = loop.time()
    ended: dict[str, float | str] = {}

    async def watched(name: str, deadline: float, seconds: float = 10) -> None:
        try:
            ended[name] = await deadlines.run(sleeper(seconds), start + deadline)
        except TimeoutError:
            ended[name] = loop.time() - start

    tasks = [asyncio.create_task(watched(f"d{d}", d)) for d in (0.5, 0.4, 0.3, 0.2)]
    tasks.append(asyncio.create_task(watched("in time", 0.3, seconds=0.1)))
    await asyncio.gather(*tasks)
    assert ended.pop("in time") == "done"
    for name, at in ended.items():
        deadline = float(name[1:])
        assert isinstance(at, float) and deadline <= at < deadline + SLACK, (name, at)
    assert len(deadlines) == 0


async def test_a_handler_that_finishes_in_time_is_left_alone() -> None:
    """A result before the deadline is returned, and the timer that fires later for it cancels
    nothing (the task goes on with other work past the old deadline)."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    assert await deadlines.run(sleeper(0.05), loop.time() + 0.15) == "done"
    await asyncio.sleep(0.3)  # past the deadline, in the same task: no stray cancel arrives
    assert len(deadlines) == 0


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    """A task cancelled by someone else (a shutdown) before its deadline gets CancelledError,
    not TimeoutError, and is no longer watched."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(deadlines.run(sleeper(10), loop.time() + 10))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0
