"""BatchSpawner's SlurmSpawner hosted by a real Outpost process, on a real Slurm cluster.

The Outpost runs as the console script with an ``outpost_config.py`` written the way a site
writes it (``c.Outpost.spawner_class = "batchspawner.SlurmSpawner"``, ``req_*`` options,
its own batch script); Slurm is the private single-node cluster of the ``slurm`` fixture
(tests/harness/slurm.py); the hub is a real ``OutpostClient``. What is covered: the queue as the
user sees it in the Events stream, Stop (``scancel``), a Stop while the job is still
pending (the hub's "cancel" of a pending spawn), and a slurmctld outage while a job runs.

Stand-ins, all marked in CONFIG:

- The "notebook" is ``python -m http.server`` on a port the test chooses (``Spawner.cmd``
  and ``args``, run by the site's batch script through ``srun``): it starts in well under
  a second, and a real ``jupyterhub-singleuser`` adds nothing Slurm-specific here.
- The port: batchspawner 1.3's ``start()`` first resets ``self.port`` to 0 and, once the
  job is RUNNING, waits until something sets it; in a hub that is the ``/batchspawner`` API
  handler, called by ``batchspawner-singleuser`` in the job. A preset ``c.Spawner.port`` is
  overwritten, so the config uses batchspawner's own test hook (``mock_port``) instead.
  The callback through the Outpost is the hub API relay's business and tested there.

Two tests pin how batchspawner 1.3 meets the Outpost's cancellations: it turns a cancel
of its ``squeue`` into "job not found" and forgets the job, so the Outpost never cancels
a poll() (one that overruns ``poll_timeout`` makes the server UNKNOWN) and gives a
cancelled start's Spawner back the state it had before the cancel.

Jobs run as root (the tests do): ``exec_prefix = ""`` and the hub's user is ``root``,
which the site maps to the local account ``outpost-slurm`` (``SITE_USER_MAPPING``: root is
never a notebook's account; ``SlurmSpawner.get_env()`` looks the account up in passwd).
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
import uuid

import pytest

from outpost_client import ServerNotFound, pb

from .harness.site import Site
from .harness.slurm import JOB_NAME, SITE_USER_MAPPING, our_jobs, queue_reason_recipe
from .harness.util import collect, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.slurm]

CONFIG = """\
import batchspawner

c.Outpost.spawner_class = "batchspawner.SlurmSpawner"
c.Outpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.Outpost.certs_dir = "{workdir}/certs"
c.Outpost.shutdown_grace = 1
c.Outpost.poll_interval = 1            # the default is 30; the outage test needs polls
c.Outpost.log_level = "DEBUG"

c.SlurmSpawner.exec_prefix = ""        # the Outpost runs as root and submits as itself
c.SlurmSpawner.req_partition = "debug"
c.SlurmSpawner.req_nprocs = "1"
c.SlurmSpawner.req_memory = "100M"
c.SlurmSpawner.req_runtime = "00:10:00"
c.SlurmSpawner.startup_poll_interval = 0.5
c.SlurmSpawner.start_timeout = 60
c.SlurmSpawner.env_keep.append("SLURM_CONF")   # sbatch runs with get_env(), not os.environ
c.SlurmSpawner.batch_script = '''#!/bin/bash
#SBATCH --output={jobs}/jupyterhub_slurmspawner_%j.log
#SBATCH --job-name={job_name}
#SBATCH --chdir={jobs}
#SBATCH --export={{{{keepvars}}}}
{{% if partition %}}#SBATCH --partition={{{{partition}}}}
{{% endif %}}{{% if runtime %}}#SBATCH --time={{{{runtime}}}}
{{% endif %}}{{% if memory %}}#SBATCH --mem={{{{memory}}}}
{{% endif %}}{{% if nprocs %}}#SBATCH --cpus-per-task={{{{nprocs}}}}
{{% endif %}}{{% if options %}}#SBATCH {{{{options}}}}
{{% endif %}}
set -euo pipefail
trap 'echo SIGTERM received' TERM
{{{{prologue}}}}
{{% if srun %}}{{{{srun}}}} {{% endif %}}{{{{cmd}}}}
echo "the notebook ended"
{{{{epilogue}}}}
'''

