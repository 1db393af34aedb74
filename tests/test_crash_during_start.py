"""SIGKILL in the middle of a start leaves no orphan and no false "running".

The Spawner is JupyterHub's real LocalProcessSpawner; the notebook a real process. The
Outpost dies after that process started and before the start finished, in two ways:
- before the Spawner's state (the pid) could reach the database at all: the Outpost kills
  itself synchronously right after Popen, so only the start marker in the process's
  environment can find it (outpost_server/orphans.py);
- while start() still runs but after the manager stored the state mid-start
  (``StartRun._checkpoint``, outpost_server/starts.py): the restarted Outpost stops it through the Spawner.
Either way the restarted Outpost reports the start as failed, the process is gone, and
the server can be started again.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from outpost_client import OutpostClient, ServerNotFound, Unavailable, pb
from outpost_server.restore import RESTART_DURING_START

from .harness.procs import process_alive, processes_with_argv
from .harness.util import notebook_account, wait_for

pytestmark = pytest.mark.rpc

# the Spawner class is defined in outpost_config.py, as a site may do
CONFIG = """
import asyncio
import os
import signal
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner


class LaunchThenDie(LocalProcessSpawner):
    \"\"\"LocalProcessSpawner's own start(); then the Outpost dies before start() returns.\"\"\"

    async def start(self):
        address = await super().start()  # the notebook process runs now, self.pid is set
        mode = Path({mode_file!r}).read_text().strip()
        if mode == "die-now":
            os.kill(os.getpid(), signal.SIGKILL)  # no await since Popen: nothing stored
        await asyncio.Event().wait()  # "hang": the test kills the Outpost
        return address


c.Outpost.spawner_class = LaunchThenDie
c.Outpost.db_url = {db_url!r}
c.Outpost.log_level = "DEBUG"
c.LocalProcessSpawner.cmd = ["/bin/sleep", {sleep_arg!r}]
c.LocalProcessSpawner.interrupt_timeout = 2
c.LocalProcessSpawner.term_timeout = 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die-now", "hang"])
async def test_sigkill_mid_start_leaves_no_orphan(mode, tmp_path, db_url, outpost_process, subreaper):
    sleep_arg = f"{600 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6}"  # unique argv
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    op = outpost_process(CONFIG.format(mode_file=str(mode_file), db_url=db_url, sleep_arg=sleep_arg))
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        try:
            await client.start("nb", "s1", user_name=notebook_account())
        except Unavailable:
            assert mode == "die-now"  # it may die before Start's answer left
        notebooks = await wait_for(lambda: processes_with_argv(sleep_arg), timeout=15,
                                   message="the notebook process never started")  # fmt: skip
        subreaper.pids.update(notebooks)
        if mode == "hang":
            # the manager stored the pid while start() still runs
            await op.wait_log("Stored the state of starting default/nb")
            op.kill(signal.SIGKILL)
        else:
            assert op.proc.wait(timeout=15) == -signal.SIGKILL
    assert all(process_alive(p) for p in notebooks), "the notebook outlives the Outpost"

    mode_file.write_text("none")
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        # cleaned up in the background (restore.py): the server is STARTING until then
        status = await wait_for(lambda: _stopped(client, "nb"), timeout=30,
                                message="the interrupted start never failed")  # fmt: skip
        assert status.failure_message == RESTART_DURING_START
        events = [e async for e in client.events("nb")]
        assert events[-1].kind == pb.EVENT_KIND_FAILED
        # cleaned up: nothing of that start runs any more
        await wait_for(lambda: not any(process_alive(p) for p in notebooks), timeout=10,
                       message=f"orphaned notebook processes: {processes_with_argv(sleep_arg)}")  # fmt: skip
        # which path cleaned up: the marker (nothing stored) or the Spawner (pid stored);
        # the sweep logs after its processes are gone, so wait for its line
        swept = "left by the interrupted start of default/nb"
        if mode == "die-now":
            await op.wait_log(swept, timeout=10)
        else:
            run = op.log.read_text().rsplit(f"--- run {op.runs} ---", 1)[-1]
            assert swept not in run, run[-3000:]

        # the name is free again, and the database agrees
        assert (await client.stop("nb")).outcome == pb.STOP_OUTCOME_STOPPED
        with pytest.raises(ServerNotFound):
            await client.poll("nb")


async def _stopped(client, name: str):
    status = await client.poll(name)
    return status if status.state == pb.SERVER_STATE_STOPPED else None
