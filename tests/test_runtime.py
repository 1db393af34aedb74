"""Runtime limits (issue 12, part 3): at a server's end time the Outpost stops it on its
own, keeps it STOPPED with a stop_message for its hub's next poll, and does so across
restarts (the end time is in the database; no lock file).

``StopCountingSpawner`` counts its stop() calls (class state, reset per test).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import Column, MetaData, Table, insert
from sqlalchemy.ext.asyncio import create_async_engine

from outpost_client import OutpostClient, pb
from outpost_server import migrations, runtime, store
from outpost_server.runtime import admitted_message, format_duration, format_end_time, stop_message
from outpost_server.testing import HangingStopSpawner, InstantSpawner, class_state

from .harness.hub import make_spawner
from .harness.outpost import outpost_config, running_outpost
from .harness.util import wait_for

pytestmark = pytest.mark.rpc

SPAWNER = "tests.test_runtime.StopCountingSpawner"


@class_state("stops")
class StopCountingSpawner(InstantSpawner):
    stops = 0

    async def stop(self, now=False):
        StopCountingSpawner.stops += 1


def limit(op, name: str, seconds: float, hub: str = "default"):
    """Give server name an end time seconds from now, as admission under a flavor does."""
    rec = op.manager.records[(hub, name)]
    rec.end_time = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    rec.changed()
    op.manager.runtime.schedule(rec)
    return rec


async def stopped(client, name: str):
    status = await client.poll(name)
    return status if status.state == pb.SERVER_STATE_STOPPED else None


# --- pure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [(8 * 3600, "8 h"), (5400, "1 h 30 min"), (2700, "45 min"), (90, "1 min 30 s"), (2, "2 s"), (0, "0 s"),
     (3 * 3600 + 61, "3 h 1 min"), (2 * 3600 - 10, "2 h"), (599, "9 min 59 s")],
)  # fmt: skip
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_messages_name_the_end_time_the_limit_and_the_flavor():
    start = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)

    rec = SimpleNamespace(start_time=start, end_time=start + timedelta(hours=8), spec=SimpleNamespace(flavor=""))
    assert admitted_message(rec) == "Your server will run until 18:30 UTC (8 h limit)."
    assert stop_message(rec) == "Your server was stopped after its 8 h limit."
    rec.spec.flavor = "small"
    assert admitted_message(rec) == "Your server will run until 18:30 UTC (8 h limit of flavor small)."
    assert stop_message(rec) == "Your server was stopped after its 8 h limit (flavor small)."
    assert format_end_time(start + timedelta(hours=20), start) == "2026-11-29 06:30 UTC"
    assert format_end_time(start + timedelta(seconds=2), start) == "10:30:02 UTC"
    assert runtime.end_time_for(start, 0) is None


# --- the schema -------------------------------------------------------------------------


async def test_a_database_of_schema_1_is_upgraded_and_keeps_its_servers(tmp_path):
    """An Outpost upgraded in place: its database (no end_time, no stop_message) is
    refused until upgrade-db (tests/test_migrations.py) gives it the columns, and its
    servers read back without an end time."""
    url = f"sqlite:///{tmp_path}/old.sqlite"
    old = MetaData()
    for table in (store.servers, store.events, store.schema_info):
        columns = [
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in table.columns
            # schema 2's, and schema 3's (auth_state)
            if c.name not in ("flavor", "flavor_spec", "end_time", "stop_message", "auth_state")
        ]
        Table(table.name, old, *columns)
    engine = create_async_engine(store.async_url(url))
    now = datetime.now(timezone.utc)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        await conn.execute(insert(old.tables["outpost_schema"]).values(version=1))
        await conn.execute(insert(old.tables["outpost_servers"]).values(
            hub="h", server_name="nb", start_id="s1", state="running", user_info={"name": "alice"},
            spawner_name="", env={}, user_options={}, config_overrides={}, failure_message="",
            error_class="", start_time=now, updated=now,
        ))  # fmt: skip
    await engine.dispose()

    with pytest.raises(migrations.SchemaOutdated):
        await store.Store(url).open()
    await migrations.upgrade_database(url, say=lambda _: None)
    for _ in range(2):  # and a second start-up changes nothing
        db = store.Store(url)
        await db.open()
        try:
            rows, _ = await db.load()
        finally:
            await db.close()
        (row,) = rows
        assert row["end_time"] is None and row["stop_message"] is None and row["flavor"] == ""
    engine = create_async_engine(store.async_url(url))
    async with engine.connect() as conn:
        assert (await conn.execute(store.select(store.schema_info.c.version))).scalar() == store.SCHEMA_VERSION
    await engine.dispose()


# --- in process -------------------------------------------------------------------------

FLAVORS = {"tiny": {"max_runtime": 1, "default": True}, "long": {"max_runtime": 3600}, "free": {}}


async def test_a_flavors_runtime_ends_its_server(start_outpost):
    """Admitted under a flavor with a 1 s runtime: the end time is in Start's status and
    in the first progress events; then the Outpost stops the server, which its hub's next
    poll reads as STOPPED with the reason."""
    async with start_outpost(SPAWNER, flavors=FLAVORS) as op:
        result = await op.client.start("nb", "s1", user_name="alice", flavor="tiny")
        status = result.status
        assert status.flavor == "tiny" and status.HasField("end_time")
        runtime_s = status.end_time.ToDatetime() - status.start_time.ToDatetime()
        assert runtime_s == timedelta(seconds=1)
        end = status.end_time.ToDatetime(tzinfo=timezone.utc)
        events = [e async for e in op.client.events("nb")]
        until = f"Your server will run until {end:%H:%M:%S} UTC (1 s limit of flavor tiny)."
        assert until in [e.message for e in events]

        status = await wait_for(lambda: stopped(op.client, "nb"), timeout=20)
        assert status.stop_message == "Your server was stopped after its 1 s limit (flavor tiny)."
        assert status.flavor == "tiny" and not status.failure_message
        assert StopCountingSpawner.stops == 1
        # a stopped server holds no place in its flavor any more
        (tiny,) = [f for f in (await op.client.list_flavors("alice")).flavors if f.name == "tiny"]
        assert tiny.in_use_total == 0


async def test_a_start_still_pending_at_its_end_time_ends_with_the_reason(start_outpost):
    """A start that is not ready by its end time (a batch job queued for hours) is
    stopped too; its event stream ends FAILED with the reason, which the spawn page shows."""
    async with start_outpost("outpost_server.testing.NeverReadySpawner", flavors=FLAVORS) as op:
        await op.client.start("nb", "s1", user_name="alice", flavor="tiny")
        events = [e async for e in op.client.events("nb", timeout=30)]
        assert events[-1].kind == pb.EVENT_KIND_FAILED
        assert events[-1].message == "Your server was stopped after its 1 s limit (flavor tiny)."
        status = await op.client.poll("nb")
        assert status.state == pb.SERVER_STATE_STOPPED and status.stop_message == events[-1].message


async def test_a_flavor_without_runtime_has_no_end_time(start_outpost):
    async with start_outpost(SPAWNER, flavors=FLAVORS) as op:
        result = await op.client.start("nb", "s1", user_name="alice", flavor="free", wait_until_ready=True)
        assert not result.status.HasField("end_time")
        assert op.manager.runtime.pending == 0
        assert not any("will run until" in e.message for e in [e async for e in op.client.events("nb")])


async def test_the_outpost_stops_a_server_at_its_end_time_and_keeps_why(start_outpost):
    async with start_outpost(SPAWNER) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        rec = limit(op, "nb", 1.0)
        status = await op.client.poll("nb")
        assert status.state == pb.SERVER_STATE_RUNNING
        assert status.end_time.ToDatetime(tzinfo=timezone.utc) == rec.end_time
        assert not status.stop_message

        status = await wait_for(lambda: stopped(op.client, "nb"), timeout=20)
        assert status.stop_message == "Your server was stopped after its 1 s limit."
        assert status.start_id == "s1" and status.HasField("end_time")
        assert StopCountingSpawner.stops == 1
        # BatchPoll and ListServers say the same
        (batch,), _ = await op.client.batch_poll(["nb"])
        assert batch.stop_message == status.stop_message
        (listed,) = await op.client.list_servers()
        assert listed.state == pb.SERVER_STATE_STOPPED and listed.stop_message == status.stop_message
        assert op.manager.runtime.pending == 0
        # the hub's Stop forgets it; the Spawner is not stopped twice
        assert (await op.client.stop("nb", "s1")).outcome == pb.STOP_OUTCOME_STOPPED
        assert StopCountingSpawner.stops == 1
        assert [s.server_name for s in await op.client.list_servers()] == []


async def test_a_hub_stop_before_the_end_time_cancels_the_timer(start_outpost):
    async with start_outpost(SPAWNER) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        limit(op, "nb", 3600)
        assert op.manager.runtime.pending == 1
        await op.client.stop("nb", "s1")
        assert op.manager.runtime.pending == 0
        assert StopCountingSpawner.stops == 1
        # a new start of the name has no end time of the old one
        await op.client.start("nb", "s2", user_name="alice", wait_until_ready=True)
        assert op.manager.runtime.pending == 0
        assert not (await op.client.poll("nb")).HasField("end_time")


def files_under(path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


async def test_a_server_past_its_end_time_at_restore_is_stopped(tmp_path):
    cfg = outpost_config(tmp_path, SPAWNER)
    before = files_under(tmp_path)
    async with running_outpost(cfg) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        await op.client.start("other", "s2", user_name="bob", wait_until_ready=True)
        rec = limit(op, "nb", 3600)
        # admitted an hour and a bit ago; its end time passed while the Outpost was "down"
        rec.start_time = datetime.now(timezone.utc) - timedelta(hours=1, seconds=5)
        rec.end_time = rec.start_time + timedelta(hours=1)
        await op.manager.journal.write(rec, start_time=rec.start_time, end_time=rec.end_time)
    async with running_outpost(cfg) as op:
        status = await wait_for(lambda: stopped(op.client, "nb"), timeout=20)
        assert status.stop_message.startswith("Your server was stopped after its 1 h limit.")
        assert (await op.client.poll("other")).state == pb.SERVER_STATE_RUNNING
        assert StopCountingSpawner.stops == 1
    # and kept STOPPED with its message across the next restart
    async with running_outpost(cfg) as op:
        status = await op.client.poll("nb")
        assert status.state == pb.SERVER_STATE_STOPPED and status.stop_message.startswith("Your server was stopped")
        assert StopCountingSpawner.stops == 1
    # no lock file: what the Outpost left is its database (and its certificates directory)
    left = {f for f in files_under(tmp_path) - before if ".sqlite" not in f and not f.startswith("outpost-certs")}
    assert left == set()


async def test_a_hub_stop_during_the_runtime_stop_forgets_the_server(start_outpost):
    """The hub's Stop arrives while the Outpost is stopping the server at its end time:
    it shares that stop (the Spawner is stopped once) and then forgets the server."""
    async with start_outpost(SPAWNER) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        gate = asyncio.Event()
        rec = op.manager.records[("default", "nb")]
        stop = rec.spawner.stop

        async def slow_stop(now=False):
            await gate.wait()
            await stop(now)

        rec.spawner.stop = slow_stop
        limit(op, "nb", 0)
        await wait_for(lambda: rec.state == pb.SERVER_STATE_STOPPING)
        calls = []
        manager_stop = op.manager.stop

        async def hubs_stop(*args, **kwargs):  # the servicer's call
            calls.append(args)
            return await manager_stop(*args, **kwargs)

        op.manager.stop = hubs_stop
        hub_stop = asyncio.ensure_future(op.client.stop("nb", "s1"))
        await wait_for(lambda: calls)  # it waits for the runtime's stop now
        gate.set()
        assert (await hub_stop).outcome == pb.STOP_OUTCOME_STOPPED
        assert await op.client.list_servers() == []
        assert StopCountingSpawner.stops == 1


async def test_a_failing_stop_at_the_end_time_is_tried_again(start_outpost, caplog):
    async with start_outpost(SPAWNER, cleanup_timeout=5) as op:
        op.manager.runtime.retry = 0.2
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        calls = []

        async def failing_once(now=False):
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("scancel: connection refused")

        op.manager.records[("default", "nb")].spawner.stop = failing_once
        with caplog.at_level(logging.WARNING, logger="outpost.manager"):
            limit(op, "nb", 0.1)
            status = await wait_for(lambda: stopped(op.client, "nb"), timeout=20)
        assert len(calls) == 2 and status.stop_message
        assert "trying again" in caplog.text


async def test_a_hung_stop_at_the_end_time_is_abandoned_and_tried_again(start_outpost):
    """stop() hangs (a hung scancel): given up after cleanup_timeout, the server shows
    what it was, and the Outpost tries again later; it never hangs on it."""
    HangingStopSpawner.start_hangs = False
    async with start_outpost("outpost_server.testing.HangingStopSpawner", cleanup_timeout=0.2) as op:
        op.manager.runtime.retry = 0.2
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        limit(op, "nb", 0)
        await wait_for(lambda: HangingStopSpawner.stops_abandoned >= 2, timeout=20)
        await wait_for(lambda: op.manager.records[("default", "nb")].stop_task is None)
        assert (await op.client.poll("nb")).state in (pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_STOPPING)


# --- the hub's side -----------------------------------------------------------------------


async def test_the_spawner_reports_the_outposts_stop_and_shows_it_at_the_next_start(start_outpost, caplog):
    async with start_outpost(SPAWNER) as op:
        spawner = make_spawner(op)
        await spawner.start()
        assert await spawner.poll() is None
        limit(op, "alice", 0.1)
        await wait_for(lambda: stopped(op.client, "alice"), timeout=20)
        with caplog.at_level(logging.WARNING):
            assert await spawner.poll() == 0  # JupyterHub then stops it (user.stop)
        assert "Your server was stopped after its" in caplog.text
        assert spawner.stop_message.startswith("Your server was stopped after its")
        await spawner.stop()
        spawner.clear_state()
        # the next start's first progress message says why the last one ended
        await spawner.start()
        progress = [e["message"] async for e in spawner.progress()]
        assert progress[0].startswith("Your server was stopped after its")
        assert spawner.stop_message == ""



# --- across a SIGKILL of the Outpost process --------------------------------------------

PROCESS_CONFIG = """
from outpost_server.testing import InstantSpawner


