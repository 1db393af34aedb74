"""The hub's orphan reconciler against a real Outpost (in process): it pages through
ListServers, stops orphans with their own start_id, and leaves alone what the hub knows
and what is still starting. With a real hub: tests/test_e2e_reconcile.py."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from outpost_client import pb
from outpost_client.reconcile import HubView, OutpostReconciler

pytestmark = pytest.mark.rpc


async def wait_state(client, name, state, timeout=10):
    deadline = time.monotonic() + timeout
    while (await client.poll(name)).state != state:
        assert time.monotonic() < deadline, f"{name} not {pb.ServerState.Name(state)}"
        await asyncio.sleep(0.05)


async def test_reconcile_pages_through_the_outpost_and_stops_only_orphans(start_outpost, caplog):
    async with start_outpost(
        "outpost_server.testing.SlowSpawner", allow_override=["delay"], **{"SlowSpawner.delay": 0.0}
    ) as op:
        c = op.client
        for i in range(7):
            await c.start(f"user{i}", f"s{i}", user_name=f"user{i}", wait_until_ready=True)
        # one start that takes its time: STARTING while the reconciler runs
        await c.start("slow", "s-slow", user_name="slow", config_overrides={"delay": 30})
        await wait_state(c, "slow", pb.SERVER_STATE_STARTING)

        hub = HubView(known=frozenset({("user0", "s0"), ("user3", "s3")}), in_flight=frozenset({"user5"}))
        caplog.set_level(logging.INFO, "test.reconcile")
        r = OutpostReconciler(
            "default", lambda: hub, lambda: c, grace_period=0, page_size=2, log=logging.getLogger("test.reconcile")
        )
        stopped = await r.reconcile_once()
        assert sorted(o.server_name for o in stopped) == ["user1", "user2", "user4", "user6"]
        left = {s.server_name: s for s in await c.list_servers()}
        assert set(left) == {"user0", "user3", "user5", "slow"}
        assert left["slow"].state == pb.SERVER_STATE_STARTING
        assert left["user0"].state == pb.SERVER_STATE_RUNNING
        assert caplog.text.count("(STOP_OUTCOME_STOPPED): the hub has no such server") == 4
        # a second pass finds nothing more to do
        assert await r.reconcile_once() == []
        await c.stop("slow")


async def test_reconcile_stop_carries_the_sites_start_id(start_outpost):
    """The orphan's start_id travels with its Stop: a start of the same name the hub made
    after the reconciler listed the Outpost is never stopped by it."""
    async with start_outpost() as op:
        c = op.client
        await c.start("alice", "old", user_name="alice", wait_until_ready=True)
        listed = await c.list_servers()

        class Racing:
            """The real client; between the list and the stop, the name starts anew."""

            async def list_server_pages(self, page_size=0):
                yield listed

            async def stop(self, name, start_id=""):
                await c.stop(name)
                await c.start(name, "new", user_name="alice", wait_until_ready=True)
                return await c.stop(name, start_id)

        r = OutpostReconciler("default", lambda: HubView(), lambda: Racing(), grace_period=0)
        await r.reconcile_once()
        (status,) = await c.list_servers()
        assert (status.start_id, status.state) == ("new", pb.SERVER_STATE_RUNNING)
