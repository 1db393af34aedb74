"""The Outpost survives restarts: SQLite and PostgreSQL, a clean restart and SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from outpost_client import OutpostClient, ServerNotFound, pb

from .harness.outpost import outpost_config, running_outpost
from .harness.procs import children_of, process_alive, process_name
from .harness.util import notebook_account, wait_for

pytestmark = pytest.mark.rpc


async def test_restore_after_restart(tmp_path, db_url):
    cfg = outpost_config(tmp_path, "outpost_server.testing.SlowSpawner", db_url, **{"SlowSpawner.delay": 0.1})
    async with running_outpost(cfg) as op:
        for name in ("amy", "ben"):
            await op.client.start(name, f"{name}-1", user_name=name, env={"JUPYTERHUB_TEST_K": name}, wait_until_ready=True)
        events_before = [e async for e in op.client.events("amy")]
    # same database, new Outpost: everything comes back from the database
    async with running_outpost(cfg) as op:
        servers = await op.client.list_servers()
        assert [(s.server_name, s.state) for s in servers] == [
            ("amy", pb.SERVER_STATE_RUNNING),
            ("ben", pb.SERVER_STATE_RUNNING),
        ]
        events_after = [e async for e in op.client.events("amy")]
        assert [(e.sequence, e.kind, e.message) for e in events_after] == [
            (e.sequence, e.kind, e.message) for e in events_before
        ]
        assert op.manager.records[("default", "amy")].spec.env == {"JUPYTERHUB_TEST_K": "amy"}
        assert (await op.client.stop("amy", "amy-1")).outcome == pb.STOP_OUTCOME_STOPPED
    async with running_outpost(cfg) as op:
        assert [s.server_name for s in await op.client.list_servers()] == ["ben"]


async def test_events_are_bounded_per_server(tmp_path, db_url):
    cfg = outpost_config(
        tmp_path,
        "outpost_server.testing.SlowSpawner",
        db_url,
        max_events_per_server=3,
        **{"SlowSpawner.delay": 0.2, "SlowSpawner.steps": 6},
    )
    async with running_outpost(cfg) as op:
        await op.client.start("cat", "c1", user_name="cat", wait_until_ready=True)
        kept = [e async for e in op.client.events("cat")]
        last = op.manager.records[("default", "cat")].last_sequence
        assert last > 3  # more events happened than are kept
        assert [e.sequence for e in kept] == [last - 2, last - 1, last]
        assert kept[-1].kind == pb.EVENT_KIND_READY
        _, events = await op.app.store.load()
        assert [e["sequence"] for e in events[("default", "cat")]] == [last - 2, last - 1, last]


async def test_start_interrupted_by_restart_is_failed_and_cleaned_up(tmp_path, db_url):
    cfg = outpost_config(tmp_path, "outpost_server.testing.NeverReadySpawner", db_url, shutdown_grace=0.1)
    async with running_outpost(cfg) as op:
        await op.client.start("dan", "d1", user_name="dan")
        await asyncio.sleep(0.1)
    async with running_outpost(cfg) as op:
        # cleaned up in the background (restore.py): STARTING until then
        status = await wait_for(lambda: _stopped(op.client, "dan"), message="the interrupted start never failed")
        assert "restarted while this server was starting" in status.failure_message
        events = [e async for e in op.client.events("dan")]
        assert events[-1].kind == pb.EVENT_KIND_FAILED


async def _stopped(client, name: str):
    status = await client.poll(name)
    return status if status.state == pb.SERVER_STATE_STOPPED else None


LOCALPROCESS_CONFIG = """
c.Outpost.spawner_class = "localprocess"
c.Outpost.db_url = {db_url!r}
c.Outpost.poll_interval = 1
c.LocalProcessSpawner.cmd = ["/bin/sleep", "600"]
c.LocalProcessSpawner.interrupt_timeout = 3
"""


@pytest.mark.slow
async def test_sigkill_restart_keeps_localprocess_servers(db_url, outpost_process, subreaper):
    """SIGKILL the Outpost with three real LocalProcessSpawner servers, start it again."""
    op = outpost_process(LOCALPROCESS_CONFIG.format(db_url=db_url))
    op.start()
    await op.wait_serving()
    names = ["nb-one", "nb-two", "nb-three"]
    async with OutpostClient(op.address) as client:
        for name in names:
            r = await client.start(name, uuid.uuid4().hex, user_name=notebook_account(), wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_RUNNING, r.status.failure_message
    def notebooks():  # not their output captures (outpost_server/_capture.py)
        return [p for p in children_of(op.proc.pid) if process_name(p) == "sleep"]

    pids = await wait_for(lambda: len(notebooks()) == 3 and notebooks())
    subreaper.pids.update(pids)
    assert op.kill(signal.SIGKILL) == -signal.SIGKILL
    assert all(process_alive(p) for p in pids), "notebooks must survive the Outpost"

    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        for name in names:
            status = await client.poll(name)
            assert status.state == pb.SERVER_STATE_RUNNING, (name, status)
        stops = await asyncio.gather(*(client.stop(n) for n in names))
        assert all(s.outcome == pb.STOP_OUTCOME_STOPPED for s in stops)
        for name in names:
            with pytest.raises(ServerNotFound):
                await client.poll(name)
    await wait_for(lambda: not any(process_alive(p) for p in pids), timeout=15,
                   message=f"notebook processes still running: {[p for p in pids if process_alive(p)]}")
