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
from outpost_client.errors import TooManyServers, TooManyStarts
from outpost_client.v1 import outpost_pb2 as pb

from . import convert
from .flavors import Flavor, FlavorSet, Usage, limit_refusal
from .records import Record, Records

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


class Admission:
    """What the site's limits say of a new start: go now, wait in the queue, or be refused
    (RESOURCE_EXHAUSTED) — the hub's concurrent starts (max_concurrent_starts_per_hub),
    the servers it holds (max_servers_per_hub), a flavor's limits and the per-user cap
    (flavors.py). Counts come from memory (the records); the manager asks, then takes the
    record in the same step, so nothing is admitted between the count and the taking."""

    def __init__(self, settings, records: Records, queue: StartQueue):
        self.settings = settings
        self.records = records
        self.queue = queue
        # hub -> records put in STARTING (pruned lazily)
        self._starting: dict[str, set[Record]] = {}

    def starting(self, hub: str, rec: Record) -> None:
        """rec is a new start of hub (it counts until it is no longer STARTING)."""
        self._starting.setdefault(hub, set()).add(rec)

    def starts_in_progress(self, hub: str) -> int:
        """How many of hub's servers are STARTING (those being accepted included), not
        counting starts waiting in the queue nor those whose Spawner's start() has returned
        (launched: only the readiness check is left, which costs the site nothing)."""
        starting = self._starting.get(hub)
        if not starting:
            return 0
        ended = [r for r in starting if r.state != pb.SERVER_STATE_STARTING or not self.records.current(r)]
        starting.difference_update(ended)
        return sum(1 for r in starting if not r.queued and not r.launched)

    def start_limit_reached(self, hub: str) -> bool:
        limit = self.settings.max_concurrent_starts_per_hub
        return limit > 0 and self.starts_in_progress(hub) >= limit

    def check_start_limit(self, hub: str) -> bool:
        """Whether a new start of hub must wait (True: queue it). Refuses it
        (RESOURCE_EXHAUSTED) while hub is at its limit of starts in "refuse" mode, or
        when its queue is full too."""
        queueing = self.settings.start_admission == QUEUE
        if not self.start_limit_reached(hub) and not (queueing and self.queue.waiting(hub)):
            return False  # a free slot, and nobody of the hub waits before it (FIFO)
        limit = self.settings.max_concurrent_starts_per_hub
        in_progress = self.starts_in_progress(hub)
        if not queueing:
            log.warning("Refused a start of hub %r: %d starts in progress (the limit)", hub, in_progress)
            raise TooManyStarts(
                f"Hub {hub!r} already has {in_progress} server starts in progress on this "
                "Outpost (the limit); try again when one of them finishes.",
                metadata={"limit": str(limit)},
            )
        self.check_queue_room(hub)
        return True

    def check_queue_room(self, hub: str) -> None:
        """Refuse a start that would have to wait (RESOURCE_EXHAUSTED) when hub's queue is full."""
        if not self.queue.full(hub):
            return
        waiting = self.queue.waiting(hub)
        log.warning("Refused a start of hub %r: %d starts already wait (c.Outpost.start_queue_limit)", hub, waiting)
        raise TooManyStarts(
            f"Hub {hub!r} already has {self.starts_in_progress(hub)} server starts in progress "
            f"and {waiting} waiting on this Outpost (the limits); try again when one of them finishes.",
            metadata={"limit": str(self.settings.max_concurrent_starts_per_hub), "queue_limit": str(waiting)},
        )

    def blocked(self, hub: str, spec: convert.StartSpec, flavor: Flavor | None) -> Blocked:
        """Why a queued start must still wait (admission.py), or None: it may start now.
        A queued start's user limits were checked when it was accepted; what is left is
        the hub's limit of starts and its flavor's hub and total limits."""
        if self.start_limit_reached(hub):
            limit = self.settings.max_concurrent_starts_per_hub
            starts = "1 server" if limit == 1 else f"{limit} servers"
            return STARTS, f"this Outpost starts at most {starts} of your hub at a time"
        if flavor is not None:
            usage = self.flavor_usage(flavor.name, hub, spec.user["name"])
            refusal = limit_refusal(flavor, Usage(total=usage.total, hub=usage.hub), 0)
            if refusal is not None:
                return FLAVOR, f"every server of flavor {flavor.name!r} that may run is in use"
        return None

    def server_limit(self, hub: str) -> int:
        """How many servers hub may hold (0: no limit)."""
        return self.settings.max_servers_by_hub.get(hub, self.settings.max_servers_per_hub)

    def check_server_limit(self, hub: str) -> None:
        """Refuse a new server (RESOURCE_EXHAUSTED) while hub holds as many as it may, in any
        state: a stopped or failed one counts until the hub stops it or it expires."""
        limit = self.server_limit(hub)
        if limit <= 0:
            return
        held = len(self.records.of_hub(hub))
        if held >= limit:
            log.warning("Refused a new server of hub %r: it holds %d servers (the limit)", hub, held)
            servers = "1 server" if held == 1 else f"{held} servers"
            raise TooManyServers(
                f"This Outpost already holds {servers} of your hub {hub!r}, the most it "
                "allows (stopped and failed ones count until they are stopped). Stop a "
                "server you no longer need, or ask your hub's administrators, then try again.",
                metadata={"limit": str(limit)},
            )

    def flavor_usage(self, flavor: str, hub: str, user_name: str) -> Usage:
        """Active servers of flavor (in total, of hub, of hub's user) and of that user
        across flavors, from memory."""
        of_flavor = self.records.active_of_flavor(flavor) if flavor else []
        admitted = [r for r in of_flavor if not r.queued]  # a queued start holds no server yet
        return Usage(
            total=len(admitted),
            hub=sum(1 for r in admitted if r.hub == hub),
            # a user's own queued starts count: they hold the user's claim
            user=sum(1 for r in of_flavor if r.hub == hub and r.user_name == user_name),
            user_total=len(self.records.active_of_user(hub, user_name)),
        )

    def check_flavor_limits(self, hub: str, spec: convert.StartSpec, flavor: Flavor | None, flavors: FlavorSet) -> bool:
        """Refuse (RESOURCE_EXHAUSTED, FLAVOR_LIMIT_REACHED) a start beyond a limit of its
        flavor or the site's per-user cap; True: it waits for its flavor's hub or total
        limit instead (c.Outpost.flavor_admission "queue"; a user's own limits are always
        refused: only the user can free them). Synchronous: the caller takes the record
        in the same step, so no other start can be admitted between the count and the
        taking."""
        if flavor is None and flavors.max_servers_per_user <= 0:
            return False
        user = spec.user["name"]
        usage = self.flavor_usage(spec.flavor, hub, user)
        refusal = limit_refusal(flavor, usage, flavors.max_servers_per_user)
        if (
            refusal is not None
            and self.settings.flavor_admission == QUEUE
            and refusal.metadata["limit"] in ("hub", "total")
        ):
            self.check_queue_room(hub)
            return True
        if refusal is not None:
            log.warning(
                "Refused a start of %s/%s (user %r, flavor %r): %s limit %s reached",
                hub, spec.server_name, user, spec.flavor, refusal.metadata["limit"], refusal.metadata["max"],
            )  # fmt: skip
            raise refusal
