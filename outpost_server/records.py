"""What the Outpost knows of every server, in memory: one :class:`Record` per (hub,
server_name), its :class:`EventLog`, and the :class:`Records` table of them all.

RPCs read records (Poll, ListServers and Events never touch a Spawner or the database);
the lifecycle manager and its helpers change them. A record's database row is
:meth:`Record.to_row` and :meth:`Record.from_row` reads it back: the two stay side by side.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import Spawner

from outpost_client.v1 import outpost_pb2 as pb

from . import convert
from .aio import wait_event

if TYPE_CHECKING:
    from .starts import StartRun

#: states of a server that holds (or may hold) resources at the site: a new start of the
#: same name must Stop it first. UNKNOWN too: its notebook may well still run.
ACTIVE = (
    pb.SERVER_STATE_STARTING,
    pb.SERVER_STATE_RUNNING,
    pb.SERVER_STATE_STOPPING,
    pb.SERVER_STATE_UNKNOWN,
)
#: event kinds that end a start's event stream
TERMINAL_KINDS = (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED)

Key = tuple[str, str]  # (hub, server_name)


class EventLog:
    """The progress events of one start, oldest first, at most ``limit`` of them.

    The oldest events are dropped first; the last one is never dropped, so the terminal
    event (the last a start emits) always stays and an Events stream always ends.
    """

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.items: deque[tuple[int, dict[str, Any]]] = deque()
        self.last_sequence = 0
        self.terminal = False

    def next_sequence(self) -> int:
        self.last_sequence += 1
        return self.last_sequence

    def append(self, sequence: int, data: dict[str, Any]) -> None:
        """Add an event (a sequence from next_sequence(), or a stored one on restore)."""
        self.items.append((sequence, data))
        self.last_sequence = max(self.last_sequence, sequence)
        while len(self.items) > self.limit:
            self.items.popleft()
        if data.get("kind") in TERMINAL_KINDS:
            self.terminal = True

    def after(self, sequence: int) -> list[tuple[int, dict[str, Any]]]:
        """The kept events with a sequence above ``sequence``, oldest first."""
        return [item for item in self.items if item[0] > sequence]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(eq=False)
class Record:
    """One server of one hub, as the Outpost knows it."""

    hub: str
    spec: convert.StartSpec
    state: int
    start_time: datetime
    events: EventLog
    address: dict[str, Any] | None = None
    exit_code: int | None = None
    failure_message: str = ""
    error_class: str = ""
    spawner: Spawner | None = None
    spawner_state: dict | None = None
    #: when the server was seen stopped (seconds since the epoch), for expiry.py; None:
    #: not known here (a failed start's FAILED event has the time)
    stopped_at: float | None = None
    #: when the Outpost stops the server because its runtime ends (runtime.py); None: never
    end_time: datetime | None = None
    #: why the Outpost stopped the server on its own (its runtime ended): for the user
    stop_message: str = ""
    #: the end of the notebook's output when its start failed or it exited (output_tail.py;
    #: Poll only, never in the cached status that BatchPoll and ListServers share)
    output_tail: str = ""
    #: the start while it runs (its tasks: start, checkpoint, progress); see starts.py
    run: StartRun | None = None
    #: waiting in the admission queue (admission.py): STARTING, but not yet a start in
    #: progress nor a server of its flavor (the limits do not count it)
    queued: bool = False
    #: the Spawner's start() has returned and the Outpost waits for the notebook to answer
    #: (readiness_check): no longer a start in progress for max_concurrent_starts_per_hub
    launched: bool = False
    #: set while the start is being persisted (Start returns when it is done)
    accepted: asyncio.Future | None = None
    stop_task: asyncio.Task | None = None
    poll_task: asyncio.Task | None = None
    #: held while an event is written, so a cancel never lands in the middle of one
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _status: pb.ServerStatus | None = None

    @property
    def key(self) -> Key:
        return (self.hub, self.spec.server_name)

    @property
    def name(self) -> str:
        return self.spec.server_name

    @property
    def start_id(self) -> str:
        return self.spec.start_id

    @property
    def flavor(self) -> str:
        """The flavor the start was admitted under ("": none)."""
        return self.spec.flavor

    @property
    def user_name(self) -> str:
        """The hub's name of the server's user (per-user limits count by it)."""
        return self.spec.user["name"]

    @property
    def last_sequence(self) -> int:
        return self.events.last_sequence

    @property
    def terminal(self) -> bool:
        return self.events.terminal

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
                flavor=self.spec.flavor,
            )
            if self.address and self.state == pb.SERVER_STATE_RUNNING:
                status.address.CopyFrom(pb.ServerAddress(**self.address))
            if self.exit_code is not None and self.state == pb.SERVER_STATE_STOPPED:
                status.exit_code = self.exit_code
            if self.end_time is not None:
                status.end_time.CopyFrom(convert.timestamp(self.end_time))
            if self.stop_message and self.state == pb.SERVER_STATE_STOPPED:
                status.stop_message = self.stop_message
            self._status = status
        return self._status

    # --- the database row, both ways ----------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        spec = self.spec
        address = self.address or {}
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
            "scheme": address.get("scheme"),
            "host": address.get("host"),
            "port": address.get("port"),
            "exit_code": self.exit_code,
            "failure_message": self.failure_message,
            "error_class": self.error_class,
            "start_time": self.start_time,
            "flavor": spec.flavor,
            "flavor_spec": spec.flavor_spec or None,
            "end_time": self.end_time,
            "stop_message": self.stop_message,
            "auth_state": spec.auth_state,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any], events: list[dict[str, Any]], *, max_events: int) -> Record:
        """The record of a stored row and its stored events (ordered by sequence)."""
        spec = convert.StartSpec(
            server_name=row["server_name"],
            start_id=row["start_id"],
            user=row["user_info"],
            env=row["env"] or {},
            user_options=row["user_options"] or {},
            config_overrides=row["config_overrides"] or {},
            spawner_name=row["spawner_name"] or "",
            flavor=row.get("flavor") or "",
            flavor_spec=row.get("flavor_spec") or {},
            auth_state=row.get("auth_state"),
        )
        rec = cls(
            hub=row["hub"],
            spec=spec,
            state=convert.STATE_VALUES.get(row["state"], pb.SERVER_STATE_UNKNOWN),
            start_time=row["start_time"],
            events=EventLog(max_events),
            exit_code=row["exit_code"],
            failure_message=row["failure_message"] or "",
            error_class=row["error_class"] or "",
            spawner_state=row["spawner_state"],
            end_time=utc(row.get("end_time")),
            stop_message=row.get("stop_message") or "",
        )
        if rec.state == pb.SERVER_STATE_STOPPED and isinstance(row.get("updated"), datetime):
            rec.stopped_at = utc(row["updated"]).timestamp()  # its last write: when it stopped
        if row["host"]:
            rec.address = {"scheme": row["scheme"], "host": row["host"], "port": row["port"]}
        for ev in events:
            rec.events.append(ev["sequence"], ev["data"])
            if ev["data"].get("kind") == pb.EVENT_KIND_FAILED:
                rec.output_tail = ev["data"].get("output_tail", "")  # kept with the event
        return rec


def utc(when: datetime | None) -> datetime | None:
    """A stored time, aware: SQLite gives naive datetimes, which are UTC."""
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when


class Records(Mapping):
    """Every Record by (hub, server_name), with an index per hub.

    A read-only mapping (what RPCs read on their hot path); :meth:`put` and
    :meth:`remove` are the only ways to change it, and they keep the per hub index (its
    records, and its server names in order) in step: ListServers pages and the SSH
    forwarder's checks cost the size of one hub's share, not of every server.
    """

    def __init__(self) -> None:
        self._all: dict[Key, Record] = {}
        self._by_hub: dict[str, dict[str, Record]] = {}
        self._sorted_names: dict[str, list[str]] = {}
        # what flavor admission counts (manager.py): the records of each flavor, and of
        # each (hub, user name); active or not (a count looks at their states)
        self._by_flavor: dict[str, set[Record]] = {}
        self._by_user: dict[tuple[str, str], set[Record]] = {}

    def __getitem__(self, key: Key) -> Record:
        return self._all[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: object) -> bool:
        return key in self._all

    def get(self, key: Key, default: Any = None) -> Any:  # the hot path: no Mapping detour
        return self._all.get(key, default)

    def current(self, rec: Record) -> bool:
        """Whether rec is still the record of its server (not stopped, not replaced)."""
        return self._all.get(rec.key) is rec

    def put(self, rec: Record) -> None:
        """Make rec the record of its server (replacing any other)."""
        key = rec.key
        old = self._all.get(key)
        if old is None:
            bisect.insort(self._sorted_names.setdefault(rec.hub, []), rec.name)
        elif old is not rec:
            self._unindex(old)
        self._all[key] = rec
        self._by_hub.setdefault(rec.hub, {})[rec.name] = rec
        self._by_flavor.setdefault(rec.flavor, set()).add(rec)
        self._by_user.setdefault((rec.hub, rec.user_name), set()).add(rec)

    def _unindex(self, rec: Record) -> None:
        for index, key in ((self._by_flavor, rec.flavor), (self._by_user, (rec.hub, rec.user_name))):
            records = index.get(key)
            if records is not None:
                records.discard(rec)
                if not records:
                    del index[key]

    def remove(self, rec: Record) -> bool:
        """Forget rec if it is still its server's record; True if it was."""
        if not self.current(rec):
            return False
        hub, name = rec.key
        del self._all[rec.key]
        self._unindex(rec)
        del self._by_hub[hub][name]
        names = self._sorted_names[hub]
        del names[bisect.bisect_left(names, name)]
        if not names:
            del self._by_hub[hub], self._sorted_names[hub]
        return True

    def active_of_flavor(self, flavor: str) -> list[Record]:
        """The active records (ACTIVE states) admitted under flavor."""
        return [r for r in self._by_flavor.get(flavor, ()) if r.state in ACTIVE]

    def active_of_user(self, hub: str, user_name: str) -> list[Record]:
        """The active records of one hub's user, of any flavor."""
        return [r for r in self._by_user.get((hub, user_name), ()) if r.state in ACTIVE]

    def of_hub(self, hub: str) -> Mapping[str, Record]:
        return self._by_hub.get(hub, {})

    def of_other_hubs(self, hub: str) -> Iterator[Record]:
        """Every record of every hub but hub (costs the others' share only)."""
        for other, records in self._by_hub.items():
            if other != hub:
                yield from records.values()

    def page(self, hub: str, after_name: str, size: int) -> tuple[list[Record], bool]:
        """Up to size of hub's records with names after after_name, in name order, and
        whether more follow."""
        names = self._sorted_names.get(hub, [])
        first = bisect.bisect_right(names, after_name)
        page = names[first : first + size]
        of_hub = self._by_hub.get(hub, {})
        return [of_hub[name] for name in page], len(names) > first + size
