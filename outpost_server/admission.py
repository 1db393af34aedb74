"""Admission under a burst: starts beyond a limit wait for a free slot instead of failing.

When a hub is at its limit of starts in progress (``c.Outpost.max_concurrent_starts_per_hub``)
or a flavor's hub or total limit is reached (``c.Outpost.flavor_admission``), the
Outpost accepts the start as *queued* (``c.Outpost.start_admission = "queue"``): Start
returns at once (the server is STARTING, its row stored), and its Events say how many of
the hub's users are ahead ("3 users ahead of you, waiting for a free slot: ..."), updated
as the queue moves. When a slot frees the start proceeds; nothing of the Spawner has run
until then.

- FIFO per hub: a hub's starts are admitted in the order they came; one waiting for a
  full flavor does not hold up one of another flavor.
- Fair across hubs: a slot that any hub may take (a flavor's total) goes round the hubs
  in turn, one start per hub per round.
- Bounded: at most ``start_queue_limit`` starts of a hub wait (beyond, Start is refused
  with RESOURCE_EXHAUSTED as in "refuse" mode), each at most ``start_queue_timeout``
  seconds (then it fails with a FAILED event the user reads).
- A Stop of a queued start removes it from the queue (its Spawner never ran: nothing to
  stop). A shutdown fails every queued start with a message; a crash leaves their rows
  STARTING, and the restore fails them as any interrupted start (restore.py).

The queue decides nothing about limits itself: each waiter carries the manager's check
(``blocked``), asked again whenever a slot may have freed: when a start ends, a server
stops, and once a second while anything waits (a poll that finds a server gone frees a
flavor's slot without telling anyone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .aio import wait_event
from .records import Record

log = logging.getLogger("outpost.manager")

QUEUE = "queue"
REFUSE = "refuse"

#: the kinds of a wait: a hub's start limit holds up all its later starts (FIFO); a
#: flavor's limit holds up only the starts of that flavor
STARTS = "starts"
FLAVOR = "flavor"

#: (kind, why: the end of the user's sentence), or None: the start may proceed now
Blocked = tuple[str, str] | None


class QueueTimeout(Exception):
    """A queued start waited longer than start_queue_timeout; the message is for the user."""


class QueueClosed(Exception):
    """The Outpost shut down while the start waited; the message is for the user."""


@dataclass(eq=False)
class Waiter:
    """One queued start."""

    rec: Record
    #: the manager's check: why this start must wait now (None: it may start)
    blocked: Callable[[], Blocked]
    admitted: asyncio.Future
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: why it waited when last checked (for the user's message)
    why: str = ""


def waiting_message(ahead: int, why: str) -> str:
    """What a queued start's user reads on the spawn page."""
    if ahead == 0:
        return f"You are next, waiting for a free slot: {why}."
    users = "1 user" if ahead == 1 else f"{ahead} users"
    return f"{users} ahead of you, waiting for a free slot: {why}."


class StartQueue:
    """The queued starts of every hub (see the module's docstring)."""

    #: seconds between two checks of the waiters while any wait (besides the wake-ups)
    recheck_interval = 1.0

    def __init__(self, *, max_per_hub: int, timeout: float):
        self.max_per_hub = max_per_hub
        self.timeout = timeout
        self._hubs: dict[str, list[Waiter]] = {}
        #: the hub that was admitted a start last (the next round begins after it)
        self._last_hub: str | None = None
        self._ticker: asyncio.Task | None = None
        self._closed: BaseException | None = None

    def waiting(self, hub: str) -> int:
        """How many of hub's starts wait."""
        return len(self._hubs.get(hub, ()))

    def full(self, hub: str) -> bool:
        return self.waiting(hub) >= self.max_per_hub

    def enqueue(self, rec: Record, blocked: Callable[[], Blocked]) -> Waiter:
        """Queue rec's start (synchronously: the caller takes the record in the same step)."""
        waiter = Waiter(rec, blocked, asyncio.get_running_loop().create_future())
        rec.queued = True
        self._hubs.setdefault(rec.hub, []).append(waiter)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="start-queue")
        log.info(
            "Queued the start of %s/%s (%d of its hub waiting)", rec.hub, rec.name, self.waiting(rec.hub)
        )
        return waiter

    def ahead(self, waiter: Waiter) -> int:
        """How many of the hub's starts wait before waiter."""
        queue = self._hubs.get(waiter.rec.hub, [])
        return queue.index(waiter) if waiter in queue else 0

    async def wait(self, waiter: Waiter, notify: Callable[[str], Awaitable[None]]) -> None:
        """Wait until waiter is admitted, telling its user where it stands (``notify``
        with the message, each time it changes). QueueTimeout after the bound, QueueClosed
        at shutdown; a cancel (Stop) takes it out of the queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        shown = ""
        try:
            self.wake()  # a slot may be free already (another flavor's, say)
            while not waiter.admitted.done():
                message = waiting_message(self.ahead(waiter), waiter.why)
                if message != shown:
                    shown = message
                    await notify(message)
                    continue  # the queue may have moved while the event was written
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueTimeout(
                        f"No slot freed within {self.timeout:g} seconds ({waiter.why}). "
                        "Please try again later."
                    )
                waiter.changed.clear()
                await wait_event(waiter.changed, remaining)
            waiter.admitted.result()  # QueueClosed at shutdown
        finally:
            if self._remove(waiter):
                self.wake()  # the ones behind it moved up

    def _remove(self, waiter: Waiter) -> bool:
        """Take waiter out of its hub's queue (True if it was there)."""
        waiter.rec.queued = False
        queue = self._hubs.get(waiter.rec.hub)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        if not queue:
            del self._hubs[waiter.rec.hub]
        return True

    def _round(self) -> list[str]:
        """The hubs in this round's order: after the one admitted last."""
        hubs = list(self._hubs)
        if self._last_hub in hubs:
            i = hubs.index(self._last_hub) + 1
            hubs = hubs[i:] + hubs[:i]
        return hubs

    def wake(self) -> None:
        """Admit every start that may proceed now: rounds over the hubs, one start per
        hub per round, each hub's in order; then tell the rest where they stand."""
        if self._closed is not None:
            return
        admitted = True
        while admitted:
            admitted = False
            for hub in self._round():
                queue = list(self._hubs.get(hub, ()))
                for i, waiter in enumerate(queue):
                    blocked = waiter.blocked()
                    if blocked is not None:
                        waiter.why = blocked[1]
                        if blocked[0] == STARTS:  # the hub's limit: nobody behind it may pass
                            for behind in queue[i + 1 :]:
                                behind.why = blocked[1]
                            break
                        continue  # its flavor is full: others of the hub may start
                    self._remove(waiter)
                    waiter.admitted.set_result(None)
                    waiter.changed.set()
                    self._last_hub = hub
                    admitted = True
                    log.info("Admitted the queued start of %s/%s", hub, waiter.rec.name)
                    break  # one per hub per round
        for queue in self._hubs.values():
            for waiter in queue:
                waiter.changed.set()

    async def _tick(self) -> None:
        while self._hubs and self._closed is None:
            await asyncio.sleep(self.recheck_interval)
            self.wake()

    def close(self, error: BaseException) -> None:
        """Fail every waiting start with error (shutdown); nothing is admitted after."""
        self._closed = error
        if self._ticker is not None:
            self._ticker.cancel()
        for queue in self._hubs.values():
            for waiter in queue:
                if not waiter.admitted.done():
                    waiter.admitted.set_exception(error)
                    waiter.admitted.exception()  # retrieved: wait() raises it itself
                waiter.changed.set()