# stand-in notebook (see tests/test_slurm.py): a plain HTTP server on a fixed port
c.Spawner.cmd = [{python!r}, "-m", "http.server"]
c.Spawner.args = ["{port}", "--bind", "127.0.0.1", "--directory", "{jobs}"]
c.SlurmSpawner.batchspawner_singleuser_cmd = ""
# stand-in for the port callback: start() takes batchspawner's test hook instead of waiting
batchspawner.SlurmSpawner.mock_port = {port}
"""


class SlurmSite(Site):
    """The site of CONFIG (no SSH forwarder: the hub is this test's OutpostClient,
    ``site.client``) on the ``slurm`` cluster; its notebook serves on ``notebook_port``."""

    def __init__(self, *args, slurm, notebook_port: int, **kwargs):
        super().__init__(
            *args, config=CONFIG, ssh=False, jobs=slurm.root / "jobs", port=notebook_port, job_name=JOB_NAME,
            **kwargs,
        )  # fmt: skip
        self.slurm = slurm
        self.notebook_port = notebook_port

    def env(self, name: str) -> dict[str, str]:
        """What a hub sends as the notebook's env (abridged)."""
        return {
            "JUPYTERHUB_API_TOKEN": uuid.uuid4().hex,
            "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
            "JUPYTERHUB_SERVICE_PREFIX": f"/user/root/{name}/",
            "JUPYTERHUB_USER": "root",
        }

    async def start_server(self, name: str, **kwargs) -> str:
        start_id = uuid.uuid4().hex
        await self.client.start(name, start_id, user_name="root", spawner_name=name, env=self.env(name), **kwargs)
        return start_id

    def our_jobs(self):
        """The Spawner's jobs still in the queue (pending, running or completing)."""
        return our_jobs(self.slurm)

    def log_count(self, text: str) -> int:
        """How often text is in the Outpost's log."""
        return self.op.log.read_text().count(text)

    def job_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (self.slurm.root / "jobs").iterdir())

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.notebook_port}/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


@pytest.fixture
async def make_slurm_site(slurm, make_site, monkeypatch):
    """Factory: ``await make_slurm_site(extra_config="")`` -> a SlurmSite with its Outpost serving."""
    # squeue/scancel run with the Outpost's own environment: SLURM_CONF names the cluster
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    made = 0

    async def make(extra_config: str = "") -> SlurmSite:
        nonlocal made
        made += 1
        return await make_site(
            f"slurm-site-{made}", site_class=SlurmSite, slurm=slurm, notebook_port=free_port(),
            extra=SITE_USER_MAPPING + extra_config,
        )  # fmt: skip

    return make


@pytest.fixture
async def site(make_slurm_site):
    return await make_slurm_site()


@pytest.mark.parametrize("flavour", ["batchspawner", "recipe"])
async def test_pending_in_queue_then_running(make_slurm_site, flavour):
    """The queue in the Events stream: what the Spawner's progress() says, then READY.

    batchspawner 1.3 says "Pending in queue..."; the docs' recipe (a SlurmSpawner
    subclass in outpost_config.py) adds the job id and squeue's reason.
    """
    site = await make_slurm_site(queue_reason_recipe() if flavour == "recipe" else "")
    slurm = site.slurm
    slurm.occupy()
    await site.start_server("queued")
    events: list[pb.EventsResponse] = []
    follower = asyncio.create_task(collect(site.client, "queued", events, timeout=None))
    try:
        # the scheduler's own view: our job waits for the occupied CPUs
        job = (await wait_for(lambda: site.our_jobs(), 10, message="no job submitted"))[0]
        await wait_for(lambda: slurm.job(job.id).reason == "Resources", 15,
                       message=f"job not pending for Resources: {slurm.squeue()}")  # fmt: skip
        assert slurm.job(job.id).state == "PENDING"
        # ... and the user's, from the Spawner's progress()
        pending = {
            "batchspawner": "Pending in queue...",
            "recipe": f"Job {job.id} pending in queue (Resources)",
        }[flavour]
        await wait_for(lambda: any(e.message == pending for e in events), 10,
                       message=f"no {pending!r} event: {[e.message for e in events]}")  # fmt: skip
        assert (await site.client.poll("queued")).state == pb.SERVER_STATE_STARTING
        slurm.free()
        await asyncio.wait_for(follower, 30)
    finally:
        follower.cancel()
    messages = [e.message for e in events]
    assert events[-1].kind == pb.EVENT_KIND_READY, messages
    assert events[-1].message == f"Server ready at http://{slurm.node}:{site.notebook_port}"
    progress = [m for m in messages[:-1] if m != "Unknown status..."]
    # queue states, never the same one twice in a row (the Outpost drops repeats)
    assert all(a != b for a, b in zip(progress, progress[1:])), messages
    assert progress[0].startswith(("Pending in queue", f"Job {job.id} pending in queue (")), messages
    assert set(progress) - {progress[0]} <= {
        "Cluster job running... waiting to connect",
        pending,
        f"Job {job.id} pending in queue (None)",  # between Resources and running
        f"Job {job.id} pending in queue (Priority)",
    }, messages
    assert slurm.job(job.id).state == "RUNNING"
    status = await site.client.poll("queued")
    assert status.state == pb.SERVER_STATE_RUNNING
    assert (status.address.host, status.address.port) == (slurm.node, site.notebook_port)
    await wait_for(site.serving, 10, message="the job's server does not answer")


