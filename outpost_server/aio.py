"""Two asyncio helpers the lifecycle code shares."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to timeout for event; True if it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives as the
    event is set, and the waiting task would run on after being cancelled.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def cancel_and_wait(task: asyncio.Future) -> None:
    """Cancel task and wait until it has ended, however it ends."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: what it did after the cancel no longer matters
