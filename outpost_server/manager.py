"""The lifecycle manager: admission of starts, and what the RPCs ask of the servers.

The manager is the only owner of Spawner objects and their tasks, and it composes the
rooms of that job, each in its own module:

- records.py: every server in memory (:class:`Record`, its event log, the table);
- journal.py: the database write before anything changes in memory;
- starts.py: one running start and its tasks (start, checkpoint, progress);
- poller.py: the Outpost's own schedule of Spawner polls;
- expiry.py: stopped servers their hub never stopped, forgotten after a retention time;
- runtime.py: servers stopped at their end time (a flavor's runtime), kept STOPPED;
- restore.py: servers restored and reconciled after a restart;
- spawners.py: making a record's Spawner, and the guarded calls into it.

What stays here is admission (Start: idempotency, the per-hub limits of starts and of
servers, override policy, flavors: flavors.py decides, the count is here) and the other RPCs' operations: Events, Poll, BatchPoll, ListServers, Stop, and
the SSH forwarder's question, which addresses a hub may reach.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, fields

from outpost_client.errors import (
    OutpostError,
    PersistenceUnavailable,
    ServerAlreadyStarted,
    ServerNotFound,
    ShuttingDown,
    SpawnerError,
    StartNotFound,
    Unavailable,
)
from outpost_client.v1 import outpost_pb2 as pb

from . import convert
from .accounts import AccountPolicy
from .admission import Admission, QueueClosed, StartQueue
from .expiry import RecordExpiry
from .flavors import FlavorSet, limit_refusal
from .hosting import certs_base_warning, default_certs_base
from .journal import Journal
from .output_tail import OutputTails
from .policy import KeyPolicy
from .poller import SpawnerPoller
from .records import ACTIVE, EventLog, Record, Records
from .restore import Restorer
from .runtime import RuntimeLimits, end_time_for
from .spawners import (
    SpawnerFactory,
    recall_state,
    remove_start_certificates,
    run_post_stop_hook,
    safe_state,
    user_message,
)
from .starts import Readiness, StartRun
from .store import Store, now

log = logging.getLogger("outpost.manager")


@dataclass(frozen=True)
class ManagerSettings:
    """The manager's settings: the Outpost traits of the same names (their defaults and
    help live there, once)."""

    poll_interval: float
    poll_timeout: float
    poll_concurrency: int
    max_events_per_server: int
    max_concurrent_starts_per_hub: int
    start_message: str
    certs_dir: str
    state_dir: str
    max_servers_per_hub: int
    max_servers_by_hub: dict[str, int]
    failed_server_retention: float
    exited_server_retention: float
    cleanup_timeout: float
    start_admission: str
    flavor_admission: str
    start_queue_limit: int
    start_queue_timeout: float
    readiness_check: bool
    readiness_timeout: float
    readiness_max_interval: float

    @classmethod
    def from_traits(cls, app) -> ManagerSettings:
        return cls(**{f.name: getattr(app, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class StartPolicies:
    """What a hub may send with Start that reaches the site (policy.py), and which local
    account its user runs as (accounts.py); None: anything, and the hub's user name."""

    overrides: KeyPolicy | None = None
    env: KeyPolicy | None = None
    user_options: KeyPolicy | None = None
    accounts: AccountPolicy | None = None
    auth_state: KeyPolicy | None = None

    async def check(self, hub: str, spec: convert.StartSpec) -> None:
        """Refuse (PERMISSION_DENIED) what hub may not send, before anything is made; set
        spec.user["account"], the local account (stored with the record, so a restart
        under a changed mapping keeps the server's account)."""
        for policy, values in (
            (self.env, spec.env),
            (self.user_options, spec.user_options),
            (self.overrides, spec.config_overrides),
            (self.auth_state, spec.auth_state),
        ):
            if policy is not None and values:
                await policy.check(hub, values)
        if self.accounts is not None:
            spec.user["account"] = await self.accounts.local_account(hub, spec.user["name"])


