"""The lifecycle manager: the only owner of Spawner objects and their tasks.

Every server the Outpost knows is one :class:`Record` in memory, keyed by
(hub, server_name). RPCs read records (Poll, ListServers and Events never touch the
Spawner or the database); the manager changes them, writes every change to the database
before it is visible to a caller, and polls the Spawners on its own schedule.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jupyterhub.spawner import Spawner

from outpost_client.errors import (
    PERSISTENCE_UNAVAILABLE,
    TOO_MANY_STARTS,
    OutpostError,
    ResourceExhausted,
    ServerAlreadyStarted,
    ServerNotFound,
    SpawnerError,
    StartNotFound,
    Unavailable,
)
from outpost_client.v1 import outpost_pb2 as pb

from . import convert, orphans
from .hosting import (
    certs_location,
    install_certificates,
    make_spawner,
    maybe_await,
    normalise_address,
    remove_certificates,
    stand_ins_from_env,
)
from .store import Store, now

log = logging.getLogger("outpost.manager")

ACTIVE = (pb.SERVER_STATE_STARTING, pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_STOPPING)

RESTART_DURING_START = (
    "The Outpost restarted while this server was starting. Please start it again."
)


def user_message(error: BaseException) -> str:
    """The message of a Spawner's exception, as the user should see it."""
    message = getattr(error, "jupyterhub_message", None) or str(error)
    if isinstance(error, asyncio.TimeoutError) and not message:
        message = "The server did not start in time."
    return message or f"The server failed to start ({type(error).__name__})."


@dataclass(eq=False)
class Record:
    """One server of one hub, as the Outpost knows it."""

    hub: str
    spec: convert.StartSpec
    state: int
    start_time: datetime
    address: dict[str, Any] | None = None
    exit_code: int | None = None
    failure_message: str = ""
    error_class: str = ""
    spawner: Spawner | None = None
    spawner_state: dict | None = None
    start_task: asyncio.Task | None = None
    stop_task: asyncio.Task | None = None
    events: deque = field(default_factory=deque)
    last_sequence: int = 0
    terminal: bool = False
    accepted: asyncio.Future | None = None
    poll_task: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _status: pb.ServerStatus | None = None

    @property
    def name(self) -> str:
        return self.spec.server_name

    @property
    def start_id(self) -> str:
        return self.spec.start_id

    def changed(self) -> None:
        """Wake everyone waiting on this record and drop the cached status."""
        self._status = None
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float | None = None) -> None:
        waiter = self._changed
        if timeout is None:
            await waiter.wait()
        else:
            await wait_event(waiter, timeout)

    def status(self) -> pb.ServerStatus:
        if self._status is None:
            status = pb.ServerStatus(
                server_name=self.name,
                start_id=self.start_id,
                state=self.state,
                failure_message=self.failure_message,
                user_name=self.spec.user["name"],
                start_time=convert.timestamp(self.start_time),
            )
            if self.address and self.state == pb.SERVER_STATE_RUNNING:
                status.address.CopyFrom(pb.ServerAddress(**self.address))
            if self.exit_code is not None and self.state == pb.SERVER_STATE_STOPPED:
                status.exit_code = self.exit_code
            self._status = status
        return self._status

    def row(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "hub": self.hub,
            "server_name": spec.server_name,
            "start_id": spec.start_id,
            "state": convert.STATE_NAMES[self.state],
            "user_info": spec.user,
            "spawner_name": spec.spawner_name,
            "env": spec.env,
            "user_options": spec.user_options,
            "config_overrides": spec.config_overrides,
            "spawner_state": self.spawner_state,
            "scheme": (self.address or {}).get("scheme"),
            "host": (self.address or {}).get("host"),
            "port": (self.address or {}).get("port"),
            "exit_code": self.exit_code,
            "failure_message": self.failure_message,
            "error_class": self.error_class,
            "start_time": self.start_time,
        }


