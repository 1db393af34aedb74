"""After a restart: every stored server back in memory, reconciled with its Spawner.

Running servers are polled (their Spawner made again from its stored state); starts the
restart interrupted are failed and what they made is stopped, through their Spawner's
state or, for local processes whose state was never stored, through the start marker
(orphans.py); rows written in plain text or under an older key are written again under
the first key.

Interrupted starts are failed and cleaned up in the background (each as its record's
``run``; the orphan sweep after them in :attr:`Restorer.cleanups`), each Spawner's stop()
bounded by ``cleanup_timeout``: one hung ``scancel`` never keeps the Outpost from serving.
Until its clean-up ends, such a server shows STARTING.
"""

from __future__ import annotations

import asyncio
import logging

from outpost_client.errors import Unavailable
from outpost_client.v1 import outpost_pb2 as pb

from . import convert, orphans
from .journal import Journal
from .poller import SpawnerPoller
from .records import Record, Records
from .spawners import SpawnerFactory
from .starts import StartRun
from .store import Store

log = logging.getLogger("outpost.manager")

RESTART_DURING_START = "The Outpost restarted while this server was starting. Please start it again."


class RestartDuringStart(Exception):
    pass


class Restorer:
    """Loads the stored servers into ``records`` and reconciles each with its Spawner."""

    def __init__(
        self,
        store: Store,
        records: Records,
        *,
        spawners: SpawnerFactory,
        poller: SpawnerPoller,
        journal: Journal,
        certs_dir: str | None,
        max_events: int,
        cleanup_timeout: float | None = None,
    ):
        self.store = store
        self.records = records
        self.spawners = spawners
        self.poller = poller
        self.journal = journal
        self.certs_dir = certs_dir
        self.max_events = max_events
        self.cleanup_timeout = cleanup_timeout
        #: the background clean-ups of interrupted starts (done ones drop out)
        self.cleanups: set[asyncio.Task] = set()

    async def restore(self) -> int:
        """Load every persisted server and reconcile it; the number of servers loaded."""
        rows, events = await self.store.load()
        unreadable: set[Record] = set()
        stale: list[Record] = []
        for row in rows:
            rec = Record.from_row(row, events.get((row["hub"], row["server_name"]), []), max_events=self.max_events)
            self.records.put(rec)
            if row.get("crypt_error"):
                # never reconciled nor written: its row stays as it is, for the right key
                log.error(
                    "Cannot decrypt the stored env and Spawner state of %s/%s (%s): it is UNKNOWN "
                    "until the Outpost restarts with the key it was written with in crypt_keys",
                    rec.hub, rec.name, row["crypt_error"],
                )  # fmt: skip
                rec.state = pb.SERVER_STATE_UNKNOWN
                unreadable.add(rec)
            elif row.get("crypt_stale"):
                stale.append(rec)
        interrupted = {
            orphans.start_marker(r.hub, r.name, r.start_id): r
            for r in self.records.values()
            if r.state == pb.SERVER_STATE_STARTING and r not in unreadable
        }
        await asyncio.gather(*(self._reconcile(r) for r in list(self.records.values()) if r not in unreadable))
        if interrupted:
            runs = self._fail_interrupted(interrupted)
            self._in_background(self._sweep_after(runs, interrupted), "sweep-interrupted-starts")
        await self._reencrypt(stale)
        return len(rows)

    async def _reconcile(self, rec: Record) -> None:
        if rec.state == pb.SERVER_STATE_STOPPED:
            return
        try:
            self.spawners.restored(rec)
        except Exception:
            log.exception("Could not recreate the Spawner of %s/%s", rec.hub, rec.name)
            rec.state = pb.SERVER_STATE_UNKNOWN
            return
        if rec.state == pb.SERVER_STATE_STARTING:
            return  # failed and cleaned up in the background (_fail_interrupted)
        try:
            await self.poller.poll_one(rec)
        except Unavailable:
            pass  # the database is down: the next poll writes what changed
        log.info("Restored %s/%s: %s", rec.hub, rec.name, convert.STATE_NAMES[rec.state])

    def _in_background(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    def _fail_interrupted(self, interrupted: dict[str, Record]) -> list[asyncio.Task]:
        """Fail the starts the restart interrupted, in the background, and stop what they
        made (each stop() bounded by cleanup_timeout): their tasks.

        Each runs as its record's ``run`` (StartRun.launch_failure): a Stop meanwhile
        cancels it and stops the Spawner itself; a Start of the name is refused until
        then (the server is STARTING)."""
        runs = []
        for rec in interrupted.values():
            if rec.spawner is None:
                continue  # its Spawner could not be made again: UNKNOWN (_reconcile)
            log.warning("%s/%s was starting when the Outpost stopped; cleaning up", rec.hub, rec.name)
            run = StartRun(rec, self.journal, certs_dir=self.certs_dir, start_message="",
                           cleanup_timeout=self.cleanup_timeout, tails=self.poller.tails)  # fmt: skip
            run.launch_failure(RestartDuringStart(RESTART_DURING_START))
            runs.append(run.task)
        return runs

    async def _sweep_after(self, runs: list[asyncio.Task], interrupted: dict[str, Record]) -> None:
        """Once the interrupted starts' clean-ups ended, sweep what their Spawners could
        not reach."""
        if runs:
            await asyncio.wait(runs)
        await self._sweep_orphans(interrupted)

    async def _sweep_orphans(self, interrupted: dict[str, Record]) -> None:
        """Stop what the interrupted starts' Spawners could not reach (their state was
        never stored): local processes carrying the start's marker."""
        stopped = await asyncio.to_thread(orphans.stop_marked, set(interrupted))
        for marker, pids in stopped.items():
            rec = interrupted[marker]
            log.warning("Stopped processes %s left by the interrupted start of %s/%s", pids, rec.hub, rec.name)

    async def _reencrypt(self, stale: list[Record]) -> None:
        """Write rows in plain text or under an older key again, under the first key."""
        ops = [
            self.store.op_update_server(
                r.hub, r.name, env=r.spec.env, spawner_state=r.spawner_state, auth_state=r.spec.auth_state
            )
            for r in stale
            if self.records.current(r)
        ]
        if not ops:
            return
        try:
            await self.store.write(*ops)
            log.info("Re-encrypted %d servers' rows with the first crypt key", len(ops))
        except Unavailable:
            log.warning("Could not re-encrypt %d rows; the next start-up tries again", len(ops))
