"""One accepted start while it runs: :class:`StartRun` owns its tasks.

Beside the Spawner's ``start()`` run two helpers: a checkpoint that stores the Spawner's
state as soon as it changes (what lets a restarted Outpost stop what a crashed start
made), and a follower that turns the Spawner's ``progress()`` into events. The start
ends in the READY event (address stored) or in :func:`fail_start` (FAILED event, the
Spawner stopped, its certificates removed).

The address a start ends with is what start() returned, or the address the server's job
reported through the relay's late-address endpoint (late.py: :meth:`StartRun._address`
defines when each is used). It is checked before it is stored: an address an active server
of another hub already has fails the start. A notebook reports its own port (the
batchspawner callback), so without the check a notebook user could claim another hub's
server's address. (Two servers of one hub with one address are not refused here; the SSH
forwarder forwards to neither.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from jupyterhub.spawner import Spawner

from outpost_client.errors import Unavailable
from outpost_client.v1 import outpost_pb2 as pb

from . import convert, metrics, readiness
from .admission import StartQueue, Waiter
from .aio import cancel_and_wait, wait_event
from .hosting import certs_location, install_certificates, maybe_await, normalise_address
from .journal import Journal
from .late import ReportRefused
from .output_tail import OutputTails
from .records import ACTIVE, Record, Records
from .runtime import admitted_message
from .spawners import recall_state, remove_start_certificates, run_post_stop_hook, safe_state, user_message

log = logging.getLogger("outpost.manager")


@dataclass(frozen=True)
class Readiness:
    """The readiness check's settings (readiness.py; the Outpost traits of these names)."""

    readiness_timeout: float
    readiness_max_interval: float


