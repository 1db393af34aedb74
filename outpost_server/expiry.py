"""Stopped servers their hub never stopped: forgotten after the site's retention time.

A failed start keeps its record (its events, its encrypted env with the notebook's API
token) so that the hub can show why it failed, and a server that exited on its own keeps
its exit code; a hub stops both on its next poll. One that does not (a hub that is down,
lost its database, or is hostile) would keep them for ever, each counting towards its
``max_servers_per_hub``. The sweep here stops them as that hub's Stop would:
:meth:`LifecycleManager.stop` with the record's own start_id, so the deletion is
conditional on that start (a newer start of the same name is never touched), a Stop of
the hub at the same time shares the same stop, and an exited server's Spawner gets its
``stop()`` and ``post_stop_hook`` as it would have.

What never expires: servers that are starting, running, stopping or UNKNOWN (their
notebook may still run, or their stored state could not be decrypted: only a Stop ends
them), and, with a retention of 0, stopped servers of that kind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timezone

from outpost_client.v1 import outpost_pb2 as pb

from .records import Record, Records

log = logging.getLogger("outpost.manager")

#: most servers one sweep deletes (the rest wait for the next round)
BATCH = 500
#: the longest time between two sweeps, in seconds
MAX_INTERVAL = 60.0


def ended_at(rec: Record) -> float:
    """When rec's server stopped (seconds since the epoch), as far as its record tells."""
    if rec.stopped_at is not None:
        return rec.stopped_at
    if rec.terminal and rec.events.items:  # a failed start: its FAILED event's time
        when = rec.events.items[-1][1].get("time")
        if isinstance(when, (int, float)):
            return float(when)
    start = rec.start_time
    if start.tzinfo is None:  # SQLite gives naive datetimes; they are UTC
        start = start.replace(tzinfo=timezone.utc)
    return start.timestamp()


class RecordExpiry:
    """Finds stopped servers past their retention and stops them (a periodic sweep)."""

    def __init__(
        self,
        records: Records,
        stop: Callable[[str, str, str], Awaitable[tuple]],
        *,
        failed_retention: float,
        exited_retention: float,
        batch: int = BATCH,
        stop_timeout: float = 60.0,
    ):
        self.records = records
        self._stop = stop
        self.failed_retention = failed_retention
        self.exited_retention = exited_retention
        self.batch = batch
        #: how long one sweep waits for its stops; a stop still running then goes on on
        #: its own (it is the record's stop_task: the next sweeps leave it alone)
        self.stop_timeout = stop_timeout
        self._loop_task: asyncio.Task | None = None
        self._stops: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.failed_retention > 0 or self.exited_retention > 0

    @property
    def interval(self) -> float:
        """Seconds between sweeps: a quarter of the shortest retention, at most a minute."""
        shortest = min(r for r in (self.failed_retention, self.exited_retention) if r > 0)
        return max(0.01, min(MAX_INTERVAL, shortest / 4))

    def retention(self, rec: Record) -> float:
        """rec's retention in seconds; 0: it does not expire."""
        if rec.state != pb.SERVER_STATE_STOPPED:
            return 0.0
        return self.failed_retention if rec.failure_message else self.exited_retention

    def expired(self, at: float | None = None) -> list[Record]:
        """The stopped servers past their retention at ``at`` (now), oldest first, at most
        ``batch`` of them; those being stopped already are left out."""
        at = time.time() if at is None else at
        due = []
        for rec in self.records.values():
            retention = self.retention(rec)
            if retention > 0 and rec.stop_task is None and (ended := ended_at(rec)) + retention <= at:
                due.append((ended, rec))
        due.sort(key=lambda item: item[0])
        return [rec for _, rec in due[: self.batch]]

    async def sweep(self, at: float | None = None) -> int:
        """Stop every expired server (up to ``batch``); how many were stopped."""
        due = self.expired(at)
        if not due:
            return 0
        for rec in due:
            kind = "failed start" if rec.failure_message else "exited server"
            log.info(
                "Expiring %s/%s (start %s): a %s its hub has not stopped within %gs",
                rec.hub, rec.name, rec.start_id, kind, self.retention(rec),
            )  # fmt: skip
        tasks = [asyncio.ensure_future(self._stop(rec.hub, rec.name, rec.start_id)) for rec in due]
        self._stops.update(tasks)
        for task in tasks:
            task.add_done_callback(self._stops.discard)
        done, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
        stopped = failed = 0
        for task in done:
            if task.cancelled() or task.exception() is not None:
                failed += 1
            elif task.result()[0] == pb.STOP_OUTCOME_STOPPED:
                stopped += 1  # (not: STALE_START_ID, a new start of the name came first)
        for task in tasks:
            task.add_done_callback(_log_failure)
        log.info(
            "Expired %d stopped servers their hubs had not stopped (%d failed, %d still stopping)",
            stopped, failed, len(pending),
        )  # fmt: skip
        return stopped

    def start(self) -> None:
        if self.enabled and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="outpost-expiry")

    def stop(self) -> None:
        """Stop the schedule. A stop under way is its record's stop task (shielded: the
        manager's shutdown waits for it); one not begun yet never begins."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        for task in list(self._stops):
            task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("Expiring stopped servers failed")


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("Expiring a stopped server failed (the next sweep tries again): %s", error)
