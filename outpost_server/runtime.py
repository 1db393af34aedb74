"""Runtime limits: at a server's end time the Outpost stops it on its own.

A start admitted under a flavor with a maximum runtime gets ``end_time = start_time +
max_runtime`` (:func:`end_time_for`), stored in its row with everything else of the start.
At that time :class:`RuntimeLimits` stops the server through the same path as a hub's
Stop (:meth:`LifecycleManager.stop` with the record's own start_id: a newer start of the
name is never touched, and a Stop of the hub at the same time shares the same stop), but
keeps the record, STOPPED with a ``stop_message`` for the user ("Your server was stopped
after its 8 h limit (flavor small)."), so that the hub learns it on its next Poll or
BatchPoll; the hub's Stop then forgets it, or it expires like any server that exited on
its own (expiry.py, ``exited_server_retention``).

Reliable across restarts without lock files: the end time lives in the database only.
At start-up every restored server is scheduled again; one whose end time passed while the
Outpost was down is stopped at once, in the background (the Outpost serves meanwhile).

One timer per server on the event loop (``loop.call_at``: a heap entry, no task, no
polling); a hub's Stop cancels it. The Spawner's ``stop()`` is bounded by
``cleanup_timeout``; one that fails or hangs is tried again after ``retry`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

from outpost_client.v1 import outpost_pb2 as pb

from .records import Record, Records

log = logging.getLogger("outpost.manager")

#: states of a server the runtime limit stops (a STOPPED one has ended already)
LIMITED = (
    pb.SERVER_STATE_STARTING,
    pb.SERVER_STATE_RUNNING,
    pb.SERVER_STATE_STOPPING,
    pb.SERVER_STATE_UNKNOWN,
)
#: seconds before a stop that failed or hung is tried again
RETRY = 60.0


def end_time_for(start_time: datetime, max_runtime: float) -> datetime | None:
    """The end time of a start admitted at start_time under a runtime of max_runtime
    seconds (0 or less: none)."""
    if not max_runtime or max_runtime <= 0:
        return None
    return start_time + timedelta(seconds=max_runtime)


def format_duration(seconds: float) -> str:
    """A runtime as people say it: "8 h", "1 h 30 min", "45 min", "90 s"."""
    seconds = max(0, round(seconds))
    if seconds >= 600:  # whole minutes suffice for longer runtimes
        seconds = round(seconds / 60) * 60
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours} h")
    if minutes:
        parts.append(f"{minutes} min")
    if secs or not parts:
        parts.append(f"{secs} s")
    return " ".join(parts)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def runtime_seconds(rec: Record) -> float:
    """The runtime rec was admitted with (its end time minus its start time)."""
    assert rec.end_time is not None
    return (_aware(rec.end_time) - _aware(rec.start_time)).total_seconds()


def _flavor(rec: Record) -> str:
    return rec.spec.flavor


def _limit(rec: Record) -> str:
    return f"{format_duration(runtime_seconds(rec))} limit"


def format_end_time(end: datetime, start: datetime) -> str:
    """When a server ends, for its user: "18:30 UTC", with the date if it is another day
    than the start's, with seconds if the runtime is under two minutes."""
    end, start = _aware(end).astimezone(timezone.utc), _aware(start).astimezone(timezone.utc)
    clock = "%H:%M:%S" if (end - start) < timedelta(minutes=2) else "%H:%M"
    if end.date() != start.date():
        clock = "%Y-%m-%d " + clock
    return end.strftime(clock) + " UTC"


def admitted_message(rec: Record) -> str:
    """The progress event that tells the user when the server ends ("" without an end
    time): "Your server will run until 18:30 UTC (8 h limit of flavor small)."."""
    if rec.end_time is None:
        return ""
    flavor = _flavor(rec)
    limit = _limit(rec) + (f" of flavor {flavor}" if flavor else "")
    return f"Your server will run until {format_end_time(rec.end_time, rec.start_time)} ({limit})."