class StartRun:
    """The running start of one record (``rec.run`` until it ends)."""

    #: seconds between two comparisons of the Spawner's state with the stored one
    checkpoint_interval = 1.0
    #: seconds between two polls of a Spawner whose job has yet to report its address
    late_poll_interval = 2.0

    def __init__(
        self,
        rec: Record,
        journal: Journal,
        *,
        certs_dir: str | None,
        start_message: str,
        records: Records | None = None,
        cleanup_timeout: float | None = None,
        queue: StartQueue | None = None,
        waiter: Waiter | None = None,
        readiness: Readiness | None = None,
        on_end: Callable[[], None] | None = None,
        tails: OutputTails | None = None,
    ):
        self.rec = rec
        self.journal = journal
        self.certs_dir = certs_dir
        self.start_message = start_message
        #: every server (to refuse an address another one has); None: not checked
        self.records = records
        self.cleanup_timeout = cleanup_timeout
        #: the admission queue and this start's place in it, if it was queued (admission.py)
        self.queue = queue
        self.waiter = waiter
        #: READY only once the notebook answers at the site (readiness.py); None: at once
        self.readiness = readiness
        #: called when the run ends, and when its Spawner's start() returned (a start slot
        #: may have freed: the manager wakes its queue)
        self.on_end = on_end
        #: whether the Spawner's start() was called (a queued start stopped before it was
        #: admitted has nothing at the site to stop)
        self.spawner_called = False
        #: the notebook's output tail for a failed start (None: none is got)
        self.tails = tails
        self.task: asyncio.Task | None = None
        #: when the start was accepted (time.monotonic()), for its duration's metric
        self.accepted_at = time.monotonic()
        #: the job's late address (host, port) once reported (late.py); ``reported`` is
        #: set then
        self.late_address: tuple[str, int] | None = None
        self.reported = asyncio.Event()
        #: whether a report may still end this start (only while _run waits for its address)
        self.accepts_report = False
        #: seconds a running start() has after the report (c.HubAPIRelay.late_address_grace)
        self.late_grace = 0.0

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
            if self.waiter is not None:
                assert self.queue is not None
                await self.queue.wait(self.waiter, self._notify_waiting)
            if self.start_message:
                message = self.start_message.format(spawner_class=type(spawner).__name__, user=rec.spec.user["name"])
                await self.journal.emit(rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": message}, durable=False)
            if until := admitted_message(rec):  # its runtime's end (runtime.py)
                await self.journal.emit(rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": until}, durable=False)
            # as JupyterHub does before a start: the auth_state hook (with the user's
            # auth_state the hub sent, or None), then the pre-spawn hook
            await spawner.run_auth_state_hook(await spawner.user.get_auth_state())
            await maybe_await(spawner.run_pre_spawn_hook())
            if rec.spec.certificates:
                # as JupyterHub does after create_certs: move_certs, then start
                await install_certificates(
                    spawner, rec.spec.certificates, *certs_location(rec.hub, rec.name, rec.start_id, self.certs_dir)
                )
                rec.spec.certificates = {}  # on disk now; not kept in memory too
            checkpoint_task = asyncio.create_task(self._checkpoint(spawner))
            self.accepts_report = True
            self.spawner_called = True
            if self.tails is not None:
                self.tails.attach(rec, spawner)  # a local process's output, captured
            start = asyncio.ensure_future(spawner.start())
            spawner._spawn_future = start
            progress_task = asyncio.create_task(self._follow_progress(spawner))
            try:
                scheme, host, port = await self._address(spawner, start, checkpoint_task)
            finally:
                checkpoint_task.cancel()
                self.accepts_report = False
                if self.tails is not None:
                    self.tails.started(rec, spawner)
            self._check_address(host, port)
            if self.readiness is not None:
                # the Spawner's work is done: its start slot goes to the next in the queue
                rec.launched = True
                if self.on_end is not None:
                    self.on_end()
                await self._wait_answers(spawner, scheme, host, port)
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
                rec, e, self.journal, self.certs_dir,
                cleanup_timeout=self.cleanup_timeout, stop_spawner=self.spawner_called, tails=self.tails,
            )  # fmt: skip
            self._observe("failure")
        finally:
            if rec.run is self:
                rec.run = None
            if self.on_end is not None:
                self.on_end()

    async def _notify_waiting(self, message: str) -> None:
        """A queued start's place, as a progress event (admission.py)."""
        await self.journal.emit(self.rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": message}, durable=False)

    async def _wait_answers(self, spawner: Spawner, scheme: str, host: str, port: int) -> None:
        """Until the notebook answers at the site, bounded (readiness.py)."""
        settings = self.readiness
        assert settings is not None
        rec = self.rec
        # the site's bound, or the Spawner's own: how long JupyterHub gives a server to answer
        bound = settings.readiness_timeout or float(getattr(spawner, "http_timeout", 0) or 30)
        url = readiness.check_url(scheme, host, port, rec.spec.env.get("JUPYTERHUB_SERVICE_PREFIX", "/"))
        context = readiness.ssl_context(getattr(spawner, "cert_paths", None)) if scheme == "https" else None

        async def exited() -> int | None:
            return await maybe_await(spawner.poll())

        took = await readiness.wait_until_answers(
            url,
            timeout=bound,
            max_interval=settings.readiness_max_interval,
            context=context,
            exited=exited,
        )
        if took is None:
            log.warning(
                "The notebook of %s/%s did not answer at %s within %gs (%s): "
                "READY anyway, the hub's own check decides (last: %s). If the Outpost cannot "
                "reach its notebooks, set c.Outpost.readiness_check = False.",
                rec.hub, rec.name, url, bound,
                "c.Outpost.readiness_timeout" if settings.readiness_timeout else "the Spawner's http_timeout",
                readiness.last_miss.pop(url, "?"),
            )  # fmt: skip
        else:
            readiness.last_miss.pop(url, None)
            log.debug("The notebook of %s/%s answered at %s after %.2fs", rec.hub, rec.name, url, took)

    async def _address(self, spawner: Spawner, start: asyncio.Future, checkpoint_task: asyncio.Task):
        """Wait for start() (and, where it gives none, the job's late address: late.py)
        within the Spawner's start_timeout; the address the start ends with.

        Cancelled (Stop, shutdown) or timed out: start() is cancelled and has ended first
        (the checkpoint before it: what a cancelled Spawner forgets is not stored)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spawner.start_timeout
        reported = asyncio.ensure_future(self.reported.wait())
        try:
            done, _ = await asyncio.wait(
                {start, reported}, timeout=spawner.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if start not in done and reported in done:
                # the job reported while start() still runs: start() gets the grace to
                # return (one that waits for self.port, like batchspawner's, does)
                grace = max(0.0, min(self.late_grace, deadline - loop.time()))
                done, _ = await asyncio.wait({start}, timeout=grace)
                if start not in done:
                    checkpoint_task.cancel()
                    await cancel_and_wait(start)
                    # a cancelled batchspawner forgets its job id: the stored state has it
                    recall_state(spawner, self.rec.spawner_state)
                    log.info(
                        "start() of %s/%s had not returned %gs after the job reported its address: "
                        "cancelled it (c.HubAPIRelay.late_address_grace); the server runs at the reported address",
                        self.rec.hub, self.rec.name, self.late_grace,
                    )  # fmt: skip
                    return self._late(spawner)
        except asyncio.CancelledError:
            checkpoint_task.cancel()
            await cancel_and_wait(start)  # Stop or shutdown: the start ends first
            raise
        finally:
            reported.cancel()
        if start not in done:
            checkpoint_task.cancel()
            await cancel_and_wait(start)
            raise asyncio.TimeoutError()
        result = start.result()  # what start() raised fails the start
        if self.late_address is None and result is None and not spawner.port:
            await self._wait_for_report(spawner, deadline)
        if self.late_address is not None:
            return self._late(spawner)
        return normalise_address(result, spawner)

    def _late(self, spawner: Spawner) -> tuple[str, str, int]:
        assert self.late_address is not None
        scheme = "https" if getattr(spawner, "internal_ssl", False) else "http"
        return scheme, self.late_address[0], self.late_address[1]

    async def _wait_for_report(self, spawner: Spawner, deadline: float) -> None:
        """start() returned no address: wait until the job reports one (late.py), polling
        the Spawner every ``late_poll_interval`` seconds; a job that ends first fails the
        start, and so does the deadline (start_timeout)."""
        rec = self.rec
        loop = asyncio.get_running_loop()
        log.info("%s/%s: start() returned no address; waiting for the job to report it", rec.hub, rec.name)
        await self.journal.emit(
            rec,
            {"kind": pb.EVENT_KIND_PROGRESS, "message": "Submitted; waiting for the notebook to report its address"},
            durable=False,
        )
        while self.late_address is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            await wait_event(self.reported, min(self.late_poll_interval, remaining))
            if self.late_address is not None:
                return
            try:
                status = await maybe_await(spawner.poll())
            except Exception:
                log.exception("poll() of %s/%s raised while its job had yet to report its address", rec.hub, rec.name)
                continue
            if status is not None:
                raise LateAddressMissing(
                    f"The notebook's job ended (exit status {status}) before it reported its address."
                )

    def report_address(self, host: str, port: int, grace: float) -> None:
        """The job's late address (the relay checked its token and the site's limits):
        it becomes the address this start ends with. ReportRefused (409) if the start
        has a reported address already, has ended, or another active server has it."""
        rec = self.rec
        if self.late_address is not None:
            raise ReportRefused(409, "this start has a reported address already")
        if not self.accepts_report or rec.run is not self or rec.state != pb.SERVER_STATE_STARTING or rec.spawner is None:
            raise ReportRefused(409, "this server is not starting")
        if self.records is not None:
            for other in self.records.values():
                address = other.address
                if other is not rec and address and address["host"] == host and address["port"] == port and (
                    other.state in ACTIVE
                ):
                    raise ReportRefused(409, f"{host}:{port} is the address of another server on this Outpost")
        self.late_address = (host, port)
        self.late_grace = grace
        spawner = rec.spawner
        spawner.ip, spawner.port = host, port
        self.reported.set()

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


class LateAddressMissing(Exception):
    """start() returned no address and the job ended before it reported one."""


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
    stop_spawner: bool = True,
    tails: OutputTails | None = None,
) -> None:
    """End rec's start as failed: stop its Spawner (with the state the checkpoint stored;
    given up after ``cleanup_timeout`` seconds; not with ``stop_spawner`` False: a queued
    start whose Spawner never ran), remove its certificates, then the FAILED event with a
    message for the user and the end of the notebook's output (``tails``: got before the
    stop, while the Spawner still knows its job); its stored auth_state is deleted with it."""
    message = user_message(error)
    if isinstance(error, asyncio.TimeoutError) and rec.spawner is not None:
        message = f"The server did not start within {rec.spawner.start_timeout:g} seconds."
    log.error("Start of %s/%s failed: %s", rec.hub, rec.name, message, exc_info=error)
    tail = ""
    if rec.spawner is not None and stop_spawner:
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
        rec.spec.auth_state = None  # its clean-up is done: the user's credentials go

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
        auth_state=None,
        failure_message=message,
        error_class=error_class,
    )
