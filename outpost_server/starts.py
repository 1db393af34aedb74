"""One accepted start while it runs: :class:`StartRun` owns its tasks.

Beside the Spawner's ``start()`` run two helpers: a checkpoint that stores the Spawner's
state as soon as it changes (what lets a restarted Outpost stop what a crashed start
made), and a follower that turns the Spawner's ``progress()`` into events. The start
ends in the READY event (address stored) or in :func:`fail_start` (FAILED event, the
Spawner stopped, its certificates removed).

The address a start ends with is checked before it is stored: an address an active server
of another hub already has fails the start. A notebook reports its own port (the
batchspawner callback), so without the check a notebook user could claim another hub's
server's address. (Two servers of one hub with one address are not refused here; the SSH
forwarder forwards to neither.)
"""

from __future__ import annotations

import asyncio
import logging
import time

from jupyterhub.spawner import Spawner

from outpost_client.errors import Unavailable
from outpost_client.v1 import outpost_pb2 as pb

from . import convert, metrics
from .aio import cancel_and_wait, wait_event
from .hosting import certs_location, install_certificates, maybe_await, normalise_address
from .journal import Journal
from .output_tail import OutputTails
from .records import ACTIVE, Record, Records
from .runtime import admitted_message
from .spawners import recall_state, remove_start_certificates, run_post_stop_hook, safe_state, user_message

log = logging.getLogger("outpost.manager")