class FileStopSpawner(InstantSpawner):
    async def stop(self, now=False):
        with open({stops!r}, "a") as f:
            f.write(self.user.name + "\\n")


c.Outpost.spawner_class = FileStopSpawner
c.Outpost.db_url = {db_url!r}
c.Outpost.user_mapping = "{{name}}"
c.Outpost.flavors = {{"short": {{"max_runtime": 2}}, "long": {{"max_runtime": 10}}}}
"""


@pytest.mark.slow
async def test_end_times_hold_across_a_sigkill(tmp_path, db_url, outpost_process):
    """The Outpost is SIGKILLed while two servers run. Restarted after the end time of
    one: that one is stopped at restore; the other, still before its end time, runs and is
    stopped at its end time. Nothing but the database carries the end times."""
    stops = tmp_path / "stops"
    op = outpost_process(PROCESS_CONFIG.format(stops=str(stops), db_url=db_url))
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        short = (await client.start("a", "s1", user_name="alice", flavor="short", wait_until_ready=True)).status
        long = (await client.start("b", "s2", user_name="bob", flavor="long", wait_until_ready=True)).status
    files = files_under(op.workdir)
    op.kill(signal.SIGKILL)
    short_end = short.end_time.ToDatetime(tzinfo=timezone.utc)
    long_end = long.end_time.ToDatetime(tzinfo=timezone.utc)
    # down until the short one's end time has passed
    await asyncio.sleep(max(0.0, (short_end - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    assert not stops.exists()

    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        status = await wait_for(lambda: stopped(client, "a"), timeout=30, message="a was not stopped at restore")
        assert status.stop_message == "Your server was stopped after its 2 s limit (flavor short)."
        first = await client.poll("b")
        if datetime.now(timezone.utc) < long_end:
            assert first.state == pb.SERVER_STATE_RUNNING and first.end_time == long.end_time
        status = await wait_for(lambda: stopped(client, "b"), timeout=30, message="b was not stopped at its end")
        assert status.stop_message == "Your server was stopped after its 10 s limit (flavor long)."
        assert sorted(stops.read_text().split()) == ["alice", "bob"]
        # the hub's Stop forgets them, without stopping them twice
        for name, start_id in (("a", "s1"), ("b", "s2")):
            assert (await client.stop(name, start_id)).outcome == pb.STOP_OUTCOME_STOPPED
        assert await client.list_servers() == []
        assert sorted(stops.read_text().split()) == ["alice", "bob"]
    # no lock file: only the database, the log and the config are the Outpost's files
    assert {f for f in files_under(op.workdir) - files if ".sqlite" not in f} == set()
