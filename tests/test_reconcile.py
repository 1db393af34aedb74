"""The hub's orphan reconciler, its pure part: what to stop, given the Outpost's list of
servers, the hub's view and the clock (outpost_client/reconcile.py ``plan``), and the
hub's view read from a JupyterHub (``hub_view_from_app``) with its real ORM."""

from __future__ import annotations

import logging

import pytest

from outpost_client import pb
from outpost_client.reconcile import HubView, OutpostReconciler, hub_view_from_app, plan

from .harness.hub import make_spawner

pytestmark = pytest.mark.unit

NOW = 1_000_000.0
GRACE = 1800.0


def status(name, start_id="s1", state=pb.SERVER_STATE_RUNNING, started=NOW - 3600, user="alice") -> pb.ServerStatus:
    s = pb.ServerStatus(server_name=name, start_id=start_id, state=state, user_name=user)
    if started is not None:
        s.start_time.FromNanoseconds(int(started * 1e9))
    return s


def names(result) -> list[str]:
    return [o.server_name for o in result.stop]


def test_reconcile_stops_only_what_the_hub_does_not_know_after_the_grace():
    servers = [status("alice"), status("bob"), status("carol")]
    hub = HubView(known=frozenset({("bob", "s1")}))
    # first sight: carol and alice are unknown, but only just seen so
    first = plan(servers, hub, {}, NOW, GRACE)
    assert names(first) == []
    assert set(first.unknown_since) == {("alice", "s1"), ("carol", "s1")}
    assert first.waiting == 2
    # still within the grace period
    assert names(plan(servers, hub, first.unknown_since, NOW + GRACE - 1, GRACE)) == []
    later = plan(servers, hub, first.unknown_since, NOW + GRACE, GRACE)
    assert names(later) == ["alice", "carol"]
    assert [o.start_id for o in later.stop] == ["s1", "s1"]
    assert "no such server" in later.stop[0].reason and "'alice'" in later.stop[0].reason


def test_reconcile_grace_restarts_when_the_hub_knows_it_again():
    servers = [status("alice")]
    seen = plan(servers, HubView(), {}, NOW, GRACE).unknown_since
    # the hub knows it again (e.g. its start's state was stored late): the clock is reset
    known = plan(servers, HubView(known=frozenset({("alice", "s1")})), seen, NOW + 10, GRACE)
    assert known.unknown_since == {} and names(known) == []
    again = plan(servers, HubView(), known.unknown_since, NOW + GRACE + 20, GRACE)
    assert names(again) == [] and again.unknown_since == {("alice", "s1"): NOW + GRACE + 20}


def test_reconcile_grace_counts_from_the_start_too():
    """A server started less than the grace period ago is never stopped, however long
    this reconciler has been told nothing about its name."""
    servers = [status("young", started=NOW - 60), status("old", started=NOW - GRACE)]
    since = {("young", "s1"): NOW - 10 * GRACE, ("old", "s1"): NOW - 10 * GRACE}
    assert names(plan(servers, HubView(), since, NOW, GRACE)) == ["old"]


def test_reconcile_never_stops_a_start_in_flight():
    servers = [
        status("starting", state=pb.SERVER_STATE_STARTING),
        status("stopping", state=pb.SERVER_STATE_STOPPING),
        status("pending-at-hub"),
        status("stopped", state=pb.SERVER_STATE_STOPPED),
        status("unknown", state=pb.SERVER_STATE_UNKNOWN),
    ]
    since = {(s.server_name, s.start_id): NOW - 2 * GRACE for s in servers}
    result = plan(servers, HubView(in_flight=frozenset({"pending-at-hub"})), since, NOW, GRACE)
    # in flight at the site (STARTING, STOPPING) or at the hub (a pending spawn): left
    # alone and not even tracked; a failed or exited server, or one whose poll failed, is
    # still held at the site
    assert names(result) == ["stopped", "unknown"]
    assert set(result.unknown_since) == {("stopped", "s1"), ("unknown", "s1")}


def test_reconcile_another_start_id_is_an_orphan_and_says_so():
    """The hub knows the name under another start (its Stop of the old one was lost and
    the name was started again, or the other way round): the old start is stopped, by its
    own start_id, so the Outpost can never stop the hub's start with it."""
    servers = [status("alice", start_id="old")]
    hub = HubView(known=frozenset({("alice", "new")}))
    result = plan(servers, hub, {("alice", "old"): NOW - GRACE}, NOW, GRACE)
    assert [(o.server_name, o.start_id) for o in result.stop] == [("alice", "old")]
    assert "another start of this server" in result.stop[0].reason


def test_reconcile_zero_grace_and_no_start_time():
    result = plan([status("x", started=None)], HubView(), {}, NOW, 0)
    assert names(result) == ["x"] and "unknown time" in result.stop[0].reason


class CountingSet(frozenset):
    lookups = 0

    def __contains__(self, item):
        CountingSet.lookups += 1
        return super().__contains__(item)


