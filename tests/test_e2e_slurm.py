"""End to end on a batch system: a real JupyterHub (with the real proxy) spawns through
OutpostSpawner and an Outpost process hosting batchspawner's SlurmSpawner; the notebook is
a Slurm job running ``batchspawner-singleuser jupyterhub-singleuser`` on the private
single-node cluster (tests/harness/slurm.py).

The whole late-address path is real: the job's batchspawner-singleuser reports its port to
``$JUPYTERHUB_API_URL/batchspawner``, which points at the Outpost's hub API relay; the
relay sets it on the hosted SlurmSpawner, whose start() then returns; the address reaches
the hub with the READY event and the hub opens its tunnel. Every other call of the
notebook to the hub API (token checks, the OAuth code exchange, activity) goes notebook →
relay → the hub's SSH reverse forward → the hub.

Jobs run as root (as in tests/test_slurm.py), so the hub's user is ``root``, which the
site maps to a local account (``SITE_USER_MAPPING``) the SlurmSpawner finds in passwd.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from outpost_client import pb

from .harness.e2e_driver import browser_oauth, read_progress
from .harness.hub import TOKEN
from .harness.outpost import BIN
from .harness.slurm import JOB_NAME, SITE_USER_MAPPING, SLURM_SPAWNER_REQUESTS, our_jobs, queue_reason_recipe
from .harness.util import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.slurm]

USER = "root"

SLURM_SITE = """
c.Outpost.spawner_class = "batchspawner.SlurmSpawner"
c.Outpost.log_level = "DEBUG"          # the relay's access lines; batchspawner's submit env
c.HubAPIRelay.enabled = True
c.HubAPIRelay.ip = "127.0.0.1"         # the "compute node" is this machine
c.HubAPIRelay.port = {relay_port}

