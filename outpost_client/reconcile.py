"""The hub's orphan reconciler: stop at an Outpost what the hub no longer knows.

A server keeps its allocation at the site for as long as the Outpost holds it. When the
hub forgets a server without a successful Stop (a user deleted while the Outpost was
unreachable, a Stop lost in a long outage, a hub database restored from a backup), nothing
else ever stops it. The hub owns the truth, so the hub reconciles: one
:class:`OutpostReconciler` per Outpost (per distinct :class:`OutpostConfig`) in the hub
process, at start-up and every ``interval`` seconds, pages through ``ListServers``,
compares with the hub's own spawners (:func:`hub_view_from_app`) and Stops, with the
site's ``start_id``, what the hub does not know and has not known for ``grace_period``.

Never stopped:

- a server the hub knows: the pair (server name at the Outpost, start_id) is in a
  spawner's state in the hub's database or in a spawner object in memory;
- a server whose start is in flight: STARTING (or STOPPING) at the Outpost, or a spawner
  of the hub with a pending spawn or stop under that name;
- a server seen unknown for less than ``grace_period`` by this reconciler (a hub
  restart starts the clock again), or started less than ``grace_period`` ago.

The decision is :func:`plan`, a pure function of the site's list, the hub's view and the
clock (tests/test_reconcile.py). Started by the first OutpostSpawner the hub makes
(:func:`start_reconcilers`): JupyterHub has no start-up hook, and it makes one for every
running server at start-up (and at a user's first request otherwise).
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Integer
from traitlets.config import LoggingConfigurable

from .errors import OutpostError
from .v1 import outpost_pb2 as pb

if TYPE_CHECKING:
    from .client import OutpostClient
    from .outposts import OutpostConfig

# at the Outpost, a start or a stop is under way: never the reconciler's business
IN_FLIGHT_STATES = frozenset({pb.SERVER_STATE_STARTING, pb.SERVER_STATE_STOPPING})


@dataclass(frozen=True)
class HubView:
    """What the hub knows of one Outpost's servers, at one moment.

    ``known``: (server name at the Outpost, start_id) of every server the hub holds;
    ``in_flight``: server names at the Outpost of the hub's spawners with a spawn or stop
    pending (their start_id may not be set or stored yet).
    """

    known: frozenset[tuple[str, str]] = frozenset()
    in_flight: frozenset[str] = frozenset()

    @property
    def known_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.known)


@dataclass(frozen=True)
class Orphan:
    """A server at the Outpost to stop, and why (the sentence the log gets)."""

    server_name: str
    start_id: str
    user_name: str
    reason: str


@dataclass
class Plan:
    """The outcome of :func:`plan`: what to stop now, and since when each server the hub
    does not know has been seen so (the next pass's ``unknown_since``)."""

    stop: list[Orphan] = field(default_factory=list)
    unknown_since: dict[tuple[str, str], float] = field(default_factory=dict)
    waiting: int = 0  # unknown, but within the grace period


def _seconds(ts) -> float | None:
    """A protobuf Timestamp as POSIX seconds; None if unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def plan(
    servers: Iterable[pb.ServerStatus],
    hub: HubView,
    unknown_since: dict[tuple[str, str], float],
    now: float,
    grace: float,
) -> Plan:
    """What to stop at one Outpost: its ``servers`` (ListServers) against the ``hub``'s
    view, at ``now`` (POSIX seconds).

    A server is an orphan if the hub does not know its (name, start_id), no spawn or stop
    of its name is pending at the hub, it is not STARTING or STOPPING at the Outpost, and
    both the first time this reconciler saw it so (``unknown_since``, the last pass's
    ``Plan.unknown_since``) and its start (``start_time``) are at least ``grace`` seconds
    ago. One pass over ``servers``, one set lookup each: linear in their number.
    """
    result = Plan()
    known_names = None  # only for the reason of a stop: computed when there is one
    for s in servers:
        key = (s.server_name, s.start_id)
        if key in hub.known or s.server_name in hub.in_flight or s.state in IN_FLIGHT_STATES:
            continue
        since = unknown_since.get(key, now)
        result.unknown_since[key] = since
        started = _seconds(s.start_time)
        if now - since < grace or (started is not None and now - started < grace):
            result.waiting += 1
            continue
        if known_names is None:
            known_names = hub.known_names
        what = "another start of this server" if s.server_name in known_names else "no such server"
        reason = (
            f"the hub has {what} (user {s.user_name!r}, start {s.start_id}, "
            f"{pb.ServerState.Name(s.state)}, started {_when(started) if started else 'at an unknown time'}); "
            f"unknown to the hub since {_when(since)}, longer than the grace period of {grace:g}s"
        )
        result.stop.append(Orphan(s.server_name, s.start_id, s.user_name, reason))
    return result


# --- the hub's view ------------------------------------------------------------------------


def hub_view_from_app(app: Any, outpost_names: Iterable[str], template: str) -> HubView:
    """The hub's view of the Outpost named any of ``outpost_names`` (several names may be
    one Outpost), from the running JupyterHub ``app``: every spawner's state in the hub's
    database (users not loaded included), and the spawner objects in memory (a start not
    stored yet, pending spawns and stops). ``template`` is OutpostSpawner's
    server_name_template, for a pending spawn that has not named its server yet.
    """
    from jupyterhub import orm

    from .spawner import OutpostSpawner, remote_server_name

    names = set(outpost_names)
    known: set[tuple[str, str]] = set()
    in_flight: set[str] = set()
    for orm_spawner in app.db.query(orm.Spawner):
        state = orm_spawner.state
        if not state:
            continue
        remote, start_id = state.get("remote_name"), state.get("start_id")
        if remote and start_id and (state.get("outpost_name") or "default") in names:
            known.add((remote, start_id))
    for user in list(app.users.values()):
        for spawner in list(user.spawners.values()):
            if not isinstance(spawner, OutpostSpawner):
                continue
            if spawner.start_id and spawner.remote_name and (spawner.outpost_name or "default") in names:
                known.add((spawner.remote_name, spawner.start_id))
            if spawner.pending:
                # whichever Outpost it chooses: its name is not stopped anywhere meanwhile
                if spawner.remote_name:
                    in_flight.add(spawner.remote_name)
                try:
                    in_flight.add(remote_server_name(template, user.name, spawner.name))
                except ValueError:
                    pass  # a name the start refuses: nothing at any Outpost
    return HubView(frozenset(known), frozenset(in_flight))


# --- the reconciler ------------------------------------------------------------------------


class OutpostReconciler(LoggingConfigurable):
    """Stops at one Outpost the servers the hub does not know (one per Outpost)."""

    interval = Float(
        600.0,
        min=0,
        config=True,
        help="""Seconds between two reconcile passes of each Outpost (the first runs when the
        hub makes its first OutpostSpawner, at start-up if any server runs). 0 switches the
        reconciler off: servers the hub forgot then keep running at the sites.""",
    )
    grace_period = Float(
        1800.0,
        min=0,
        config=True,
        help="""Seconds a server must have been unknown to the hub (as seen by this hub
        process: a hub restart starts the clock again) and running at the Outpost before it
        is stopped. Covers a hub's start whose state is not stored yet and clocks that
        differ between hub and site.""",
    )
    dry_run = Bool(
        False,
        config=True,
        help="""Only log (WARNING) what would be stopped, and why; stop nothing. For a first
        run against Outposts that have run long without a reconciler.""",
    )
    page_size = Integer(
        500,
        min=1,
        max=10000,
        config=True,
        help="Servers per ListServers call (one page); a pass reads every page.",
    )
    max_stops = Integer(
        100,
        min=1,
        config=True,
        help="""At most this many Stops per Outpost and pass, one after the other; the rest
        wait for the next pass. Bounds the load a pass puts on a site.""",
    )

    def __init__(
        self,
        outpost_name: str,
        hub_view: Callable[[], HubView],
        client: Callable[[], OutpostClient],
        *,
        clock: Callable[[], float] = time.time,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.outpost_name = outpost_name
        self._hub_view = hub_view
        self._client = client
        self._clock = clock
        self.unknown_since: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task | None = None

    async def _site_servers(self, client: OutpostClient) -> list[pb.ServerStatus]:
        servers: list[pb.ServerStatus] = []
        async for page in client.list_server_pages(page_size=self.page_size):
            servers.extend(page)
        return servers

    async def reconcile_once(self) -> list[Orphan]:
        """One pass: list the Outpost's servers, then read the hub's view (after the list:
        whatever the list holds was started before the view was read), stop the orphans.
        Returns the orphans stopped (or, in dry-run mode, those that would be)."""
        client = self._client()
        servers = await self._site_servers(client)
        view = self._hub_view()
        result = plan(servers, view, self.unknown_since, self._clock(), self.grace_period)
        self.unknown_since = result.unknown_since
        orphans = result.stop[: self.max_stops]
        if len(result.stop) > len(orphans):
            self.log.warning(
                "Reconcile of Outpost %s: %d orphans, stopping %d in this pass (max_stops)",
                self.outpost_name, len(result.stop), len(orphans),
            )  # fmt: skip
        done = []
        for orphan in orphans:
            if self.dry_run:
                self.log.warning(
                    "Reconcile (dry run) of Outpost %s would stop %s: %s", self.outpost_name, orphan.server_name, orphan.reason
                )
                done.append(orphan)
                continue
            try:
                answer = await client.stop(orphan.server_name, orphan.start_id)
            except OutpostError as e:
                self.log.warning("Reconcile of Outpost %s could not stop %s: %s", self.outpost_name, orphan.server_name, e)
                continue
            self.unknown_since.pop((orphan.server_name, orphan.start_id), None)
            self.log.warning(
                "Reconcile of Outpost %s stopped %s (%s): %s",
                self.outpost_name, orphan.server_name, pb.StopOutcome.Name(answer.outcome), orphan.reason,
            )  # fmt: skip
            done.append(orphan)
        self.log.debug(
            "Reconcile of Outpost %s: %d servers, %d unknown within the grace period, %d stopped",
            self.outpost_name, len(servers), result.waiting, len(done),
        )  # fmt: skip
        return done

    async def run(self) -> None:
        """Reconcile now and then every ``interval`` seconds, until cancelled. A failed
        pass (the Outpost unreachable, the hub's database busy) is logged and stops
        nothing; the next pass tries again."""
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except OutpostError as e:
                self.log.warning("Reconcile of Outpost %s skipped: %s", self.outpost_name, e)
            except Exception:
                self.log.exception("Reconcile of Outpost %s failed", self.outpost_name)
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"reconcile-{self.outpost_name}")
        return self._task

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


# --- in the hub process --------------------------------------------------------------------

#: the hub process's reconcilers, one per distinct OutpostConfig (empty until the first
#: OutpostSpawner of a running JupyterHub, and when the reconciler is off)
RECONCILERS: dict[OutpostConfig, OutpostReconciler] = {}
_started = False


def start_reconcilers(spawner) -> bool:
    """Start one reconciler per Outpost, once per hub process: called by every new
    OutpostSpawner, does something only for the first one made inside a running
    JupyterHub (never outside one: tests, tools). True if it started them now."""
    global _started
    if _started:
        return False
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return False
    app = JupyterHub.instance()
    if getattr(app, "db", None) is None or getattr(app, "users", None) is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    _started = True
    from .registry import REGISTRY
    from .spawner import adopt_hub_logging

    adopt_hub_logging(spawner.log)
    settings = OutpostReconciler("", lambda: HubView(), lambda: None, config=spawner.config, log=spawner.log)
    if settings.interval <= 0:
        spawner.log.info("Outpost reconciler is off (OutpostReconciler.interval = 0)")
        return False
    try:
        configs = spawner._outpost_configs()
    except ValueError as e:
        spawner.log.error("Outpost reconciler not started: %s", e)
        return False
    by_config: dict[OutpostConfig, list[str]] = {}
    for name, config in configs.items():
        by_config.setdefault(config, []).append(name)
    template, timeout = spawner.server_name_template, spawner.outpost_timeout
    for config, names in by_config.items():
        reconciler = OutpostReconciler(
            "/".join(names),
            lambda names=tuple(names): hub_view_from_app(app, names, template),
            lambda config=config: REGISTRY.get(config).client(timeout),
            config=spawner.config,
            log=spawner.log,
        )
        RECONCILERS[config] = reconciler
        reconciler.start()
    spawner.log.info(
        "Outpost reconciler started for %d Outpost(s): every %gs, grace period %gs%s",
        len(by_config), settings.interval, settings.grace_period, " (dry run)" if settings.dry_run else "",
    )  # fmt: skip
    return True