def stop_message(rec: Record) -> str:
    """Why the Outpost stopped rec's server, for the user: "Your server was stopped after
    its 8 h limit (flavor small).\""""
    flavor = _flavor(rec)
    return f"Your server was stopped after its {_limit(rec)}" + (f" (flavor {flavor})." if flavor else ".")


Stop = Callable[..., Awaitable[tuple]]


class RuntimeLimits:
    """Stops every server at its end time (one timer per server with one)."""

    def __init__(self, records: Records, stop: Stop, *, timeout: float | None, retry: float = RETRY):
        self.records = records
        #: LifecycleManager.stop (hub, server_name, start_id, stop_message=, timeout=)
        self._stop = stop
        #: seconds the Spawner's stop() may take (c.Outpost.cleanup_timeout)
        self.timeout = timeout
        self.retry = retry
        self._timers: dict[Record, asyncio.TimerHandle] = {}
        self._stops: set[asyncio.Task] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """How many servers have a timer."""
        return len(self._timers)

    def schedule(self, rec: Record) -> None:
        """Stop rec's server at its end time (at once if that has passed); nothing if it
        has none or has ended already. Scheduling again replaces its timer."""
        if rec.end_time is None or rec.state not in LIMITED or self._closed:
            return
        self._arm(rec, _aware(rec.end_time).timestamp() - time.time())

    def schedule_all(self) -> int:
        """Schedule every server (after a restart); how many have a timer."""
        for rec in list(self.records.values()):
            self.schedule(rec)
        return self.pending

    def forget(self, rec: Record) -> None:
        """Cancel rec's timer (its hub stopped it, or it was replaced)."""
        timer = self._timers.pop(rec, None)
        if timer is not None:
            timer.cancel()

    def _arm(self, rec: Record, delay: float) -> None:
        self.forget(rec)
        loop = asyncio.get_running_loop()
        self._timers[rec] = loop.call_at(loop.time() + max(0.0, delay), self._due, rec)

    def _due(self, rec: Record) -> None:
        self._timers.pop(rec, None)
        if self._closed or not self.records.current(rec) or rec.state not in LIMITED or rec.end_time is None:
            return
        early = _aware(rec.end_time).timestamp() - time.time()
        if early > 0.001:  # the wall clock was set back since: not yet
            self._arm(rec, early)
            return
        if rec.stop_task is not None:
            return  # its hub is stopping it
        task = asyncio.create_task(self._end(rec), name=f"runtime-end-{rec.hub}-{rec.name}")
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _end(self, rec: Record) -> None:
        """Stop rec's server, keeping it STOPPED with its stop_message; retried later if
        its Spawner's stop() failed or hung."""
        if rec.spawner is None and not rec.spawner_state and rec.state == pb.SERVER_STATE_UNKNOWN:
            # restored without its Spawner (undecryptable state): nothing here can stop it
            log.warning(
                "%s/%s is past its end time, but the Outpost cannot stop it (its Spawner could not "
                "be restored); trying again in %gs. Stop it at the site if it still runs.",
                rec.hub, rec.name, self.retry,
            )  # fmt: skip
            self._arm(rec, self.retry)
            return
        message = stop_message(rec)
        log.info(
            "Stopping %s/%s (start %s): its runtime ended at %s",
            rec.hub, rec.name, rec.start_id, _aware(rec.end_time).isoformat(timespec="seconds"),
        )  # fmt: skip
        try:
            await self._stop(rec.hub, rec.name, rec.start_id, stop_message=message, timeout=self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self.records.current(rec) and rec.state in LIMITED and not self._closed:
                log.warning(
                    "Stopping %s/%s at the end of its runtime failed (%s); trying again in %gs",
                    rec.hub, rec.name, e, self.retry,
                )  # fmt: skip
                self._arm(rec, self.retry)

    def close(self) -> None:
        """At shutdown: no more timers; a stop not begun never begins (one under way is its
        record's stop task, which the manager's shutdown waits for)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._stops):
            task.cancel()