async def test_stop_cancels_the_job(site):
    """Stop runs scancel: the job leaves the queue and its process ends."""
    start_id = await site.start_server("running", wait_until_ready=True)
    status = await site.client.poll("running")
    assert status.state == pb.SERVER_STATE_RUNNING, status.failure_message
    [job] = site.our_jobs()
    assert job.state == "RUNNING" and job.node == site.slurm.node
    await wait_for(site.serving, 10, message="the job's server does not answer")

    r = await site.client.stop("running", start_id)
    assert r.outcome == pb.STOP_OUTCOME_STOPPED
    assert site.slurm.job(job.id).state in ("CANCELLED", "COMPLETED"), site.slurm.squeue()
    assert site.our_jobs() == []
    assert not site.serving()
    with pytest.raises(ServerNotFound):
        await site.client.poll("running")


async def cancel_pending(site, name: str, query_in_flight: bool) -> None:
    """The hub cancels a pending spawn: Stop while the job waits in the queue.

    batchspawner's start() loops: query squeue, sleep startup_poll_interval. Where the
    Stop lands in that loop matters (see test_stop_during_the_queue_query), so the caller
    chooses: right after the loop's query started, or while it sleeps.
    """
    slurm = site.slurm
    slurm.occupy()
    start_id = await site.start_server(name)
    events: list[pb.EventsResponse] = []
    follower = asyncio.create_task(collect(site.client, name, events, timeout=None))
    job = (await wait_for(lambda: site.our_jobs(), 10, message="no job submitted"))[0]
    # the user has seen the job wait in the queue, and cancels
    await wait_for(lambda: any(e.message == "Pending in queue..." for e in events), 10,
                   message=f"no 'Pending' event: {[e.message for e in events]}")  # fmt: skip
    assert slurm.job(job.id).state == "PENDING"
    assert (await site.client.poll(name)).state == pb.SERVER_STATE_STARTING
    queried = "Spawner querying job:"  # start()'s queries (the poller leaves STARTING alone)
    if query_in_flight:
        before = site.log_count(queried)
        await wait_for(lambda: site.log_count(queried) > before, 10, message="no new squeue")
    assert (site.log_count(queried) > site.log_count(f"Job {job.id} still pending")) == query_in_flight

    r = await site.client.stop(name, start_id)
    await asyncio.wait_for(follower, 10)  # the stream ends with the stopped start
    assert r.outcome == pb.STOP_OUTCOME_STOPPED
    assert slurm.job(job.id).state == "CANCELLED", slurm.squeue()
    assert site.our_jobs() == []
    with pytest.raises(ServerNotFound):
        await site.client.poll(name)
    statuses, not_found = await site.client.batch_poll([name])
    assert (statuses, not_found) == ([], [name])
    # the freed node runs nothing of ours
    slurm.free()
    await asyncio.sleep(1.5)
    assert site.our_jobs() == [] and not site.serving()


