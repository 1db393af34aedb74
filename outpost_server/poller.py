"""The Outpost's own schedule of Spawner polls.

Poll RPCs never call a Spawner: they answer from the record, which this poller keeps
up to date by calling each running Spawner's ``poll()`` every ``interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from jupyterhub.spawner import Spawner

from outpost_client.errors import Unavailable
from outpost_client.v1 import outpost_pb2 as pb

from .journal import Journal
from .output_tail import OutputTails
from .records import Record, Records
from .spawners import safe_state

log = logging.getLogger("outpost.manager")

POLLED = (pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_UNKNOWN)


class SpawnerPoller:
    """Polls every running server's Spawner on a schedule; stores and shows the answers."""

    def __init__(
        self,
        records: Records,
        journal: Journal,
        *,
        interval: float,
        timeout: float,
        concurrency: int,
        tails: OutputTails | None = None,
    ):
        self.records = records
        #: the notebook's output tail when poll() says it exited (None: none is got)
        self.tails = tails
        self.journal = journal
        self.interval = interval
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="outpost-poller")

    def stop(self) -> list[asyncio.Task]:
        """Stop the schedule; the polls still running (never cancelled, see _run)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        return [rec.poll_task for rec in self.records.values() if rec.poll_task is not None]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll_round()
            except Exception:
                log.exception("Polling the Spawners failed")

    def poll_round(self) -> list[asyncio.Task]:
        """Begin a poll of every running server that is not being polled already.

        A round does not wait for its polls: one slow or hung poll() (a batch scheduler
        that does not answer) delays nobody else's, and its server is left out of the
        next rounds until it answers. At most ``concurrency`` poll() calls run at once.
        """
        tasks = []
        for rec in self.records.values():
            if rec.state in POLLED and rec.stop_task is None and (task := self._begin(rec)) is not None:
                tasks.append(task)
        return tasks

    async def poll_all(self) -> None:
        """Poll every running server's Spawner once and wait for the answers."""
        tasks = self.poll_round()
        if tasks:
            await asyncio.wait(tasks)

    async def poll_one(self, rec: Record) -> None:
        """Poll rec's Spawner, waiting up to ``timeout`` for its answer."""
        task = self._begin(rec)
        if task is not None:
            await asyncio.wait({task}, timeout=self.timeout)

    def _begin(self, rec: Record) -> asyncio.Task | None:
        spawner = rec.spawner
        if spawner is None or rec.poll_task is not None:
            return None  # gone, or its last poll() still runs
        rec.poll_task = asyncio.create_task(self._run(rec, spawner), name=f"poll-{rec.hub}-{rec.name}")
        return rec.poll_task

    def _set_unknown(self, rec: Record) -> None:
        if rec.state != pb.SERVER_STATE_UNKNOWN and rec.stop_task is None:
            rec.state = pb.SERVER_STATE_UNKNOWN
            rec.changed()

    def _overran(self, rec: Record) -> None:
        log.warning(
            "poll() of %s/%s has taken over %gs; it is UNKNOWN until poll() answers",
            rec.hub, rec.name, self.timeout,
        )  # fmt: skip
        self._set_unknown(rec)

    async def _run(self, rec: Record, spawner: Spawner) -> None:
        """One poll() of rec's Spawner, then its answer stored and shown.

        poll() is never cancelled: a Spawner may turn a cancel into an answer
        (batchspawner reads its killed ``squeue`` as "job not found", forgets the job
        and returns 1: a notebook declared dead while it runs). One that takes over
        ``timeout`` makes the server UNKNOWN meanwhile; its answer still counts.
        """
        try:
            async with self._slots:
                overran = asyncio.get_running_loop().call_later(self.timeout, self._overran, rec)
                try:
                    result = await spawner.poll()
                except Exception as e:
                    log.warning("poll() of %s/%s failed: %s: %s", rec.hub, rec.name, type(e).__name__, e)
                    self._set_unknown(rec)
                    return
                finally:
                    overran.cancel()
            try:
                await self._apply(rec, spawner, result)
            except Unavailable:
                log.warning("Could not store the poll result of %s/%s; the next poll does", rec.hub, rec.name)
        finally:
            rec.poll_task = None

    async def _apply(self, rec: Record, spawner: Spawner, result) -> None:
        """Store what poll() said, then show it (a failed write shows nothing: the next
        poll of the server, still RUNNING or UNKNOWN, writes it again)."""

        def current() -> bool:
            return rec.stop_task is None and rec.spawner is spawner and self.records.current(rec)

        if not current():
            return  # stopped while we polled
        new_state = safe_state(spawner)
        if result is None:
            if rec.state == pb.SERVER_STATE_RUNNING and new_state == rec.spawner_state:
                return
            await self.journal.write(rec, state="running", spawner_state=new_state)
            if current():
                rec.state = pb.SERVER_STATE_RUNNING
                rec.spawner_state = new_state
                rec.changed()
            return
        exit_code = int(result)
        tail = ""
        if self.tails is not None:
            # before the state is replaced: the stored one still names the job
            tail = await self.tails.read(rec, spawner, rec.spawner_state)
            if not current():
                return
        await self.journal.write(rec, state="stopped", exit_code=exit_code, spawner_state=new_state)
        if current():
            log.info("%s/%s exited with status %s", rec.hub, rec.name, result)
            if tail:
                log.info("Last output of %s/%s:\n%s", rec.hub, rec.name, tail)
            rec.output_tail = tail
            rec.state = pb.SERVER_STATE_STOPPED
            rec.stopped_at = time.time()  # expires after exited_server_retention (expiry.py)
            rec.exit_code = exit_code
            rec.spawner_state = new_state
            rec.changed()