@pytest.mark.parametrize("n", [2000, 4000])
def test_reconcile_2000_servers_is_linear(n):
    """One pass over 2,000 (4,000) servers does a bounded number of set lookups per
    server (no scan of the hub's view per server): the work grows with n, not n**2."""
    servers = [status(f"user{i}", start_id=f"s{i}") for i in range(n)]
    known = CountingSet((f"user{i}", f"s{i}") for i in range(0, n, 2))
    in_flight = CountingSet(f"user{i}" for i in range(1, n, 10))
    hub = HubView(known=known, in_flight=in_flight)
    since = {(s.server_name, s.start_id): NOW - 2 * GRACE for s in servers}
    CountingSet.lookups = 0
    result = plan(servers, hub, since, NOW, GRACE)
    assert CountingSet.lookups <= 2 * n
    assert len(result.stop) == n // 2 - n // 10


# --- the reconciler's pass, with a stand-in Outpost -------------------------------------------


class StandInOutpost:
    """The Outpost's answers as a list (the RPCs themselves: tests/test_reconcile_outpost.py)."""

    def __init__(self, servers):
        self.servers = {s.server_name: s for s in servers}
        self.stopped: list[tuple[str, str]] = []

    async def list_server_pages(self, *, page_size=0):
        ordered = sorted(self.servers.values(), key=lambda s: s.server_name)
        for i in range(0, len(ordered), page_size):
            yield ordered[i : i + page_size]

    async def stop(self, name, start_id=""):
        self.stopped.append((name, start_id))
        self.servers.pop(name, None)
        return pb.StopResponse(outcome=pb.STOP_OUTCOME_STOPPED)


def reconciler(outpost, view, clock, **traits):
    log = logging.getLogger("test.reconcile")
    return OutpostReconciler("default", lambda: view, lambda: outpost, clock=clock, log=log, **traits)


async def test_reconcile_dry_run_logs_and_stops_nothing(caplog):
    outpost = StandInOutpost([status("alice"), status("bob")])
    now = [NOW]
    r = reconciler(outpost, HubView(known=frozenset({("bob", "s1")})), lambda: now[0], dry_run=True, grace_period=60)
    caplog.set_level(logging.INFO, "test.reconcile")
    assert await r.reconcile_once() == []
    now[0] += 60
    would = await r.reconcile_once()
    assert [o.server_name for o in would] == ["alice"]
    assert outpost.stopped == [] and set(outpost.servers) == {"alice", "bob"}
    assert "(dry run)" in caplog.text and "would stop alice" in caplog.text
    # and again next time: a dry run forgets nothing
    assert [o.server_name for o in await r.reconcile_once()] == ["alice"]


async def test_reconcile_logs_each_stop_with_its_reason_and_bounds_a_pass(caplog):
    outpost = StandInOutpost([status(f"u{i}", start_id=f"s{i}") for i in range(5)])
    now = [NOW]
    r = reconciler(outpost, HubView(), lambda: now[0], grace_period=0, max_stops=2, page_size=2)
    caplog.set_level(logging.INFO, "test.reconcile")
    first = await r.reconcile_once()
    assert [o.server_name for o in first] == ["u0", "u1"]
    assert outpost.stopped == [("u0", "s0"), ("u1", "s1")]
    assert "5 orphans, stopping 2 in this pass" in caplog.text
    for name in ("u0", "u1"):
        assert f"stopped {name} (STOP_OUTCOME_STOPPED): the hub has no such server" in caplog.text
    await r.reconcile_once()
    await r.reconcile_once()
    assert [n for n, _ in outpost.stopped] == ["u0", "u1", "u2", "u3", "u4"]


# --- the hub's view, from JupyterHub's own database -------------------------------------------


def test_reconcile_hub_view_reads_the_hub_database_and_pending_spawners():
    from types import SimpleNamespace

    from jupyterhub import orm

    db = orm.new_session_factory("sqlite://")()
    alice, bob = orm.User(name="alice"), orm.User(name="bob")
    db.add_all([alice, bob])
    db.commit()
    states = [
        (alice, "", {"outpost_name": "default", "remote_name": "alice", "start_id": "a1"}),
        (alice, "gpu", {"outpost_name": "gpu", "remote_name": "alice--gpu", "start_id": "a2"}),
        (bob, "", {"outpost_name": "", "remote_name": "bob", "start_id": "b1"}),  # "" is default
        (bob, "old", {}),  # stopped: state cleared
    ]
    for user, name, state in states:
        db.add(orm.Spawner(user=user, name=name, state=state))
    db.commit()

    # in memory: a start whose state is not stored yet, and a pending spawn without one
    started = make_spawner(SimpleNamespace(address="127.0.0.1:1"), "lab")
    started.outpost_name, started.remote_name, started.start_id = "default", "alice--lab", "a3"
    pending = make_spawner(SimpleNamespace(address="127.0.0.1:1"), "new")
    pending._spawn_pending = True
    app = SimpleNamespace(db=db, users={1: SimpleNamespace(name="alice", spawners={"lab": started, "new": pending})})

    view = hub_view_from_app(app, ["default", "also-default"], "{username}--{servername}")
    assert view.known == {("alice", "a1"), ("bob", "b1"), ("alice--lab", "a3")}
    assert view.in_flight == {"alice--new"}
    gpu = hub_view_from_app(app, ["gpu"], "{username}--{servername}")
    assert gpu.known == {("alice--gpu", "a2")} and gpu.in_flight == {"alice--new"}