async def test_stop_while_pending_leaves_nothing(make_slurm_site):
    """Cancel while start() waits between two squeue calls (nearly always, on a real site)."""
    site = await make_slurm_site("c.SlurmSpawner.startup_poll_interval = 5\n")
    await cancel_pending(site, "cancelled", query_in_flight=False)


SLOW_SQUEUE = """#!{python}
import os, sys, time
time.sleep(2)  # a busy controller
os.execvp("squeue", ["squeue", *sys.argv[1:]])
"""


async def test_stop_during_the_queue_query(make_slurm_site, tmp_path):
    """Cancel while start()'s squeue runs (a slow squeue makes that moment last 2 s)."""
    slow = tmp_path / "slow-squeue"
    slow.write_text(SLOW_SQUEUE.format(python=sys.executable))
    slow.chmod(0o755)
    site = await make_slurm_site(
        f"c.SlurmSpawner.batch_query_cmd = \"exec {slow} -h -j {{job_id}} -o '%T %B'\"\n"
        "c.SlurmSpawner.startup_poll_interval = 0.1\n"
    )
    await cancel_pending(site, "cancelled-in-query", query_in_flight=True)


async def test_controller_outage_is_not_a_stopped_server(site):
    """slurmctld down for ~20 s while the job runs: never STOPPED; running afterwards."""
    slurm = site.slurm
    start_id = await site.start_server("steady", wait_until_ready=True)
    [job] = site.our_jobs()
    assert (await site.client.poll("steady")).state == pb.SERVER_STATE_RUNNING
    # serving: srun has its step (srun needs slurmctld to start one, not to keep it)
    await wait_for(site.serving, 10, message="the job's server does not answer")

    slurm.stop_controller()
    seen: set[int] = set()
    down = time.monotonic()
    while time.monotonic() - down < 20:
        status = await site.client.poll("steady")
        statuses, _ = await site.client.batch_poll(["steady"])
        [listed] = await site.client.list_servers()
        seen |= {status.state, statuses[0].state, listed.state}
        assert pb.SERVER_STATE_STOPPED not in seen, status
        await asyncio.sleep(0.5)
    assert site.serving(), f"the job must run on without its controller\n{site.job_logs()}"
    slurm.start_controller()
    # the Outpost's polls did run into the outage (batchspawner logs squeue's error)
    assert "Unable to contact slurm controller" in site.op.log.read_text()
    assert seen == {pb.SERVER_STATE_RUNNING}, seen

    # with the controller back, poll() succeeds again (a fresh poll after the restart)
    mark = len(site.op.log.read_text())
    await wait_for(lambda: f"squeue -h -j {job.id}" in site.op.log.read_text()[mark:], 40,
                   message="no poll after the controller came back")  # fmt: skip
    assert slurm.job(job.id).state == "RUNNING"
    status = await site.client.poll("steady")
    assert status.state == pb.SERVER_STATE_RUNNING
    assert (status.address.host, status.address.port) == (slurm.node, site.notebook_port)

    assert (await site.client.stop("steady", start_id)).outcome == pb.STOP_OUTCOME_STOPPED
    assert site.our_jobs() == [], slurm.squeue()


async def test_outage_longer_than_poll_timeout(make_slurm_site):
    """squeue takes ~18 s to give up on a dead slurmctld; poll_timeout is shorter here."""
    site = await make_slurm_site("c.Outpost.poll_timeout = 3\n")
    slurm = site.slurm
    start_id = await site.start_server("patient", wait_until_ready=True)
    slurm.stop_controller()
    try:
        down = time.monotonic()
        while time.monotonic() - down < 8:
            status = await site.client.poll("patient")
            assert status.state != pb.SERVER_STATE_STOPPED, "STOPPED while the job runs"
            await asyncio.sleep(0.5)
    finally:
        slurm.start_controller()
    assert (await site.client.stop("patient", start_id)).outcome == pb.STOP_OUTCOME_STOPPED
    assert site.our_jobs() == [], slurm.squeue()