class Records(dict):
    """Every Record by (hub, server_name), with an index per hub.

    A dict (what RPCs read on their hot path), plus per hub its records and its server
    names in order: ListServers pages and the SSH forwarder's checks cost the size of
    one hub's share, not of every server on the Outpost.
    """

    def __init__(self):
        super().__init__()
        self.by_hub: dict[str, dict[str, Record]] = {}
        self.sorted_names: dict[str, list[str]] = {}

    def __setitem__(self, key: tuple[str, str], rec: Record) -> None:
        hub, name = key
        if key not in self:
            bisect.insort(self.sorted_names.setdefault(hub, []), name)
        super().__setitem__(key, rec)
        self.by_hub.setdefault(hub, {})[name] = rec

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(key)
        hub, name = key
        del self.by_hub[hub][name]
        names = self.sorted_names[hub]
        del names[bisect.bisect_left(names, name)]
        if not names:
            del self.by_hub[hub], self.sorted_names[hub]

    def of_hub(self, hub: str) -> dict[str, Record]:
        return self.by_hub.get(hub, {})


class LifecycleManager:
    """Owns every hosted Spawner. Created and driven by the Outpost application."""

    def __init__(
        self,
        *,
        store: Store,
        spawner_class: type[Spawner],
        config,
        site_env_keys: frozenset[str],
        poll_interval: float = 30.0,
        poll_timeout: float = 60.0,
        poll_concurrency: int = 32,
        max_events_per_server: int = 200,
        override_policy=None,
        start_message: str = "",
        max_concurrent_starts_per_hub: int = 0,
        spawner_created: Callable[[Record, Spawner], None] | None = None,
    ):
        self.store = store
        # called with every Spawner this manager makes (the hub API relay attaches here)
        self.spawner_created = spawner_created
        self.spawner_class = spawner_class
        self.config = config
        self.site_env_keys = site_env_keys
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.poll_concurrency = poll_concurrency
        self._poll_slots = asyncio.Semaphore(poll_concurrency)
        self.max_events = max_events_per_server
        self.override_policy = override_policy
        self.start_message = start_message
        self.max_concurrent_starts_per_hub = max_concurrent_starts_per_hub
        self.records = Records()
        # hub -> records this manager put in STARTING (pruned lazily; only with a limit)
        self._starting: dict[str, set[Record]] = {}
        self._poller: asyncio.Task | None = None
        self._closing = False

    # --- helpers ------------------------------------------------------------------

    def _get(self, hub: str, server_name: str) -> Record:
        rec = self.records.get((hub, server_name))
        if rec is None:
            raise ServerNotFound(
                f"No server {server_name!r} is known to this Outpost for your hub.",
                metadata={"server_name": server_name},
            )
        return rec

    def _starts_in_progress(self, hub: str) -> int:
        """How many of hub's servers are STARTING (those being accepted included)."""
        starting = self._starting.get(hub)
        if not starting:
            return 0
        ended = [
            r
            for r in starting
            if r.state != pb.SERVER_STATE_STARTING or self.records.get((r.hub, r.name)) is not r
        ]
        starting.difference_update(ended)
        return len(starting)

    def _check_start_limit(self, hub: str) -> None:
        """Refuse a new start (RESOURCE_EXHAUSTED) while hub is at its limit of starts."""
        limit = self.max_concurrent_starts_per_hub
        if limit <= 0:
            return
        in_progress = self._starts_in_progress(hub)
        if in_progress >= limit:
            log.warning("Refused a start of hub %r: %d starts in progress (the limit)", hub, in_progress)
            raise ResourceExhausted(
                f"Hub {hub!r} already has {in_progress} server starts in progress on this "
                "Outpost (the limit); try again when one of them finishes.",
                reason=TOO_MANY_STARTS,
                metadata={"limit": str(limit)},
            )

    def _new_spawner(self, rec: Record) -> Spawner:
        spec = rec.spec
        user, hub = stand_ins_from_env(
            spec.env,
            spec.user["name"],
            spec.user.get("id", 0),
            spec.user.get("admin", False),
            spec.user.get("groups", []),
        )
        spawner = make_spawner(
            self.spawner_class,
            config=self.config,
            spawner_name=spec.spawner_name,
            user=user,
            hub=hub,
            env=spec.env,
            user_options=spec.user_options,
            site_env_keys=self.site_env_keys,
            overrides=spec.config_overrides,
            log=log.getChild(f"{rec.hub}.{rec.name}"),
        )
        # passed on to local notebook processes: a restart can find them (orphans.py)
        spawner._outpost_hub_env[orphans.START_MARKER_ENV] = orphans.start_marker(
            rec.hub, rec.name, rec.start_id
        )
        if self.spawner_created is not None:
            self.spawner_created(rec, spawner)
        return spawner

    def _event_data(self, data: dict[str, Any]) -> dict[str, Any]:
        data.setdefault("time", time.time())
        return data

    async def _emit(
        self, rec: Record, data: dict[str, Any], *, durable: bool, apply=None, **values
    ) -> None:
        """Persist one event (and column values), then make it visible and wake waiters.

        Nothing a caller can see (an event, a state) runs ahead of the database: a client
        told "ready" can rely on a restarted Outpost knowing it too. ``apply`` changes the
        in-memory record after the write. With ``durable`` the write is retried until the
        database answers (a terminal event must not be lost); otherwise an event the
        database refused is still shown live.
        """
        async with rec.lock:
            data = self._event_data(data)
            rec.last_sequence += 1
            sequence = rec.last_sequence
            row = {"sequence": sequence, "start_id": rec.start_id, "data": data}
            if durable:
                await self._persist_retrying(rec, events=[row], **values)
            else:
                try:
                    await self._persist(rec, events=[row], **values)
                except Unavailable:
                    log.warning("Event %d of %s/%s is not persisted", sequence, rec.hub, rec.name)
            if apply is not None:
                apply()
            rec.events.append((sequence, data))
            while len(rec.events) > self.max_events:
                rec.events.popleft()
            if data["kind"] in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED):
                rec.terminal = True
            rec.changed()

    async def _persist_retrying(self, rec: Record, **kwargs) -> None:
        delay = 0.1
        while True:
            try:
                await self._persist(rec, **kwargs)
                return
            except Unavailable:
                if self._closing:
                    raise
                log.warning("Retrying the write for %s/%s in %.1fs", rec.hub, rec.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _persist(self, rec: Record, *, events: list[dict] | None = None, **values) -> None:
        ops = []
        if values:
            ops.append(self.store.op_update_server(rec.hub, rec.name, **values))
        if events:
            ops.append(self.store.op_add_events(rec.hub, rec.name, events))
        if ops:
            await self.store.write(*ops)

    # --- Start --------------------------------------------------------------------

    async def start(self, hub: str, spec: convert.StartSpec) -> tuple[pb.ServerStatus, bool]:
        if self._closing:
            raise Unavailable("The Outpost is shutting down; try again shortly.", reason="SHUTTING_DOWN")
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
            raise ServerAlreadyStarted(
                f"Server {spec.server_name!r} is {convert.STATE_NAMES[rec.state]} under "
                f"start_id {rec.start_id!r}. Stop it first (Stop with that start_id), or "
                "repeat Start with that start_id to attach to it.",
                metadata={"server_name": spec.server_name, "start_id": rec.start_id},
            )
        # refused early (cheap under a flood), and checked again below right before the
        # record is taken: an idempotent retry (above) is never refused
        self._check_start_limit(hub)
        if self.override_policy is not None and spec.config_overrides:
            await self.override_policy(hub, spec.config_overrides)

        new = Record(hub=hub, spec=spec, state=pb.SERVER_STATE_STARTING, start_time=now())
        try:
            # built before anything is persisted: bad overrides and a Spawner that cannot
            # be configured are answered at once, and leave nothing behind
            new.spawner = self._new_spawner(new)
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
        self._check_start_limit(hub)  # no await between this check and taking the record
        new.accepted = asyncio.get_running_loop().create_future()
        self.records[key] = new
        if self.max_concurrent_starts_per_hub > 0:
            self._starting.setdefault(hub, set()).add(new)
        # shielded: a client that goes away mid-Start does not undo an accepted start
        await asyncio.shield(asyncio.ensure_future(self._accept(new, previous=rec)))
        if spec.wait_until_ready:
            await self.wait_terminal(new)
        return new.status(), True

    async def _accept(self, new: Record, previous: Record | None) -> None:
        """Persist a new start, then run it; on failure put back what was there."""
        key = (new.hub, new.name)
        try:
            if previous is None:
                await self.store.write(self.store.op_insert_server(new.row()))
            else:  # a stopped start of the same name: replace its row and events
                await self.store.write(self.store.op_replace_server(new.row()))
        except BaseException as e:
            if self.records.get(key) is new:
                if previous is not None:
                    self.records[key] = previous
                else:
                    del self.records[key]
            new.accepted.set_exception(e if isinstance(e, Exception) else Unavailable("cancelled"))
            new.accepted.exception()  # retrieved: attached callers re-raise it themselves
            raise
        if previous is not None:
            self._remove_certificates(previous)  # a stopped start the hub never stopped
        new.accepted.set_result(None)
        new.accepted = None
        new.start_task = asyncio.create_task(
            self._run_start(new), name=f"start-{new.hub}-{new.name}"
        )

    async def wait_terminal(self, rec: Record) -> None:
        while not rec.terminal and self.records.get((rec.hub, rec.name)) is rec:
            await rec.wait_changed()

    # where internal_ssl certificates are written (None: <tmp>/jupyterhub-outpost-certs-<uid>)
    certs_base: str | None = None

    def _remove_certificates(self, rec: Record) -> None:
        """Remove the internal_ssl files the Outpost wrote for rec's start (if any)."""
        try:
            if remove_certificates(*certs_location(rec.hub, rec.name, rec.start_id, self.certs_base)):
                log.info("Removed the internal_ssl certificates of %s/%s", rec.hub, rec.name)
        except Exception:
            log.exception("Removing the internal_ssl certificates of %s/%s failed", rec.hub, rec.name)

    async def _run_start(self, rec: Record) -> None:
        spawner = rec.spawner
        assert spawner is not None
        progress_task: asyncio.Task | None = None
        try:
            spawner._spawn_pending = True
            spawner._start_pending = True
            if self.start_message:
                message = self.start_message.format(
                    spawner_class=type(spawner).__name__, user=rec.spec.user["name"]
                )
                await self._emit(rec, {"kind": pb.EVENT_KIND_PROGRESS, "message": message}, durable=False)
            await maybe_await(spawner.run_pre_spawn_hook())
            if rec.spec.certificates:
                # as JupyterHub does after create_certs: move_certs, then start
                await install_certificates(
                    spawner,
                    rec.spec.certificates,
                    *certs_location(rec.hub, rec.name, rec.start_id, self.certs_base),
                )
                rec.spec.certificates = {}  # on disk now; not kept in memory too
            checkpoint_task = asyncio.create_task(self._checkpoint_state(rec, spawner))
            start = asyncio.ensure_future(spawner.start())
            spawner._spawn_future = start
            progress_task = asyncio.create_task(self._follow_progress(rec, spawner))
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
            result = start.result()
            scheme, host, port = normalise_address(result, spawner)
            spawner._spawn_pending = spawner._start_pending = False
            await self._stop_progress(rec, progress_task)
            progress_task = None
            address = {"scheme": scheme, "host": host, "port": port}
            spawner_state = spawner.get_state()

            def running() -> None:
                rec.address = address
                rec.state = pb.SERVER_STATE_RUNNING
                rec.spawner_state = spawner_state

            await self._emit(
                rec,
                {
                    "kind": pb.EVENT_KIND_READY,
                    "message": f"Server ready at {scheme}://{host}:{port}",
                    "progress": 100,
                    "address": address,
                },
                durable=True,
                apply=running,
                state="running",
                spawner_state=spawner_state,
                scheme=scheme,
                host=host,
                port=port,
            )
            log.info("%s/%s started at %s://%s:%s", rec.hub, rec.name, scheme, host, port)
        except asyncio.CancelledError:
            if progress_task is not None:
                progress_task.cancel()
            if self._closing:
                # shutdown: keep what the Spawner knows, so a restart can clean up (or
                # what the checkpoint knew, if the cancel made the Spawner forget it)
                rec.spawner_state = _safe_state(spawner) or rec.spawner_state
                try:
                    await self._persist(rec, spawner_state=rec.spawner_state)
                except Exception:
                    log.exception("Could not persist state of %s/%s", rec.hub, rec.name)
                raise
            # cancelled by Stop: Stop cleans up
            raise
        except Exception as e:
            if progress_task is not None:
                await self._stop_progress(rec, progress_task)
            await self._fail_start(rec, e)

    # how often a start's Spawner state is compared with what the database holds
    checkpoint_interval = 1.0

    async def _checkpoint_state(self, rec: Record, spawner: Spawner) -> None:
        """While start() runs, store the Spawner's state as soon as it changes.

        The state (a pid, a job id) is what lets a restarted Outpost stop what a start
        made; without it a crash mid-start leaves an orphan. Spawners keep what
        get_state() returns in traits, so any trait change wakes this at once; a
        comparison every ``checkpoint_interval`` catches state kept elsewhere. The row
        stays STARTING: a restart fails the start and stops what the state names.
        """
        woken = asyncio.Event()

        def on_change(_change) -> None:
            woken.set()

        spawner.observe(on_change)
        stored = rec.spawner_state
        try:
            while rec.state == pb.SERVER_STATE_STARTING and rec.spawner is spawner:
                await wait_event(woken, self.checkpoint_interval)
                woken.clear()
                state = _safe_state(spawner)
                if not state or state == stored:
                    continue
                try:
                    await self._persist(rec, spawner_state=state)
                except Unavailable:
                    log.warning("Could not store the state of starting %s/%s yet", rec.hub, rec.name)
                    continue
                stored = rec.spawner_state = state
                log.debug("Stored the state of starting %s/%s", rec.hub, rec.name)
        finally:
            spawner.unobserve(on_change)

    async def _follow_progress(self, rec: Record, spawner: Spawner) -> None:
        """Emit the Spawner's progress events; a repeat of the last one is dropped.

        Pollers repeat themselves (batchspawner yields "Pending in queue..." every second
        while a job waits): each repeat would be a database write and a line in the
        user's event log, saying nothing new.
        """
        last = None
        try:
            async for item in spawner.progress():
                data = convert.event_from_spawner(item)
                if data == last:
                    continue
                last = dict(data)
                await self._emit(rec, data, durable=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("progress() of %s/%s raised; ignoring it", rec.hub, rec.name)

    async def _stop_progress(self, rec: Record, task: asyncio.Task) -> None:
        """Let progress() deliver what it already has, then stop it.

        Holding the record's lock, the cancel never lands in the middle of an event's
        write: it lands while progress() waits for its next item.
        """
        await asyncio.sleep(0)
        async with rec.lock:
            if not task.done():
                task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _fail_start(self, rec: Record, error: BaseException) -> None:
        message = user_message(error)
        if isinstance(error, asyncio.TimeoutError) and rec.spawner is not None:
            message = f"The server did not start within {rec.spawner.start_timeout:g} seconds."
        log.error(
            "Start of %s/%s failed: %s", rec.hub, rec.name, message, exc_info=error
        )
        if rec.spawner is not None:
            _recall_state(rec.spawner, rec.spawner_state)  # what the checkpoint stored
            try:
                await rec.spawner.stop(now=True)
            except Exception:
                log.exception("Cleanup stop() of %s/%s raised", rec.hub, rec.name)
            _run_post_stop_hook(rec.spawner)
        self._remove_certificates(rec)
        error_class = type(error).__name__

        def stopped() -> None:
            rec.state = pb.SERVER_STATE_STOPPED
            rec.failure_message = message
            rec.error_class = error_class
            rec.spawner_state = None
            rec.spawner = None

        await self._emit(
            rec,
            {"kind": pb.EVENT_KIND_FAILED, "message": message, "error_class": error_class},
            durable=True,
            apply=stopped,
            state="stopped",
            spawner_state=None,
            failure_message=message,
            error_class=error_class,
        )

    # --- Events -------------------------------------------------------------------

    async def events(
        self, hub: str, server_name: str, start_id: str, after: int
    ) -> AsyncIterator[pb.EventsResponse]:
        rec = self._get(hub, server_name)
        if start_id and start_id != rec.start_id:
            raise StartNotFound(
                f"Server {server_name!r} has no start {start_id!r}; its current start is "
                f"{rec.start_id!r}.",
                metadata={"server_name": server_name, "start_id": rec.start_id},
            )
        sent = after
        while True:
            for sequence, data in list(rec.events):
                if sequence > sent:
                    sent = sequence
                    yield convert.event_to_proto(data, sequence=sequence, start_id=rec.start_id)
            if rec.terminal and sent >= rec.last_sequence:
                return
            if self.records.get((hub, server_name)) is not rec:
                # stopped (or replaced) while we followed it
                return
            await rec.wait_changed(timeout=5.0)

    # --- Poll and List --------------------------------------------------------------

    def poll(self, hub: str, server_name: str) -> pb.ServerStatus:
        return self._get(hub, server_name).status()

    def batch_poll(self, hub: str, names) -> tuple[list[pb.ServerStatus], list[str]]:
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
        names = self.records.sorted_names.get(hub, [])
        first = bisect.bisect_right(names, after_name)
        page = names[first : first + page_size]
        of_hub = self.records.of_hub(hub)
        statuses = [of_hub[name].status() for name in page]
        next_token = convert.encode_page_token(page[-1]) if len(names) > first + page_size else ""
        return statuses, next_token

    def forward_targets(self, hub: str) -> set[tuple[str, int]]:
        """(host, port) of this hub's servers that may be reached through the SSH forwarder.

        Running (or unknown-but-alive) servers only; a stopped server's address is
        never reachable, even before the hub calls Stop.
        """
        return {
            (rec.address["host"], rec.address["port"])
            for rec in self.records.of_hub(hub).values()
            if rec.address
            and rec.state in (pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_UNKNOWN)
        }

    # --- Stop ---------------------------------------------------------------------

    async def stop(self, hub: str, server_name: str, start_id: str) -> tuple[int, pb.ServerStatus | None]:
        rec = self.records.get((hub, server_name))
        if rec is None:
            return pb.STOP_OUTCOME_NOT_FOUND, None
        if start_id and start_id != rec.start_id:
            return pb.STOP_OUTCOME_STALE_START_ID, rec.status()
        if rec.stop_task is None:
            rec.stop_task = asyncio.create_task(self._run_stop(rec), name=f"stop-{hub}-{server_name}")
        try:
            await asyncio.shield(rec.stop_task)
        finally:
            task = rec.stop_task
            if task is not None and task.done() and (task.cancelled() or task.exception()):
                rec.stop_task = None  # let a retry try again
        return pb.STOP_OUTCOME_STOPPED, None

    async def _run_stop(self, rec: Record) -> None:
        if rec.accepted is not None:
            await asyncio.shield(rec.accepted)
        previous = rec.state
        if rec.state != pb.SERVER_STATE_STOPPED:
            rec.state = pb.SERVER_STATE_STOPPING
            rec.changed()
        spawner = rec.spawner
        if rec.start_task is not None and not rec.start_task.done():
            # what the start made so far, kept before the cancel can make it forget
            rec.spawner_state = (_safe_state(spawner) if spawner else None) or rec.spawner_state
            rec.start_task.cancel()
            try:
                await rec.start_task
            except (asyncio.CancelledError, Exception):
                pass
            if rec.spawner is None:
                spawner = None  # the failed start already stopped it (_fail_start)
            elif spawner is not None:
                _recall_state(spawner, rec.spawner_state)
        if spawner is None and rec.spawner_state and previous != pb.SERVER_STATE_STOPPED:
            spawner = self._restored_spawner(rec)
        if spawner is not None:
            try:
                await spawner.stop()
            except Exception as e:
                log.exception("stop() of %s/%s raised", rec.hub, rec.name)
                rec.state = previous
                rec.changed()
                raise SpawnerError(
                    f"Stopping the server failed: {user_message(e)}",
                    metadata={"error_class": type(e).__name__},
                ) from None
            _run_post_stop_hook(spawner)
        self._remove_certificates(rec)
        try:
            await self.store.write(self.store.op_delete_server(rec.hub, rec.name))
        except Unavailable:
            raise Unavailable(
                f"Server {rec.name!r} was stopped, but the Outpost could not record that in its "
                "database (it is unreachable); repeat Stop, which is safe, once it is back.",
                reason=PERSISTENCE_UNAVAILABLE,
            ) from None
        if self.records.get((rec.hub, rec.name)) is rec:
            del self.records[(rec.hub, rec.name)]
        rec.spawner = None
        rec.changed()
        log.info("%s/%s stopped", rec.hub, rec.name)

    # --- the manager's own polling --------------------------------------------------

    def start_polling(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name="outpost-poller")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.poll_round()
            except Exception:
                log.exception("Polling the Spawners failed")

    def poll_round(self) -> list[asyncio.Task]:
        """Begin a poll of every running server that is not being polled already.

        A round does not wait for its polls: one slow or hung poll() (a batch scheduler
        that does not answer) delays nobody else's, and its server is left out of the
        next rounds until it answers. At most ``poll_concurrency`` poll() calls run at once.
        """
        tasks = []
        for rec in self.records.values():
            if (
                rec.state in (pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_UNKNOWN)
                and rec.stop_task is None
                and (task := self._begin_poll(rec)) is not None
            ):
                tasks.append(task)
        return tasks

    async def poll_all(self) -> None:
        """Poll every running server's Spawner once and wait for the answers."""
        tasks = self.poll_round()
        if tasks:
            await asyncio.wait(tasks)

    def _begin_poll(self, rec: Record) -> asyncio.Task | None:
        spawner = rec.spawner
        if spawner is None or rec.poll_task is not None:
            return None  # gone, or its last poll() still runs
        rec.poll_task = asyncio.create_task(self._run_poll(rec, spawner), name=f"poll-{rec.hub}-{rec.name}")
        return rec.poll_task

    async def _poll_one(self, rec: Record) -> None:
        """Poll rec's Spawner, waiting up to ``poll_timeout`` for its answer."""
        task = self._begin_poll(rec)
        if task is not None:
            await asyncio.wait({task}, timeout=self.poll_timeout)

    def _set_unknown(self, rec: Record) -> None:
        if rec.state != pb.SERVER_STATE_UNKNOWN and rec.stop_task is None:
            rec.state = pb.SERVER_STATE_UNKNOWN
            rec.changed()

    def _poll_overran(self, rec: Record) -> None:
        log.warning(
            "poll() of %s/%s has taken over %gs; it is UNKNOWN until poll() answers",
            rec.hub, rec.name, self.poll_timeout,
        )  # fmt: skip
        self._set_unknown(rec)

    async def _run_poll(self, rec: Record, spawner: Spawner) -> None:
        """One poll() of rec's Spawner, then its answer stored and shown.

        poll() is never cancelled: a Spawner may turn a cancel into an answer
        (batchspawner reads its killed ``squeue`` as "job not found", forgets the job
        and returns 1: a notebook declared dead while it runs). One that takes over
        ``poll_timeout`` makes the server UNKNOWN meanwhile; its answer still counts.
        """
        try:
            async with self._poll_slots:
                overran = asyncio.get_running_loop().call_later(self.poll_timeout, self._poll_overran, rec)
                try:
                    result = await spawner.poll()
                except Exception as e:
                    log.warning("poll() of %s/%s failed: %s: %s", rec.hub, rec.name, type(e).__name__, e)
                    self._set_unknown(rec)
                    return
                finally:
                    overran.cancel()
            try:
                await self._apply_poll(rec, spawner, result)
            except Unavailable:
                log.warning("Could not store the poll result of %s/%s; the next poll does", rec.hub, rec.name)
        finally:
            rec.poll_task = None

    async def _apply_poll(self, rec: Record, spawner: Spawner, result) -> None:
        """Store what poll() said, then show it (a failed write shows nothing: the next
        poll of the server, still RUNNING or UNKNOWN, writes it again)."""

        def current() -> bool:
            return (
                rec.stop_task is None
                and rec.spawner is spawner
                and self.records.get((rec.hub, rec.name)) is rec
            )

        if not current():
            return  # stopped while we polled
        new_state = _safe_state(spawner)
        if result is None:
            if rec.state == pb.SERVER_STATE_RUNNING and new_state == rec.spawner_state:
                return
            await self._persist(rec, state="running", spawner_state=new_state)
            if current():
                rec.state = pb.SERVER_STATE_RUNNING
                rec.spawner_state = new_state
                rec.changed()
            return
        exit_code = int(result)
        await self._persist(rec, state="stopped", exit_code=exit_code, spawner_state=new_state)
        if current():
            log.info("%s/%s exited with status %s", rec.hub, rec.name, result)
            rec.state = pb.SERVER_STATE_STOPPED
            rec.exit_code = exit_code
            rec.spawner_state = new_state
            rec.changed()

    # --- restore and shutdown ----------------------------------------------------------

    def _restored_spawner(self, rec: Record) -> Spawner:
        spawner = self._new_spawner(rec)
        spawner.load_state(rec.spawner_state or {})
        rec.spawner = spawner
        return spawner

    async def restore(self) -> int:
        """Load every persisted server and reconcile it with its Spawner's poll()."""
        rows, events = await self.store.load()
        unreadable: set[Record] = set()
        stale: list[Record] = []
        for row in rows:
            spec = convert.StartSpec(
                server_name=row["server_name"],
                start_id=row["start_id"],
                user=row["user_info"],
                env=row["env"] or {},
                user_options=row["user_options"] or {},
                config_overrides=row["config_overrides"] or {},
                spawner_name=row["spawner_name"] or "",
            )
            start_time = row["start_time"]
            rec = Record(
                hub=row["hub"],
                spec=spec,
                state=convert.STATE_VALUES.get(row["state"], pb.SERVER_STATE_UNKNOWN),
                start_time=start_time,
                exit_code=row["exit_code"],
                failure_message=row["failure_message"] or "",
                error_class=row["error_class"] or "",
                spawner_state=row["spawner_state"],
            )
            if row["host"]:
                rec.address = {"scheme": row["scheme"], "host": row["host"], "port": row["port"]}
            for ev in events.get((rec.hub, rec.name), []):
                rec.events.append((ev["sequence"], ev["data"]))
                rec.last_sequence = ev["sequence"]
                if ev["data"].get("kind") in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED):
                    rec.terminal = True
            self.records[(rec.hub, rec.name)] = rec
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
            # what the Spawners' stop() could not reach (their state was never stored)
            stopped = await asyncio.to_thread(orphans.stop_marked, set(interrupted))
            for marker, pids in stopped.items():
                rec = interrupted[marker]
                log.warning(
                    "Stopped processes %s left by the interrupted start of %s/%s",
                    pids, rec.hub, rec.name,
                )
        # rows in plain text or under an older key: write them again under the first key
        ops = [
            self.store.op_update_server(r.hub, r.name, env=r.spec.env, spawner_state=r.spawner_state)
            for r in stale
            if self.records.get((r.hub, r.name)) is r
        ]
        if ops:
            try:
                await self.store.write(*ops)
                log.info("Re-encrypted %d servers' rows with the first crypt key", len(ops))
            except Unavailable:
                log.warning("Could not re-encrypt %d rows; the next start-up tries again", len(ops))
        return len(rows)

    async def _reconcile(self, rec: Record) -> None:
        if rec.state == pb.SERVER_STATE_STOPPED:
            return
        try:
            self._restored_spawner(rec)
        except Exception:
            log.exception("Could not recreate the Spawner of %s/%s", rec.hub, rec.name)
            rec.state = pb.SERVER_STATE_UNKNOWN
            return
        if rec.state == pb.SERVER_STATE_STARTING:
            log.warning("%s/%s was starting when the Outpost stopped; cleaning up", rec.hub, rec.name)
            await self._fail_start(rec, _RestartDuringStart(RESTART_DURING_START))
            return
        try:
            await self._poll_one(rec)
        except Unavailable:
            pass  # the database is down: the next poll writes what changed
        log.info("Restored %s/%s: %s", rec.hub, rec.name, convert.STATE_NAMES[rec.state])

    async def shutdown(self, grace: float) -> None:
        """Stop polling; give pending starts `grace` seconds; keep running servers running."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
        pending = [r.start_task for r in self.records.values() if r.start_task and not r.start_task.done()]
        pending += [r.stop_task for r in self.records.values() if r.stop_task and not r.stop_task.done()]
        # polls are never cancelled (see _poll_one); their answers get the grace too
        polls = [r.poll_task for r in self.records.values() if r.poll_task is not None]
        if pending:
            log.info("Waiting up to %gs for %d pending starts/stops", grace, len(pending))
            done, still = await asyncio.wait(pending, timeout=grace)
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
                state = _safe_state(rec.spawner)
                if state != rec.spawner_state:
                    rec.spawner_state = state
                    ops.append(self.store.op_update_server(rec.hub, rec.name, spawner_state=state))
        if ops:
            try:
                await self.store.write(*ops)
            except OutpostError:
                log.error("Could not persist Spawner state at shutdown")


class _RestartDuringStart(Exception):
    pass


def _recall_state(spawner: Spawner, state: dict | None) -> None:
    """Give a Spawner that forgot what it made (its get_state() is empty) the state that
    was stored for it: batchspawner turns a cancel into "job not found" and clears its
    job id, and its stop() would then cancel nothing."""
    if state and not _safe_state(spawner):
        spawner.load_state(state)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to timeout for event; True if it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives as the
    event is set, and the waiting task would run on after being cancelled.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def cancel_and_wait(task: asyncio.Future) -> None:
    """Cancel task and wait until it has ended, however it ends."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: what it did after the cancel no longer matters


def _safe_state(spawner: Spawner) -> dict | None:
    try:
        return spawner.get_state()
    except Exception:
        log.exception("get_state() raised")
        return None


def _run_post_stop_hook(spawner: Spawner) -> None:
    try:
        spawner.run_post_stop_hook()
    except Exception:
        log.exception("post_stop_hook raised")
