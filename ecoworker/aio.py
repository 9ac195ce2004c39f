"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True when it is set.

    The shape every background loop sleeps in: an interval that a wake-up or
    a stop request can cut short.
    """
    if seconds <= 0 or event.is_set():
        return event.is_set()
    try:
        async with asyncio.timeout(seconds):  # wait_for would start a task for every wait
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()