async def test_hostile_env_and_user_options_never_reach_sbatch(site):
    """A hub's LD_PRELOAD or SBATCH_PARTITION would reach sbatch (batchspawner submits
    with the notebook's env), its user_options the batch script's variables: both are
    refused before anything is submitted, and the site's own start keeps its partition."""
    from outpost_client import EnvNotAllowed, UserOptionNotAllowed

    env = {**site.env("evil"), "SBATCH_PARTITION": "gpu", "LD_PRELOAD": "/tmp/evil.so"}
    with pytest.raises(EnvNotAllowed) as err:
        await site.client.start("evil", uuid.uuid4().hex, user_name="root", env=env)
    assert err.value.metadata["keys"] == "LD_PRELOAD,SBATCH_PARTITION"
    with pytest.raises(UserOptionNotAllowed) as err:
        await site.client.start("evil2", uuid.uuid4().hex, user_name="root", env=site.env("evil2"),
                                user_options={"partition": "gpu", "cmd": "/bin/evil"})  # fmt: skip
    assert err.value.metadata["keys"] == "cmd,partition"
    assert site.our_jobs() == [] and site.log_count("Spawner submitting") == 0  # sbatch never ran

    await site.start_server("fine", wait_until_ready=True)
    [job] = site.our_jobs()
    shown = site.slurm.run("scontrol", "show", "job", "-o", job.id).stdout
    assert "Partition=debug" in shown, shown
    script = site.slurm.run("scontrol", "write", "batch_script", job.id, "-").stdout
    assert "--partition=debug" in script and "gpu" not in script and "evil" not in script, script


async def test_output_tail_of_a_failed_job_and_of_one_that_exits(make_slurm_site, tmp_path):
    """The notebook's last words from the job's output file (batchspawner's --output).

    A job whose notebook command fails at once: as in a hub, no port is ever reported
    (this site has no ``mock_port``), start() times out, and the FAILED event carries what
    the job wrote. A job that ran and then ended: Poll's STOPPED status carries its last
    lines. The API token the job's env holds is redacted.
    """
    failing = tmp_path / "failing_notebook.py"
    failing.write_text("import os\nprint('known line', os.environ['JUPYTERHUB_API_TOKEN'])\nraise SystemExit(3)\n")
    site = await make_slurm_site(
        f"c.Spawner.cmd = [{sys.executable!r}, {str(failing)!r}]\n"
        "del batchspawner.SlurmSpawner.mock_port  # the port a notebook that fails never reports\n"
        "c.SlurmSpawner.start_timeout = 20\n"  # the job runs and fails well before it
    )
    env = site.env("doomed")
    await site.client.start("doomed", uuid.uuid4().hex, user_name="root", spawner_name="doomed", env=env)
    events = await collect(site.client, "doomed", timeout=60)
    failed = events[-1]
    assert failed.kind == pb.EVENT_KIND_FAILED, [e.message for e in events]
    assert failed.message == "The server did not start within 20 seconds."
    assert "known line [secret]" in failed.output_tail, (failed.output_tail, site.job_logs())
    assert env["JUPYTERHUB_API_TOKEN"] not in failed.output_tail
    assert (await site.client.poll("doomed")).output_tail == failed.output_tail
    await site.client.stop("doomed")

    exiting = tmp_path / "exiting_notebook.py"
    exiting.write_text(
        "import time\nprint('serving', flush=True)\ntime.sleep(2)\n"
        "print('the kernel died', flush=True)\nraise SystemExit(5)\n"
    )
    site = await make_slurm_site(
        f"c.Spawner.cmd = [{sys.executable!r}, {str(exiting)!r}]\n"
        "c.Outpost.readiness_check = False  # this notebook prints and exits: it never serves\n"
    )
    await site.start_server("short")
    assert (await collect(site.client, "short", timeout=60))[-1].kind == pb.EVENT_KIND_READY

    async def stopped():
        status = await site.client.poll("short")
        return status if status.state == pb.SERVER_STATE_STOPPED else None

    status = await wait_for(stopped, timeout=30, interval=0.5, message="the job never ended")
    assert "serving\nthe kernel died" in status.output_tail, (status.output_tail, site.job_logs())
    await site.client.stop("short")
