"""Spawners the benchmarks run inside an Outpost process (not for production).

The Outpost imports them by name, e.g.
``--spawner-class benchmarks.bench_spawners.StampedProgressSpawner``, with the repository
root on its ``PYTHONPATH`` (``bench.py`` sets that up).
"""

from __future__ import annotations

import asyncio
import time

from jupyterhub.spawner import Spawner
from traitlets import Float, Integer

STAMP_PREFIX = "stamp="


def stamp_of(message: str) -> float | None:
    """The ``time.time()`` a StampedProgressSpawner put in an event message, if any."""
    head = message.split(" ", 1)[0]
    if not head.startswith(STAMP_PREFIX):
        return None
    try:
        return float(head[len(STAMP_PREFIX) :])
    except ValueError:
        return None


class StampedProgressSpawner(Spawner):
    """progress() yields `events` events, `interval` seconds apart, each stamped with the
    wall clock (``time.time()``) at the moment it is yielded; start() returns once the last
    one was taken. poll() says running, stop() does nothing: only the event path costs."""

    events = Integer(25, config=True, help="Progress events per start.")
    interval = Float(0.02, config=True, help="Seconds between two events.")
    first_delay = Float(
        0.3,
        config=True,
        help="Seconds before the first event (time for the client to attach to Events).",
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._all_yielded = asyncio.Event()

    async def start(self):
        # the manager cancels progress() once start() returns: return only after the last
        # event was taken (the generator resumes after its last yield only then)
        await asyncio.wait_for(self._all_yielded.wait(), self.first_delay + self.events * self.interval + 30)
        return ("127.0.0.1", 12345)

    async def progress(self):
        await asyncio.sleep(self.first_delay)
        for i in range(self.events):
            if i:
                await asyncio.sleep(self.interval)
            yield {
                "progress": int(100 * i / self.events),
                "message": f"{STAMP_PREFIX}{time.time():.6f} event {i + 1}",
            }
        self._all_yielded.set()

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None
