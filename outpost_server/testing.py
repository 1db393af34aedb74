"""Spawners for tests, benchmarks and fault injection. Not for production.

Use them by import string, e.g. ``c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"``.
"""

from __future__ import annotations

import asyncio

from jupyterhub.spawner import Spawner
from traitlets import Float, Integer, Unicode


class InstantSpawner(Spawner):
    """start() returns at once, poll() says running: measures the Outpost, not a Spawner."""

    async def start(self):
        return ("127.0.0.1", 12345)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

    async def progress(self):
        # no progress events: only the Outpost's terminal event
        if False:
            yield {}


class SlowSpawner(Spawner):
    """Takes `delay` seconds to start, yielding progress events on the way."""

    delay = Float(1.0, config=True, help="Seconds start() takes.")
    steps = Integer(4, config=True, help="Progress events during the start.")
    stopped = False

    async def start(self):
        await asyncio.sleep(self.delay)
        return ("127.0.0.1", 23456)

    async def progress(self):
        for i in range(self.steps):
            yield {"progress": int(100 * i / self.steps), "message": f"Step {i + 1} of {self.steps}"}
            await asyncio.sleep(self.delay / self.steps)

    async def poll(self):
        return 0 if self.stopped else None

    async def stop(self, now=False):
        self.stopped = True


class FailingSpawner(Spawner):
    """start() raises with a message meant for the user."""

    error_message = Unicode("No GPU left for you today", config=True, help="The message.")

    async def start(self):
        await asyncio.sleep(0.05)
        raise QuotaExceeded(self.error_message)

    async def poll(self):
        return 0

    async def stop(self, now=False):
        return None

    async def progress(self):
        yield {"progress": 10, "message": "Checking your quota"}


class QuotaExceeded(Exception):
    """The kind of exception a real Spawner raises when a site limit is hit."""


class NeverReadySpawner(Spawner):
    """start() never returns (until cancelled)."""

    async def start(self):
        await asyncio.Event().wait()

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


class FailingPollSpawner(InstantSpawner):
    """Starts, then every poll() raises: the Outpost must report UNKNOWN, not stopped."""

    async def poll(self):
        raise RuntimeError("scheduler unreachable")