class LifecycleManager:
    """Owns every hosted Spawner. Created and driven by the Outpost application."""

    def __init__(
        self,
        store: Store,
        spawners: SpawnerFactory,
        settings: ManagerSettings,
        policies: StartPolicies | None = None,
        *,
        flavors: FlavorSet | None = None,
        tails: OutputTails | None = None,
    ):
        self.store = store
        #: the end of a notebook's output for a failed start or an exited server (None:
        #: none; output_tail.py)
        self.tails = tails
        #: the site's flavors now (the application replaces it on SIGHUP; a running
        #: server keeps the flavor it was admitted under, in its record)
        self.flavors = flavors if flavors is not None else FlavorSet()
        self.spawners = spawners
        self.settings = settings
        self.policies = policies or StartPolicies()
        self.records = Records()
        self.journal = Journal(store)
        # never None: a start's certificates must not go to hosting's fallback (the
        # working directory of whoever calls it)
        self.certs_dir = settings.certs_dir or str(default_certs_base(settings.state_dir or None))
        if warning := certs_base_warning(self.certs_dir):
            log.warning(warning)
        self.poller = SpawnerPoller(
            self.records,
            self.journal,
            interval=settings.poll_interval,
            timeout=settings.poll_timeout,
            concurrency=settings.poll_concurrency,
            tails=tails,
        )
        self.expiry = RecordExpiry(
            self.records,
            self.stop,
            failed_retention=settings.failed_server_retention,
            exited_retention=settings.exited_server_retention,
        )
        self.runtime = RuntimeLimits(self.records, self.stop, timeout=settings.cleanup_timeout)
        # the restore's clean-ups of interrupted starts, running in the background
        self._cleanups: set[asyncio.Task] = set()
        #: starts waiting for a free slot, and the limits that decide it (admission.py)
        self.queue = StartQueue(max_per_hub=settings.start_queue_limit, timeout=settings.start_queue_timeout)
        self.admission = Admission(settings, self.records, self.queue)
        self.readiness = (
            Readiness(settings.readiness_timeout, settings.readiness_max_interval) if settings.readiness_check else None
        )

    @property
    def closing(self) -> bool:
        return self.journal.closing

    async def restore(self) -> int:
        """Load every stored server and reconcile it with its Spawner (at start-up)."""
        restorer = Restorer(
            self.store,
            self.records,
            spawners=self.spawners,
            poller=self.poller,
            journal=self.journal,
            certs_dir=self.certs_dir,
            max_events=self.settings.max_events_per_server,
            cleanup_timeout=self.settings.cleanup_timeout,
        )
        count = await restorer.restore()
        self._cleanups = restorer.cleanups
        if self.tails is not None:  # captures of servers forgotten while the Outpost was down
            self.tails.sweep({self.tails.marker(rec) for rec in self.records.values()})
        # end times from the database: those passed while the Outpost was down are
        # stopped at once, in the background
        self.runtime.schedule_all()
        return count

    def start_polling(self) -> None:
        """Begin the Outpost's own schedules: Spawner polls, and the expiry of stopped
        servers their hubs never stopped."""
        self.poller.start()
        self.expiry.start()

    # --- admission (Start) -------------------------------------------------------------

    def _get(self, hub: str, server_name: str) -> Record:
        rec = self.records.get((hub, server_name))
        if rec is None:
            raise ServerNotFound(
                f"No server {server_name!r} is known to this Outpost for your hub.",
                metadata={"server_name": server_name},
            )
        return rec

    async def start(self, hub: str, spec: convert.StartSpec) -> tuple[pb.ServerStatus, bool]:
        if self.closing:
            raise ShuttingDown("The Outpost is shutting down; try again shortly.")
        key = (hub, spec.server_name)
        rec = self.records.get(key)
        if rec is not None and rec.start_id == spec.start_id:
            # idempotent retry: attach to the same start
            if rec.accepted is not None:
                await asyncio.shield(rec.accepted)
            if spec.wait_until_ready:
                await self.wait_terminal(rec)
            return rec.status(), False
        if rec is not None and rec.state in ACTIVE:
            state = convert.STATE_NAMES[rec.state]
            if rec.state == pb.SERVER_STATE_UNKNOWN:
                state += " (its last poll failed; its notebook may still run)"
            raise ServerAlreadyStarted(
                f"Server {spec.server_name!r} is {state} under start_id {rec.start_id!r}. Stop "
                "it first (Stop with that start_id), or repeat Start with that start_id to attach to it.",
                metadata={"server_name": spec.server_name, "start_id": rec.start_id},
            )
        # refused early (cheap under a flood), and checked again below right before the
        # record is taken: an idempotent retry (above) is never refused, and a new start
        # of a name the hub holds (a stopped one) takes no new record
        if rec is None:
            self.admission.check_server_limit(hub)
        self.admission.check_start_limit(hub)  # refused early; queued or not: decided below
        # the flavor: allowed for this hub and user (refused before anything is made), and
        # its limits (checked again below, in the step that takes the record). Admitted
        # under this set of flavors even if a SIGHUP replaces it meanwhile.
        flavors = self.flavors
        flavor = flavors.resolve(hub, spec.user, spec.flavor)
        spec.flavor = flavor.name if flavor is not None else ""
        spec.flavor_spec = flavor.record() if flavor is not None else {}
        self.admission.check_flavor_limits(hub, spec, flavor, flavors)
        await self.policies.check(hub, spec)

        new = Record(
            hub=hub,
            spec=spec,
            state=pb.SERVER_STATE_STARTING,
            start_time=now(),
            events=EventLog(self.settings.max_events_per_server),
        )
        new.end_time = end_time_for(new.start_time, spec.max_runtime)  # its flavor's runtime
        try:
            # built before anything is persisted: bad overrides and a Spawner that cannot
            # be configured are answered at once, and leave nothing behind
            new.spawner = self.spawners.new(new)
        except OutpostError:
            raise
        except Exception as e:
            log.exception("Creating the Spawner for %s/%s failed", hub, spec.server_name)
            raise SpawnerError(
                f"The Outpost could not create the Spawner: {user_message(e)}",
                metadata={"error_class": type(e).__name__},
            ) from None
        if self.records.get(key) is not rec:
            # another Start or Stop changed this server while we awaited: decide again
            return await self.start(hub, spec)
        # no await between these checks and taking the record
        if rec is None:
            self.admission.check_server_limit(hub)
        wait = self.admission.check_start_limit(hub)
        wait = self.admission.check_flavor_limits(hub, spec, flavor, flavors) or wait
        new.accepted = asyncio.get_running_loop().create_future()
        self.records.put(new)
        if self.settings.max_concurrent_starts_per_hub > 0:
            self.admission.starting(hub, new)
        waiter = self.queue.enqueue(new, lambda: self.admission.blocked(hub, spec, flavor)) if wait else None
        # shielded: a client that goes away mid-Start does not undo an accepted start
        await asyncio.shield(asyncio.ensure_future(self._accept(new, previous=rec, waiter=waiter)))
        if spec.wait_until_ready:
            await self.wait_terminal(new)
        return new.status(), True

    async def _accept(self, new: Record, previous: Record | None, waiter=None) -> None:
        """Persist a new start, then run it (after its wait in the queue, with a waiter);
        on failure put back what was there."""
        try:
            if previous is None:
                await self.store.write(self.store.op_insert_server(new.to_row()))
            else:  # a stopped start of the same name: replace its row and events
                await self.store.write(self.store.op_replace_server(new.to_row()))
        except BaseException as e:
            if waiter is not None:
                self.queue._remove(waiter)
            if self.records.current(new):
                if previous is not None:
                    self.records.put(previous)
                else:
                    self.records.remove(new)
            new.accepted.set_exception(e if isinstance(e, Exception) else ShuttingDown("cancelled"))
            new.accepted.exception()  # retrieved: attached callers re-raise it themselves
            raise
        if previous is not None:
            remove_start_certificates(previous, self.certs_dir)  # a stopped start the hub never stopped
            if self.tails is not None:
                self.tails.forget(previous)
        new.accepted.set_result(None)
        new.accepted = None
        StartRun(
            new,
            self.journal,
            certs_dir=self.certs_dir,
            start_message=self.settings.start_message,
            records=self.records,
            cleanup_timeout=self.settings.cleanup_timeout,
            queue=self.queue,
            waiter=waiter,
            readiness=self.readiness,
            on_end=self.queue.wake,
            tails=self.tails,
        ).launch()
        self.runtime.schedule(new)

    async def wait_terminal(self, rec: Record) -> None:
        while not rec.terminal and self.records.current(rec):
            await rec.wait_changed()

    # --- Events, Poll, BatchPoll, ListServers, forward targets -------------------------

    async def events(self, hub: str, server_name: str, start_id: str, after: int) -> AsyncIterator[pb.EventsResponse]:
        rec = self._get(hub, server_name)
        if start_id and start_id != rec.start_id:
            raise StartNotFound(
                f"Server {server_name!r} has no start {start_id!r}; its current start is {rec.start_id!r}.",
                metadata={"server_name": server_name, "start_id": rec.start_id},
            )
        sent = after
        while True:
            for sequence, data in rec.events.after(sent):
                sent = sequence
                yield convert.event_to_proto(data, sequence=sequence, start_id=rec.start_id)
            if rec.terminal and sent >= rec.last_sequence:
                return
            if not self.records.current(rec):
                return  # stopped (or replaced) while we followed it
            await rec.wait_changed(timeout=5.0)

    def poll(self, hub: str, server_name: str) -> pb.ServerStatus:
        """One server's status; a stopped one's with the end of its notebook's output
        (only here: BatchPoll and ListServers share the cached status, and stay small)."""
        rec = self._get(hub, server_name)
        status = rec.status()
        if rec.output_tail and rec.state == pb.SERVER_STATE_STOPPED:
            status = pb.ServerStatus()
            status.CopyFrom(rec.status())
            status.output_tail = rec.output_tail
        return status

    def batch_poll(self, hub: str, names: Iterable[str]) -> tuple[list[pb.ServerStatus], list[str]]:
        """Statuses of this hub's servers among names (in order, once each), and the rest."""
        statuses, not_found, seen = [], [], set()
        records = self.records
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            rec = records.get((hub, name))
            if rec is None:
                not_found.append(name)
            else:
                statuses.append(rec.status())
        return statuses, not_found

    def list(self, hub: str, page_size: int, after_name: str) -> tuple[list[pb.ServerStatus], str]:
        page, more = self.records.page(hub, after_name, page_size)
        next_token = convert.encode_page_token(page[-1].name) if more else ""
        return [rec.status() for rec in page], next_token

    def list_flavors(self, hub: str, user: dict) -> pb.ListFlavorsResponse:
        """The flavors hub may offer user, with limits, usage and whether user may start
        one now (from memory; a snapshot)."""
        flavors = self.flavors
        name = user["name"]
        user_total = len(self.records.active_of_user(hub, name))
        listed = []
        for flavor in flavors.offered(hub):
            usage = self.admission.flavor_usage(flavor.name, hub, name)
            why = flavor.refusal_for_user(user)
            if not why:
                refusal = limit_refusal(flavor, usage, flavors.max_servers_per_user)
                why = refusal.message if refusal is not None else ""
            listed.append(convert.flavor_to_proto(flavor, usage, unavailable_reason=why))
        default = flavors.default_for(hub)
        return pb.ListFlavorsResponse(
            flavors=listed,
            default_flavor=default.name if default is not None else "",
            user_max_total=flavors.max_servers_per_user,
            user_in_use_total=user_total,
        )

    def forward_targets(self, hub: str) -> set[tuple[str, int]]:
        """(host, port) of this hub's servers that may be reached through the SSH forwarder.

        Only addresses that are fresh and owned by exactly one server: RUNNING servers
        whose Spawner the Outpost holds (not UNKNOWN ones, nor ones whose stored state
        could not be decrypted or restored, nor stopped ones even before the hub calls
        Stop), and never an address another active server (of this hub or another) also
        claims: a notebook reports its own port, and two claims mean one of them lies.
        """
        mine = {
            (rec.address["host"], rec.address["port"])
            for rec in self.records.of_hub(hub).values()
            if rec.address and rec.state == pb.SERVER_STATE_RUNNING and rec.spawner is not None
        }
        if not mine:
            return mine
        claims: dict[tuple[str, int], int] = dict.fromkeys(mine, 0)
        for rec in self.records.values():
            address = rec.address
            if address and rec.state in ACTIVE:
                key = (address["host"], address["port"])
                if key in claims:
                    claims[key] += 1
        return {address for address, count in claims.items() if count == 1}

    # --- Stop --------------------------------------------------------------------------

    async def stop(
        self, hub: str, server_name: str, start_id: str, *, stop_message: str = "", timeout: float | None = None
    ) -> tuple[int, pb.ServerStatus | None]:
        """Stop a server and forget it (a hub's Stop). With ``stop_message`` (the Outpost
        stops it on its own: runtime.py) it is kept, STOPPED with that message, for its
        hub's next poll; ``timeout`` bounds the Spawner's stop() (SpawnerError after it)."""
        rec = self.records.get((hub, server_name))
        if rec is None:
            return pb.STOP_OUTCOME_NOT_FOUND, None
        if start_id and start_id != rec.start_id:
            return pb.STOP_OUTCOME_STALE_START_ID, rec.status()
        if rec.stop_task is None:
            rec.stop_task = asyncio.create_task(
                self._run_stop(rec, stop_message=stop_message, timeout=timeout), name=f"stop-{hub}-{server_name}"
            )
        try:
            await asyncio.shield(rec.stop_task)
        finally:
            task = rec.stop_task
            if task is not None and task.done() and (task.cancelled() or task.exception()):
                rec.stop_task = None  # let a retry try again
        if not stop_message and rec.stop_task is None and self.records.current(rec):
            # this Stop shared one that keeps the record (a runtime's end): forget it too
            return await self.stop(hub, server_name, start_id)
        return pb.STOP_OUTCOME_STOPPED, None

    async def _run_stop(self, rec: Record, *, stop_message: str = "", timeout: float | None = None) -> None:
        if rec.accepted is not None:
            await asyncio.shield(rec.accepted)
        previous = rec.state
        if rec.state != pb.SERVER_STATE_STOPPED:
            rec.state = pb.SERVER_STATE_STOPPING
            rec.changed()
        spawner = rec.spawner
        run = rec.run
        if run is not None and run.running:
            # what the start made so far, kept before the cancel can make it forget
            rec.spawner_state = (safe_state(spawner) if spawner else None) or rec.spawner_state
            await run.cancel()
            if not run.spawner_called:
                spawner = None  # a queued start, taken out of the queue: nothing ran
            elif rec.spawner is None:
                spawner = None  # the failed start already stopped it (fail_start)
            elif spawner is not None:
                recall_state(spawner, rec.spawner_state)
        if spawner is None and rec.spawner_state and previous != pb.SERVER_STATE_STOPPED:
            spawner = self.spawners.restored(rec)
        if spawner is not None and previous == pb.SERVER_STATE_STOPPED and rec.exit_code is not None and not safe_state(spawner):
            # it exited, and its poll() cleared its state: nothing is left to stop (and
            # batchspawner's stop() would run its cancel command without a job id and fail)
            run_post_stop_hook(spawner)
            spawner = None
        if spawner is not None:
            try:
                async with asyncio.timeout(timeout):  # None: a hub's Stop waits as long as it takes
                    await spawner.stop()
            except Exception as e:
                if isinstance(e, TimeoutError):
                    e = TimeoutError(f"stop() did not finish within {timeout:g}s")
                log.exception("stop() of %s/%s raised", rec.hub, rec.name)
                rec.state = previous
                rec.changed()
                raise SpawnerError(
                    f"Stopping the server failed: {user_message(e)}",
                    metadata={"error_class": type(e).__name__},
                ) from None
            run_post_stop_hook(spawner)
        remove_start_certificates(rec, self.certs_dir)
        if self.tails is not None:
            self.tails.forget(rec)
        if stop_message:
            await self._keep_stopped(rec, stop_message)
            return
        try:
            await self.store.write(self.store.op_delete_server(rec.hub, rec.name, rec.start_id))
        except Unavailable:
            raise PersistenceUnavailable(
                f"Server {rec.name!r} was stopped, but the Outpost could not record that in its "
                "database (it is unreachable); repeat Stop, which is safe, once it is back.",
            ) from None
        self.records.remove(rec)
        self.runtime.forget(rec)
        rec.spawner = None
        rec.changed()
        self.queue.wake()  # its flavor's slot is free
        log.info("%s/%s stopped", rec.hub, rec.name)

    async def _keep_stopped(self, rec: Record, stop_message: str) -> None:
        """The end of a stop the Outpost made on its own: the record stays, STOPPED with
        stop_message, until its hub stops it or it expires (exited_server_retention)."""
        values = {"state": "stopped", "stop_message": stop_message, "spawner_state": None, "auth_state": None}

        def stopped() -> None:
            rec.state = pb.SERVER_STATE_STOPPED
            rec.stop_message = stop_message
            rec.spec.auth_state = None  # stopped: the user's credentials go
            rec.stopped_at = time.time()
            rec.spawner_state = None
            rec.spawner = None
            rec.stop_task = None  # done: the hub's Stop forgets the record

        if rec.terminal:
            await self.journal.write_retrying(rec, **values)
            stopped()
            rec.changed()
        else:  # it was still starting: its event stream ends here, with the reason
            event = {"kind": pb.EVENT_KIND_FAILED, "message": stop_message, "error_class": "RuntimeEnded"}
            await self.journal.emit(rec, event, durable=True, apply=stopped, **values)
        log.info("%s/%s stopped: %s", rec.hub, rec.name, stop_message)

    # --- shutdown ------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop polling; give pending starts `grace` seconds; keep running servers running."""
        self.journal.closing = True
        self.queue.close(
            QueueClosed("The Outpost was stopped while your server waited for a free slot. Please start it again.")
        )
        self.expiry.stop()  # its stops under way are stop tasks: waited for below
        self.runtime.close()  # likewise
        polls = self.poller.stop()  # never cancelled; their answers get the grace too
        pending = [r.run.task for r in self.records.values() if r.run is not None and r.run.running]
        pending += [r.stop_task for r in self.records.values() if r.stop_task and not r.stop_task.done()]
        pending += [task for task in self._cleanups if not task.done()]
        if pending:
            log.info("Waiting up to %gs for %d pending starts/stops", grace, len(pending))
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        if polls:
            await asyncio.wait(polls, timeout=grace)
        # persist the latest Spawner state of every server (what a restart needs)
        ops = []
        for rec in self.records.values():
            if rec.spawner is not None and rec.state != pb.SERVER_STATE_STOPPED and rec.poll_task is None:
                state = safe_state(rec.spawner)
                if state != rec.spawner_state:
                    rec.spawner_state = state
                    ops.append(self.store.op_update_server(rec.hub, rec.name, spawner_state=state))
        if ops:
            try:
                await self.store.write(*ops)
            except OutpostError:
                log.error("Could not persist Spawner state at shutdown")
