"""A Stop and a Start of the same server name that overlap, and a Start over a server
whose state is unknown: neither may lose a newer start's row nor orphan a notebook."""

from __future__ import annotations

import asyncio

import pytest

from outpost_client import ServerAlreadyStarted, pb
from outpost_server.store import Store

from .harness.outpost import stored_rows
from .harness.util import wait_for

pytestmark = pytest.mark.rpc

SLOW = "outpost_server.testing.SlowSpawner"


async def test_a_late_stop_never_deletes_a_newer_start(start_outpost, monkeypatch):
    """The Stop of an exited server is slow to reach the database; a Start with a new
    start_id arrives meanwhile. The newer start keeps its row (a restart knows it)."""
    async with start_outpost(SLOW, **{"SlowSpawner.delay": 0.05}) as op:
        await op.client.start("eve", "s1", user_name="eve", wait_until_ready=True)
        old = op.manager.records[("default", "eve")]
        old.spawner.stopped = True  # the notebook exits
        await op.manager.poller.poll_all()
        assert old.state == pb.SERVER_STATE_STOPPED

        gate, write = asyncio.Event(), op.app.store.write

        async def slow_delete(*ops):
            if any(".op_delete_server." in o.__qualname__ for o in ops):
                await gate.wait()
            return await write(*ops)

        monkeypatch.setattr(op.app.store, "write", slow_delete)
        stop = asyncio.create_task(op.client.stop("eve", "s1"))
        await wait_for(lambda: old.stop_task is not None, message="the Stop did not begin")
        start = asyncio.create_task(op.client.start("eve", "s2", user_name="eve", wait_until_ready=True))
        await asyncio.sleep(0.3)  # the new start is accepted while the old Stop's delete waits
        gate.set()
        assert (await stop).outcome == pb.STOP_OUTCOME_STOPPED
        status = (await start).status
        assert (status.start_id, status.state) == ("s2", pb.SERVER_STATE_RUNNING)
        rows = await stored_rows(op.app)
        assert [(r["server_name"], r["start_id"], r["state"]) for r in rows] == [("eve", "s2", "running")]


async def test_a_delete_removes_only_its_own_start(tmp_path):
    """The store's delete names the start it belongs to: a row of another start stays."""
    store = Store(f"sqlite:///{tmp_path}/rows.sqlite")
    await store.open()
    try:
        row = {
            "hub": "h", "server_name": "x", "start_id": "new", "state": "running",
            "user_info": {"name": "u"}, "spawner_name": "", "env": {}, "user_options": {},
            "config_overrides": {}, "spawner_state": None, "scheme": None, "host": None,
            "port": None, "exit_code": None, "failure_message": "", "error_class": "",
            "start_time": __import__("outpost_server.store", fromlist=["now"]).now(),
        }  # fmt: skip
        await store.write(store.op_insert_server(row))
        await store.write(store.op_add_events("h", "x", [{"sequence": 1, "start_id": "new", "data": {"kind": 1}}]))
        await store.write(store.op_delete_server("h", "x", "old"))
        rows, events = await store.load()
        assert [r["start_id"] for r in rows] == ["new"] and len(events[("h", "x")]) == 1
        await store.write(store.op_delete_server("h", "x", "new"))
        assert await store.load() == ([], {})
    finally:
        await store.close()


async def test_a_start_over_an_unknown_server_is_refused_until_it_is_stopped(start_outpost):
    """A server whose poll failed may still run: a Start with another start_id would
    replace it without stopping it (an orphan at the site). It must be stopped first."""
    async with start_outpost("outpost_server.testing.FailingPollSpawner") as op:
        await op.client.start("una", "s1", user_name="una", wait_until_ready=True)
        await op.manager.poller.poll_all()
        rec = op.manager.records[("default", "una")]
        assert rec.state == pb.SERVER_STATE_UNKNOWN
        with pytest.raises(ServerAlreadyStarted) as err:
            await op.client.start("una", "s2", user_name="una")
        assert err.value.metadata["start_id"] == "s1" and "may still run" in err.value.message
        assert op.manager.records[("default", "una")] is rec  # nothing replaced
        await op.client.stop("una", "s1")
        status = (await op.client.start("una", "s2", user_name="una", wait_until_ready=True)).status
        assert (status.start_id, status.state) == ("s2", pb.SERVER_STATE_RUNNING)