class StartRun:
    """The running start of one record (``rec.run`` until it ends)."""

    #: seconds between two comparisons of the Spawner's state with the stored one
    checkpoint_interval = 1.0

    def __init__(
        self,
        rec: Record,
        journal: Journal,
        *,
        certs_dir: str | None,
        start_message: str,
        records: Records | None = None,
        cleanup_timeout: float | None = None,
        tails: OutputTails | None = None,
    ):
        self.rec = rec
        self.journal = journal
        self.certs_dir = certs_dir
        self.start_message = start_message
        #: every server (to refuse an address another one has); None: not checked
        self.records = records
        self.cleanup_timeout = cleanup_timeout
        #: the notebook's output tail for a failed start (None: none is got)
        self.tails = tails
        self.task: asyncio.Task | None = None
        #: when the start was accepted (time.monotonic()), for its duration's metric
        self.accepted_at = time.monotonic()

    def launch(self) -> None:
        rec = self.rec
        rec.run = self
        self.task = asyncio.create_task(self._run(), name=f"start-{rec.hub}-{rec.name}")

    def launch_failure(self, error: BaseException) -> None:
        """Fail the start in the background (a start the Outpost's restart interrupted):
        :func:`fail_start`, as ``rec.run`` until it ends, so a Stop meanwhile cancels the
        clean-up and stops the Spawner itself, and a shutdown waits for it as for a start."""
        rec = self.rec
        rec.run = self
        self.task = asyncio.create_task(self._fail(error), name=f"clean-up-{rec.hub}-{rec.name}")

    async def _fail(self, error: BaseException) -> None:
        try:
            await fail_start(
                self.rec, error, self.journal, self.certs_dir, cleanup_timeout=self.cleanup_timeout, tails=self.tails
            )
        finally:
            if self.rec.run is self:
                self.rec.run = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def cancel(self) -> None:
        """End the start now (Stop): the Spawner's start() is cancelled and has ended
        when this returns; what it raised no longer matters."""
        assert self.task is not None
        await cancel_and_wait(self.task)

    async def _run(self) -> None:
        rec = self.rec
        spawner = rec.spawner
        assert spawner is not None
        progress_task: asyncio.Task | None = None
        try:
            spawner._spawn_pending = True
            spawner._start_pending = True
            if self.start_message:
                message = self.start_message.format(spawner_class=type(spawner).__name__, user=rec.spec.user["name"])
                await self.journal.emit(rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": message}, durable=False)
            if until := admitted_message(rec):  # its runtime's end (runtime.py)
                await self.journal.emit(rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": until}, durable=False)
            await maybe_await(spawner.run_pre_spawn_hook())
            if rec.spec.certificates:
                # as JupyterHub does after create_certs: move_certs, then start
                await install_certificates(
                    spawner, rec.spec.certificates, *certs_location(rec.hub, rec.name, rec.start_id, self.certs_dir)
                )
                rec.spec.certificates = {}  # on disk now; not kept in memory too
            checkpoint_task = asyncio.create_task(self._checkpoint(spawner))
            if self.tails is not None:
                self.tails.attach(rec, spawner)  # a local process's output, captured
            start = asyncio.ensure_future(spawner.start())
            spawner._spawn_future = start
            progress_task = asyncio.create_task(self._follow_progress(spawner))
            try:
                try:
                    done, _ = await asyncio.wait({start}, timeout=spawner.start_timeout)
                except asyncio.CancelledError:
                    checkpoint_task.cancel()  # what a cancelled Spawner forgets is not stored
                    await cancel_and_wait(start)  # Stop or shutdown: the start ends first
                    raise
                checkpoint_task.cancel()
                if not done:
                    await cancel_and_wait(start)
                    raise asyncio.TimeoutError()
            finally:
                if self.tails is not None:
                    self.tails.started(rec, spawner)
            scheme, host, port = normalise_address(start.result(), spawner)
            self._check_address(host, port)
            spawner._spawn_pending = spawner._start_pending = False
            await self._stop_progress(progress_task)
            progress_task = None
            await self._ready(spawner, {"scheme": scheme, "host": host, "port": port})
            self._observe("success")
        except asyncio.CancelledError:
            if progress_task is not None:
                progress_task.cancel()
            if not self.journal.closing:
                self._observe("cancelled")
            if self.journal.closing:
                # shutdown: keep what the Spawner knows, so a restart can clean up (or
                # what the checkpoint knew, if the cancel made the Spawner forget it)
                rec.spawner_state = safe_state(spawner) or rec.spawner_state
                try:
                    await self.journal.write(rec, spawner_state=rec.spawner_state)
                except Exception:
                    log.exception("Could not persist state of %s/%s", rec.hub, rec.name)
            raise  # cancelled by Stop: Stop cleans up
        except Exception as e:
            if progress_task is not None:
                await self._stop_progress(progress_task)
            await fail_start(
                rec, e, self.journal, self.certs_dir, cleanup_timeout=self.cleanup_timeout, tails=self.tails
            )
            self._observe("failure")
        finally:
            if rec.run is self:
                rec.run = None

    def _observe(self, status: str) -> None:
        """The start's duration from accepted to its end, when metrics are served."""
        if metrics.enabled:
            seconds = time.monotonic() - self.accepted_at
            metrics.SERVER_START_DURATION.labels(self.rec.hub, status).observe(seconds)

    def _check_address(self, host: str, port: int) -> None:
        """AddressInUse if an active server of another hub has host:port already.

        Two starts that end with the same address at the same moment can both pass;
        the SSH forwarder then forwards to neither (LifecycleManager.forward_targets).
        """
        if self.records is None:
            return
        holder = address_holder(self.records, host, port, hub=self.rec.hub)
        if holder is None:
            return
        rec = self.rec
        log.warning(
            "Start of %s/%s ended with the address %s:%d, which %s/%s (%s) already has: failing it",
            rec.hub, rec.name, host, port, holder.hub, holder.name, convert.STATE_NAMES[holder.state],
        )  # fmt: skip
        raise AddressInUse(
            f"The server reported the address {host}:{port}, which another server on this "
            "Outpost already uses, so it was stopped. Please start it again; if this "
            "repeats, ask the site's administrators (the notebook may report a wrong port)."
        )

    async def _ready(self, spawner: Spawner, address: dict) -> None:
        rec = self.rec
        spawner_state = spawner.get_state()

        def running() -> None:
            rec.address = address
            rec.state = pb.SERVER_STATE_RUNNING
            rec.spawner_state = spawner_state

        url = "{scheme}://{host}:{port}".format(**address)
        await self.journal.emit(
            rec,
            {"kind": pb.EVENT_KIND_READY, "message": f"Server ready at {url}", "progress": 100, "address": address},
            durable=True,
            apply=running,
            state="running",
            spawner_state=spawner_state,
            **address,
        )
        log.info("%s/%s started at %s", rec.hub, rec.name, url)

    async def _checkpoint(self, spawner: Spawner) -> None:
        """While start() runs, store the Spawner's state as soon as it changes.

        The state (a pid, a job id) is what lets a restarted Outpost stop what a start
        made; without it a crash mid-start leaves an orphan. Spawners keep what
        get_state() returns in traits, so any trait change wakes this at once; a
        comparison every ``checkpoint_interval`` catches state kept elsewhere. The row
        stays STARTING: a restart fails the start and stops what the state names.
        """
        rec = self.rec
        woken = asyncio.Event()

        def on_change(_change) -> None:
            woken.set()

        spawner.observe(on_change)
        stored = rec.spawner_state
        try:
            while rec.state == pb.SERVER_STATE_STARTING and rec.spawner is spawner:
                await wait_event(woken, self.checkpoint_interval)
                woken.clear()
                state = safe_state(spawner)
                if not state or state == stored:
                    continue
                try:
                    await self.journal.write(rec, spawner_state=state)
                except Unavailable:
                    log.warning("Could not store the state of starting %s/%s yet", rec.hub, rec.name)
                    continue
                stored = rec.spawner_state = state
                log.debug("Stored the state of starting %s/%s", rec.hub, rec.name)
        finally:
            spawner.unobserve(on_change)

    async def _follow_progress(self, spawner: Spawner) -> None:
        """Emit the Spawner's progress events; a repeat of the last one is dropped.

        Pollers repeat themselves (batchspawner yields "Pending in queue..." every second
        while a job waits): each repeat would be a database write and a line in the
        user's event log, saying nothing new.
        """
        rec = self.rec
        last = None
        try:
            async for item in spawner.progress():
                data = convert.event_from_spawner(item)
                if data == last:
                    continue
                last = dict(data)
                await self.journal.emit(rec, data, durable=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("progress() of %s/%s raised; ignoring it", rec.hub, rec.name)

    async def _stop_progress(self, task: asyncio.Task) -> None:
        """Let progress() deliver what it already has, then stop it.

        Holding the record's lock, the cancel never lands in the middle of an event's
        write: it lands while progress() waits for its next item.
        """
        await asyncio.sleep(0)
        async with self.rec.lock:
            if not task.done():
                task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class AddressInUse(Exception):
    """A start ended with an address another active server already has."""


def address_holder(records: Records, host: str, port: int, *, hub: str) -> Record | None:
    """An active server of a hub other than hub whose address is host:port, if any."""
    for other in records.of_other_hubs(hub):
        address = other.address
        if (
            address
            and address["port"] == port
            and address["host"] == host
            and other.state in ACTIVE
        ):
            return other
    return None


async def stop_bounded(rec: Record, spawner: Spawner, timeout: float | None) -> None:
    """``spawner.stop(now=True)`` for a clean-up, given up after ``timeout`` seconds.

    A clean-up stop that hangs (an ``scancel`` that never returns) must not hold up
    what waits for it (a failed start's FAILED event, the restore at start-up): it is
    cancelled and left behind, with a WARNING; what it should have stopped may still run.
    """
    task = asyncio.ensure_future(spawner.stop(now=True))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()  # not awaited: a stop() that ignores the cancel is left behind
        log.warning(
            "Clean-up stop() of %s/%s did not finish within %gs (c.Outpost.cleanup_timeout): "
            "abandoned it; what it should have stopped may still run at the site",
            rec.hub, rec.name, timeout,
        )  # fmt: skip
        return
    try:
        task.result()
    except Exception:
        log.exception("Cleanup stop() of %s/%s raised", rec.hub, rec.name)


async def fail_start(
    rec: Record,
    error: BaseException,
    journal: Journal,
    certs_dir: str | None,
    *,
    cleanup_timeout: float | None = None,
    tails: OutputTails | None = None,
) -> None:
    """End rec's start as failed: stop its Spawner (with the state the checkpoint stored;
    given up after ``cleanup_timeout`` seconds), remove its certificates, then the FAILED
    event with a message for the user and the end of the notebook's output (``tails``:
    got before the stop, while the Spawner still knows its job)."""
    message = user_message(error)
    if isinstance(error, asyncio.TimeoutError) and rec.spawner is not None:
        message = f"The server did not start within {rec.spawner.start_timeout:g} seconds."
    log.error("Start of %s/%s failed: %s", rec.hub, rec.name, message, exc_info=error)
    tail = ""
    if rec.spawner is not None:
        recall_state(rec.spawner, rec.spawner_state)  # what the checkpoint stored
        spawner = rec.spawner
        if tails is not None:
            tail = await tails.read(rec, spawner, rec.spawner_state)
            if tail:
                log.info("Last output of %s/%s:\n%s", rec.hub, rec.name, tail)
        await stop_bounded(rec, spawner, cleanup_timeout)
        run_post_stop_hook(spawner)
    remove_start_certificates(rec, certs_dir)
    error_class = type(error).__name__
    if metrics.enabled:
        metrics.SERVER_START_FAILURES.labels(rec.hub, error_class).inc()

    def stopped() -> None:
        rec.state = pb.SERVER_STATE_STOPPED
        rec.failure_message = message
        rec.error_class = error_class
        rec.output_tail = tail
        rec.spawner_state = None
        rec.spawner = None

    event = {"kind": pb.EVENT_KIND_FAILED, "message": message, "error_class": error_class}
    if tail:
        event["output_tail"] = tail
    await journal.emit(
        rec,
        event,
        durable=True,
        apply=stopped,
        state="stopped",
        spawner_state=None,
        failure_message=message,
        error_class=error_class,
    )
