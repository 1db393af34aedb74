"""Clean-up stops are bounded: one hung ``stop(now=True)`` (a ``scancel`` that never
returns) never keeps the Outpost from serving (c.Outpost.cleanup_timeout).

The Spawner is ``outpost_server.testing.HangingStopSpawner``: its stop() hangs until it
is cancelled.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from outpost_client import pb
from outpost_server.restore import RESTART_DURING_START
from outpost_server.testing import HangingStopSpawner

from .harness.outpost import outpost_config, running_outpost
from .harness.util import captured_log, wait_for

pytestmark = pytest.mark.rpc

SPAWNER = "outpost_server.testing.HangingStopSpawner"


@pytest.fixture
def manager_log():
    """Records of the "outpost.manager" logger, whatever its propagation."""
    with captured_log("outpost.manager") as records:
        yield records


def abandoned(records, name: str) -> bool:
    return any(
        r.levelno == logging.WARNING
        and f"Clean-up stop() of default/{name} did not finish within" in r.getMessage()
        for r in records
    )


async def test_hung_cleanup_at_restore_does_not_block_serving(tmp_path, manager_log):
    cfg = outpost_config(tmp_path, SPAWNER, cleanup_timeout=0.5)
    async with running_outpost(cfg) as op:
        await op.client.start("nb", "s1", user_name="alice")
        await wait_for(lambda: HangingStopSpawner.starts == 1)
    # the shutdown interrupted the start: the restarted Outpost must stop what it made,
    # and that stop() hangs
    HangingStopSpawner.start_hangs = False
    # a guard, not a measurement: before clean-ups were bounded, setup() never returned
    async with asyncio.timeout(60):
        async with running_outpost(cfg) as op:
            await wait_for(lambda: HangingStopSpawner.stops_begun == 1)
            # the Outpost serves other servers meanwhile
            result = await op.client.start("nb2", "s2", user_name="bob", wait_until_ready=True)
            assert result.status.state == pb.SERVER_STATE_RUNNING
            assert (await op.client.poll("nb2")).state == pb.SERVER_STATE_RUNNING
            # the clean-up is given up after cleanup_timeout, with a WARNING, and the
            # interrupted start ends as failed
            status = await wait_for(
                lambda: _stopped(op.client, "nb"), timeout=30, message="the interrupted start never failed"
            )
            assert status.failure_message == RESTART_DURING_START
            assert HangingStopSpawner.stops_abandoned == 1
            assert abandoned(manager_log, "nb")


async def _stopped(client, name: str):
    status = await client.poll(name)
    return status if status.state == pb.SERVER_STATE_STOPPED else None


async def test_hung_cleanup_of_failed_start_is_abandoned(start_outpost, manager_log):
    """A start that fails (here: its start_timeout) is reported FAILED although its
    clean-up stop() hangs."""
    async with asyncio.timeout(60):
        async with start_outpost(SPAWNER, cleanup_timeout=0.5, **{"Spawner.start_timeout": 1}) as op:
            result = await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
            assert result.status.state == pb.SERVER_STATE_STOPPED
            assert "did not start within 1 seconds" in result.status.failure_message
            assert HangingStopSpawner.stops_abandoned == 1
            assert abandoned(manager_log, "nb")