# SLURM_SPAWNER_REQUESTS: the Outpost runs as root and submits as itself
""" + SLURM_SPAWNER_REQUESTS + """c.SlurmSpawner.batchspawner_singleuser_cmd = "{bin}/batchspawner-singleuser"
c.Spawner.cmd = ["{bin}/jupyterhub-singleuser"]
c.Spawner.args = ["--allow-root"]
c.Spawner.environment = {{
    "JUPYTERHUB_ACTIVITY_INTERVAL": "1",
    "JUPYTER_RUNTIME_DIR": "{jobs}/runtime",
    "JUPYTER_DATA_DIR": "{jobs}/data",
    "IPYTHONDIR": "{jobs}/ipython",
}}
c.SlurmSpawner.batch_script = '''#!/bin/bash
#SBATCH --output={jobs}/jupyterhub_slurmspawner_%j.log
#SBATCH --job-name={job_name}
#SBATCH --chdir={jobs}
#SBATCH --export={{{{keepvars}}}}
{{% if partition %}}#SBATCH --partition={{{{partition}}}}
{{% endif %}}{{% if runtime %}}#SBATCH --time={{{{runtime}}}}
{{% endif %}}{{% if memory %}}#SBATCH --mem={{{{memory}}}}
{{% endif %}}{{% if nprocs %}}#SBATCH --cpus-per-task={{{{nprocs}}}}
{{% endif %}}
set -euo pipefail
trap 'echo SIGTERM received' TERM
{{% if srun %}}{{{{srun}}}} {{% endif %}}{{{{cmd}}}}
'''
"""


@pytest.fixture
async def slurm_site(slurm, make_site, monkeypatch):
    # squeue/scancel run with the Outpost's own environment: SLURM_CONF names the cluster
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    jobs = slurm.root / "jobs"
    extra = SLURM_SITE.format(relay_port=free_port(), bin=BIN, jobs=jobs, job_name=JOB_NAME)
    # the site shows Slurm's reason for the wait (docs/sites/slurm.md, as written there)
    return await make_site("site-slurm", extra=extra + SITE_USER_MAPPING + queue_reason_recipe())


@pytest.fixture
async def slurm_hub(slurm_site, hub_factory):
    # OutpostSpawner with the hub API reverse forward (Site.hub_config): the site never
    # opens a connection to the hub
    hub = hub_factory(
        slurm_site.hub_config()
        + "c.Spawner.start_timeout = 120\n"
        + "c.Spawner.poll_interval = 2  # the hub polls during the slurmctld outage\n"
    )
    hub.start()
    await hub.wait_ready()
    return hub


async def test_slurm_notebook_through_relay(slurm, slurm_site, slurm_hub):
    site, hub = slurm_site, slurm_hub
    started = time.monotonic()

    # the node is busy: our job has to wait in the queue
    slurm.occupy()
    r = await hub.api("POST", f"/users/{USER}")
    assert r.status_code in (201, 409), r.text
    r = await hub.api("POST", f"/users/{USER}/server", json={})
    assert r.status_code == 202, r.text
    events: list[dict] = []
    follower = threading.Thread(
        target=read_progress,
        args=(f"{hub.url}/hub/api/users/{USER}/server/progress", {"Authorization": f"token {TOKEN}"}, 180),
        kwargs={"into": events},
        daemon=True,
    )
    follower.start()

    job = (
        await wait_for(
            lambda: our_jobs(slurm), 30, message=f"no job submitted:\n{site.op.log.read_text()[-3000:]}"
        )
    )[0]
    await wait_for(
        lambda: slurm.job(job.id).reason == "Resources", 15, message=f"not pending: {slurm.squeue()}"
    )
    # the user's spawn page shows the job waiting and Slurm's reason
    waiting = f"Job {job.id} pending in queue (Resources)"
    await wait_for(
        lambda: any(e.get("message") == waiting for e in events),
        20,
        message=f"no {waiting!r} on the spawn page: {events}\n{hub.tail()}",
    )
    model = await hub.server_model(USER)
    assert model["pending"] == "spawn" and not model["ready"], model
    assert (await site.servers())[USER].state == pb.SERVER_STATE_STARTING
    await asyncio.sleep(2)  # a while in the queue
    assert slurm.job(job.id).state == "PENDING"

    pending_seconds = time.monotonic() - started
    slurm.free()
    await asyncio.to_thread(follower.join, 120)
    assert events and events[-1].get("ready"), (events, hub.tail(), site.op.log.read_text()[-4000:])
    spawn_seconds = time.monotonic() - started
    log = site.op.log.read_text()
    # the port came through the relay's callback, never from the hub
    assert re.search(rf"default/{USER}: the notebook reported port=\d+", log), log[-4000:]
    assert slurm.job(job.id).state == "RUNNING"
    remote = (await site.servers())[USER]
    assert remote.state == pb.SERVER_STATE_RUNNING
    assert remote.address.host == slurm.node  # the exec host, from squeue

    # through the proxy and the tunnel; the notebook checks the token with the hub API
    # through the relay and the reverse forward
    r = await hub.get(f"/user/{USER}/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())

    # a browser: OAuth to the notebook (it exchanges the code with the hub API)
    oauth = await asyncio.to_thread(browser_oauth, hub.url, USER)
    assert oauth["cookie"] and oauth["status"] == 200, oauth
    assert any(p.endswith("/oauth_callback") for p in oauth["path"]), oauth

    # activity: the notebook reports to the hub's activity URL (interval 1 s)
    before = (await hub.server_model(USER))["last_activity"]
    await asyncio.sleep(1.5)
    await hub.get(f"/user/{USER}/api/contents")

    async def activity_moved():
        return (await hub.server_model(USER))["last_activity"] != before

    await wait_for(activity_moved, 30, interval=0.5, message="no activity reached the hub")

    # what went where: the hub's env names the reverse forward; the notebook used the relay
    env = site.stored_env(USER)
    assert env["JUPYTERHUB_API_URL"] == f"http://127.0.0.1:{site.rport}/hub/api"
    relayed = f"/hubs/default/servers/{USER}/hub/api"
    log = site.op.log.read_text()
    for line in (
        f"200 POST {relayed}/batchspawner",
        f"200 GET {relayed}/user",
        f"200 POST {relayed}/oauth2/token",
        f"200 POST {relayed}/users/{USER}/activity",
    ):
        assert line in log, (line, log[-4000:])
    # at DEBUG, with batchspawner logging the whole submit environment: no token anywhere
    assert "Spawner submitting environment: " in log
    assert "'JUPYTERHUB_API_TOKEN': '[secret]'" in log
    assert env["JUPYTERHUB_API_TOKEN"] not in log

    # slurmctld down for ~20 s while the notebook runs (batchspawner#171): squeue fails,
    # the Outpost keeps the server RUNNING, and the hub, polling every 2 s, keeps it too
    slurm.stop_controller()
    try:
        down = time.monotonic()
        while time.monotonic() - down < 22:
            model = await hub.server_model(USER)
            assert model and model["ready"] and not model["pending"], (model, hub.tail())
            assert (await site.servers())[USER].state != pb.SERVER_STATE_STOPPED
            await asyncio.sleep(1)
    finally:
        slurm.start_controller()
    assert "Unable to contact slurm controller" in site.op.log.read_text()  # polls did fail
    assert slurm.job(job.id).state == "RUNNING"
    r = await hub.get(f"/user/{USER}/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())

    # Stop: the job leaves the queue
    await hub.stop_server(USER)
    await wait_for(lambda: not our_jobs(slurm), 30, message=f"job still queued: {slurm.squeue()}")
    assert slurm.job(job.id).state in ("CANCELLED", "COMPLETED"), slurm.squeue()
    assert USER not in await site.servers()
    print(
        f"spawn took {spawn_seconds:.1f}s from the request, {pending_seconds:.1f}s of it with the node busy"
    )


async def test_cancel_pending_spawn_cancels_the_job(slurm, slurm_site, slurm_hub):
    """The user cancels a spawn while its job waits in the queue: scancel, nothing left."""
    site, hub = slurm_site, slurm_hub
    slurm.occupy()
    r = await hub.api("POST", f"/users/{USER}")
    assert r.status_code in (201, 409), r.text
    r = await hub.api("POST", f"/users/{USER}/server", json={})
    assert r.status_code == 202, r.text
    job = (await wait_for(lambda: our_jobs(slurm), 30, message="no job submitted"))[0]
    await wait_for(lambda: slurm.job(job.id).state == "PENDING", 10, message=str(slurm.squeue()))

    # Land the cancel between two of start()'s squeue calls (every 0.5 s, ~15 ms each):
    # one that lands during a call loses the job id, a known batchspawner 1.3 problem
    # (docs/sites/slurm.md, tests/test_slurm.py::test_stop_during_the_queue_query).
    queries = site.op.log.read_text().count("Spawner querying job")
    await wait_for(lambda: site.op.log.read_text().count("Spawner querying job") > queries, 5)
    await asyncio.sleep(0.2)
    r = await hub.api("DELETE", f"/users/{USER}/server")
    assert r.status_code in (202, 204), r.text
    await wait_for(
        lambda: slurm.job(job.id).state == "CANCELLED", 30, message=f"not cancelled: {slurm.squeue()}"
    )

    async def forgotten():
        return USER not in await site.servers()

    await wait_for(forgotten, 30, message=f"the Outpost still has the start:\n{hub.tail()}")
    model = await hub.server_model(USER)
    assert not model or not model.get("ready"), model
    # the node freed: nothing of ours starts after all
    slurm.free()
    await asyncio.sleep(1.5)
    assert not our_jobs(slurm), slurm.squeue()
