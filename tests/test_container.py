"""The container image (Dockerfile), with a real Docker engine: built on a base made from
Debian packages (no registry here), run read-only as its non-root user with tini as PID 1,
serving gRPC with mTLS to a real JupyterHub on this host through the embedded SSH forwarder
and the hub's tunnel:

- a notebook inside the container (SimpleLocalProcessSpawner): it ends with the container;
  its server comes back from the state volume's database as stopped, and the hub starts it
  again;
- a notebook that is a Slurm job on this host (batchspawner's SlurmSpawner in the container,
  the site's slurm.conf and munge socket mounted): ``docker restart`` keeps it running and
  reachable, and the restarted Outpost finds it again from the state volume.

The engine is private to the test (tests/harness/docker.py): its own socket and data root,
--bridge=none, containers on the host network. The image is built with
``EXTRA_PACKAGES="jupyter-server batchspawner"`` and ``APT_PACKAGES=slurm-client``, as a
site builds it for its Spawner (the Outpost's default image has none of them).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import asyncssh
import pytest
from cryptography.fernet import Fernet

from outpost_client import pb
from outpost_server.certs import Pair

from .harness.docker import PrivateDockerd, base_image_tar, docker_unavailable
from .harness.hub import hub_client
from .harness.outpost import BIN, ROOT
from .harness.slurm import JOB_NAME, SLURM_SPAWNER_REQUESTS, our_jobs
from .harness.util import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UID = 1000  # the image's user (Dockerfile)
IMAGE = "jupyterhub-outpost:test"
CONFIG = """\
c = get_config()  # noqa
c.Outpost.ip = "127.0.0.1"
c.Outpost.port = {port}
c.Outpost.tls_cert = "/etc/jupyterhub-outpost/certs/outpost-server/outpost-server.crt"
c.Outpost.tls_key = "/etc/jupyterhub-outpost/certs/outpost-server/outpost-server.key"
c.Outpost.tls_client_ca = "/etc/jupyterhub-outpost/certs/outpost-ca/outpost-ca.crt"
c.Outpost.allowed_hubs = ["hub-a"]
c.Outpost.crypt_key_file = "/etc/jupyterhub-outpost/crypt_key"
c.Outpost.poll_interval = 2
c.SSHForwarder.enabled = True
c.SSHForwarder.ip = "127.0.0.1"
c.SSHForwarder.port = {ssh_port}
c.SSHForwarder.host_key_file = "/var/lib/jupyterhub-outpost/ssh_host_key"
c.SSHForwarder.authorized_keys = {{"hub-a": ["{hub_pub}"]}}
c.SSHForwarder.reverse_listen = {{"hub-a": ["127.0.0.1:{rport}"]}}
"""

#: the notebook runs inside the container
IN_CONTAINER = """
c.Outpost.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.Spawner.cmd = ["jupyterhub-singleuser"]
"""

#: The notebook is a Slurm job on this host. The container's sbatch talks to the host's
#: slurmctld (slurm.conf and the munge socket mounted at their host path); the job runs as
#: the container's user (uid 1000, submitting as itself: exec_prefix "") and runs the
#: suite's jupyterhub-singleuser (see notebook_python); it reports its port to the
#: Outpost's relay and reaches the hub API through the relay and the hub's reverse forward.
SLURM = """
c.Outpost.spawner_class = "batchspawner.SlurmSpawner"
c.Outpost.user_mapping = {{"hub-a": {{"alice": "outpost"}}}}
c.HubAPIRelay.enabled = True
c.HubAPIRelay.ip = "127.0.0.1"
c.HubAPIRelay.port = {relay_port}
""" + SLURM_SPAWNER_REQUESTS + """c.SlurmSpawner.batchspawner_singleuser_cmd = "{python} -m batchspawner.singleuser"
c.Spawner.cmd = ["{bin}/jupyterhub-singleuser"]
c.Spawner.environment = {{
    "PYTHONPATH": "{site_packages}",
    "JUPYTERHUB_ACTIVITY_INTERVAL": "1",
    "JUPYTER_RUNTIME_DIR": "{jobs}/runtime",
    "JUPYTER_DATA_DIR": "{jobs}/data",
    "IPYTHONDIR": "{jobs}/ipython",
}}
c.SlurmSpawner.batch_script = \"\"\"#!/bin/bash
#SBATCH --output={jobs}/slurm-%j.log
#SBATCH --job-name={job_name}
#SBATCH --chdir={jobs}
#SBATCH --export={{{{keepvars}}}}
#SBATCH --partition={{{{partition}}}}
#SBATCH --time={{{{runtime}}}}
#SBATCH --mem={{{{memory}}}}
#SBATCH --cpus-per-task={{{{nprocs}}}}
set -euo pipefail
{{{{cmd}}}}
\"\"\"
"""


@pytest.fixture(scope="module")
def engine():
    """A private dockerd with the image built (module scope: one build per run)."""
    why = docker_unavailable()
    if why:
        pytest.skip(why)
    timings = {}
    began = time.monotonic()
    base = base_image_tar()
    timings["base"] = time.monotonic() - began
    dockerd = PrivateDockerd()
    try:
        dockerd.start()
        began = time.monotonic()
        dockerd.import_base(base, "local/bookworm-python:test")
        dockerd.docker(
            "build", "--network", "host", "--secret", "id=pipca,src=/etc/ssl/certs/ca-certificates.crt",
            "--build-arg", "BASE=local/bookworm-python:test",
            "--build-arg", "EXTRA_PACKAGES=jupyter-server batchspawner", "--build-arg", "APT_PACKAGES=slurm-client",
            "-t", IMAGE, str(ROOT),
            timeout=900,
        )  # fmt: skip
        timings["build"] = time.monotonic() - began
        print(f"container test: base image {timings['base']:.1f}s, import+build {timings['build']:.1f}s")
        yield dockerd
    finally:
        dockerd.stop()


def image_config(dockerd: PrivateDockerd) -> dict:
    return json.loads(dockerd.docker("image", "inspect", IMAGE).stdout)[0]["Config"]


def test_image_runs_as_non_root_under_tini_with_volumes(engine):
    config = image_config(engine)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"][0] == "/usr/bin/tini"
    assert set(config["Volumes"]) == {"/var/lib/jupyterhub-outpost", "/etc/jupyterhub-outpost"}
    assert "python3" in config["Healthcheck"]["Test"]
    # no compilers in the final stage (APT_PACKAGES=slurm-client brings none either)
    found = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c",
        "command -v gcc cc g++ make || true",
    ).stdout  # fmt: skip
    assert found.strip() == "", found


class ContainerOutpost:
    """One Outpost container as a site runs it: the config volume (certificates made by the
    image's own generate-certs, the crypt key as a file only the image's user reads,
    outpost_config.py), a named state volume, a read-only root, the host network; and the
    hub-side material (client certificate, SSH key, known_hosts)."""

    def __init__(self, dockerd: PrivateDockerd, tmp: Path, site_config: str, run_args: tuple = ()):
        self.docker = dockerd.docker
        self.name = f"outpost-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.volume = f"{self.name}-state"
        self.port, self.ssh_port, self.rport, self.health_port = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        )
        self.tmp = tmp
        self.run_args = run_args
        self.etc = etc = tmp / "etc"
        etc.mkdir()
        os.chown(etc, UID, UID)
        self.docker(
            "run", "--rm", "--read-only", "--network", "none", "-v", f"{etc}:/etc/jupyterhub-outpost", IMAGE,
            "jupyterhub-outpost", "generate-certs", "--out", "/etc/jupyterhub-outpost/certs", "--host", "127.0.0.1",
            "--hub", "hub-a",
        )  # fmt: skip
        key = etc / "crypt_key"
        key.write_text(Fernet.generate_key().decode() + "\n")
        key.chmod(0o600)
        os.chown(key, UID, UID)
        hub_key = asyncssh.generate_private_key("ssh-ed25519")
        self.hub_key_file = tmp / "hub_ssh_key"
        self.hub_key_file.write_bytes(hub_key.export_private_key())
        self.hub_key_file.chmod(0o600)
        hub_pub = hub_key.export_public_key().decode().strip()
        config = CONFIG.format(port=self.port, ssh_port=self.ssh_port, rport=self.rport, hub_pub=hub_pub)
        (etc / "outpost_config.py").write_text(config + site_config)
        certs = etc / "certs"
        self.ca = str(certs / "outpost-ca" / "outpost-ca.crt")
        self.pair = Pair(str(certs / "hub-a" / "hub-a.crt"), str(certs / "hub-a" / "hub-a.key"))
        self.host_pub = ""

    def run(self) -> None:
        self.docker("volume", "create", self.volume)
        self.docker(
            "run", "-d", "--name", self.name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
            "-v", f"{self.volume}:/var/lib/jupyterhub-outpost", "-v", f"{self.etc}:/etc/jupyterhub-outpost:ro",
            "-e", f"OUTPOST_HEALTH_PORT={self.health_port}", "--health-interval", "1s", "--health-start-period", "60s",
            *self.run_args, IMAGE,
        )  # fmt: skip

    def remove(self) -> None:
        self.docker("rm", "-f", self.name, check=False)
        self.docker("volume", "rm", "-f", self.volume, check=False)

    def restart(self) -> None:
        """docker restart: tini passes the SIGTERM on, the Outpost shuts down in order."""
        self.docker("restart", "-t", "20", self.name, timeout=120)

    def logs(self, n: int = 4000) -> str:
        out = self.docker("logs", self.name, check=False)
        return (out.stdout + out.stderr)[-n:]

    def processes(self) -> list[tuple[str, str]]:
        return processes(self.docker, self.name)

    async def wait_serving(self, when: str = "") -> None:
        async def serving_over_mtls() -> bool:
            try:
                await self.servers()
                return True
            except Exception:
                return False

        await wait_for(
            serving_over_mtls, timeout=60, interval=0.3, message=f"no mTLS gRPC{when}:\n{self.logs()}"
        )

    async def servers(self) -> dict:
        async with hub_client(f"127.0.0.1:{self.port}", ca=self.ca, pair=self.pair) as client:
            return {s.server_name: s for s in await client.list_servers()}

    def read_host_key(self) -> str:
        return self.docker(
            "exec", self.name, "cat", "/var/lib/jupyterhub-outpost/ssh_host_key.pub"
        ).stdout.strip()

    def hub_config(self) -> str:
        """The hub's OutpostSpawner lines: mTLS, the tunnel to the container's SSH forwarder
        (its host key pinned), the hub API reverse forward."""
        self.host_pub = self.read_host_key()
        known_hosts = self.tmp / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {self.host_pub}\n")
        return "\n".join(
            [
                f'c.OutpostSpawner.outpost_address = "127.0.0.1:{self.port}"',
                f'c.OutpostSpawner.outpost_ca = "{self.ca}"',
                f'c.OutpostSpawner.outpost_cert = "{self.pair.cert}"',
                f'c.OutpostSpawner.outpost_key = "{self.pair.key}"',
                'c.OutpostSpawner.ssh_host = "127.0.0.1"',
                f"c.OutpostSpawner.ssh_port = {self.ssh_port}",
                f'c.OutpostSpawner.ssh_key = "{self.hub_key_file}"',
                f'c.OutpostSpawner.ssh_known_hosts = "{known_hosts}"',
                "c.OutpostSpawner.hub_api_forward = True",
                f"c.OutpostSpawner.hub_api_site_port = {self.rport}",
                "",
            ]
        )

    def assert_restarted_in_order(self) -> None:
        """tini passed docker's SIGTERM on: the Outpost shut down in order, then came back
        with its server from the volume's database."""
        whole = self.logs(10**7)
        assert "Outpost stopped; running notebooks keep running" in whole, self.logs()
        assert "Restored 1 servers from the database" in whole, self.logs()
        assert self.read_host_key() == self.host_pub  # the hub's pinned host key still holds


async def test_hub_spawns_a_notebook_in_the_container(engine, hub_factory, tmp_path):
    site = ContainerOutpost(engine, tmp_path, IN_CONTAINER)
    site.run()
    hub = None
    try:
        await site.wait_serving()
        # tini is PID 1 (the first process), the Outpost its child, both as the image's user
        procs = site.processes()
        assert procs[0][1].startswith("/usr/bin/tini"), procs
        assert ("1000", "/opt/outpost/bin/python3 /opt/outpost/bin/jupyterhub-outpost") in [
            (uid, " ".join(args.split()[:2])) for uid, args in procs
        ], procs
        assert all(uid == str(UID) for uid, _ in procs), procs
        # the image's HEALTHCHECK: the gRPC health service on c.Outpost.health_port
        await wait_for(
            lambda: health(site.docker, site.name) == "healthy",
            timeout=60, interval=0.5, message=f"not healthy:\n{site.logs()}",
        )  # fmt: skip

        hub = hub_factory(site.hub_config())
        hub.start()
        await hub.wait_ready()
        events = await hub.spawn("alice")
        assert events[-1].get("ready"), (events, hub.tail(), site.logs())
        r = await hub.get("/user/alice/api/status")
        assert r.status_code == 200, (r.status_code, r.text, hub.tail(), site.logs())
        # the notebook runs inside the container, as the image's user
        notebooks = [uid for uid, args in site.processes() if "jupyterhub-singleuser" in args]
        assert notebooks == [str(UID)], site.processes()
        model = await hub.server_model("alice")

        # restart: the database, the SSH host key and the certificates are on the volumes.
        # This notebook was a process of the container and ended with it (the Slurm test
        # below has one that outlives the container); its server comes back from the
        # database, stopped, and the hub starts it again through a tunnel to the same host key
        site.restart()
        await site.wait_serving(" after restart")
        site.assert_restarted_in_order()
        servers = await site.servers()
        assert servers["alice"].start_id == model["state"]["start_id"], (servers, site.logs())
        assert servers["alice"].state == pb.SERVER_STATE_STOPPED, (servers, site.logs())
        await hub.stop_server("alice")
        events = await hub.spawn("alice")
        assert events[-1].get("ready"), (events, hub.tail(), site.logs())
        r = await hub.get("/user/alice/api/status")
        assert r.status_code == 200, (r.status_code, r.text, hub.tail(), site.logs())
        await hub.stop_server("alice")
    finally:
        if hub is not None:
            hub.stop()
            hub.stop_proxy()
        site.remove()


def host_account(uid: int) -> str:
    """The host's account with this uid: Slurm runs the container user's jobs as this uid
    on the node, and slurmd looks it up. Created when the machine has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "outpost-container"
        r = subprocess.run(
            ["useradd", "--uid", str(uid), "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode not in (0, 9):  # 9: created meanwhile
            raise RuntimeError(f"useradd {name} failed: {r.stderr.strip()}") from None
        return name


def notebook_python() -> tuple[str, str]:
    """An interpreter a non-root job may run, and the suite venv's site-packages for it.

    The venv's own interpreter may live where only root can enter (pyenv under /root), so
    the job runs the system's Python of the same minor version on the venv's packages
    (world-readable): jupyterhub-singleuser and batchspawner as in every other test."""
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} missing: the job's user needs a Python of the venv's version")
    return python, sysconfig.get_paths()["purelib"]


@pytest.mark.slurm
async def test_slurm_notebook_outlives_a_container_restart(engine, slurm, hub_factory, tmp_path):
    python, site_packages = notebook_python()
    host_account(UID)
    jobs = slurm.root / "jobs-container"  # the job's working directory, its user's own
    jobs.mkdir(mode=0o700)
    os.chown(jobs, UID, UID)
    extra = SLURM.format(
        relay_port=free_port(),
        bin=BIN,
        jobs=jobs,
        job_name=JOB_NAME,
        python=python,
        site_packages=site_packages,
    )
    # slurm.conf and the munge socket at their host path, read-only
    mounts = ("-v", f"{slurm.root}:{slurm.root}:ro", "-e", f"SLURM_CONF={slurm.conf}")
    site = ContainerOutpost(engine, tmp_path, extra, run_args=mounts)
    site.run()
    hub = None
    try:
        await site.wait_serving()
        hub = hub_factory(site.hub_config() + "c.Spawner.start_timeout = 120\nc.Spawner.poll_interval = 2\n")
        hub.start()
        await hub.wait_ready()
        events = await hub.spawn("alice")
        job_logs = lambda: "\n".join(
            f"--- {f.name}\n{f.read_text()[-3000:]}" for f in jobs.glob("slurm-*.log")
        )  # noqa: E731
        assert events[-1].get("ready"), (events, hub.tail(), site.logs(), slurm.log_tail(), job_logs())
        [job] = our_jobs(slurm)
        assert job.state == "RUNNING", slurm.squeue()
        r = await hub.get("/user/alice/api/status")
        assert r.status_code == 200, (r.status_code, r.text, hub.tail(), site.logs())
        # the notebook is no process of the container: a job of the host's slurmd
        assert not [args for _, args in site.processes() if "jupyterhub-singleuser" in args], site.processes()
        start_id = (await hub.server_model("alice"))["state"]["start_id"]

        site.restart()
        await site.wait_serving(" after restart")
        site.assert_restarted_in_order()
        # the job ran on; the restarted Outpost polls it (squeue from the container) and has
        # it running, the same start
        assert slurm.job(job.id).state == "RUNNING", slurm.squeue()

        async def running_again() -> bool:
            remote = (await site.servers()).get("alice")
            return (
                remote is not None and remote.state == pb.SERVER_STATE_RUNNING and remote.start_id == start_id
            )

        await wait_for(
            running_again, timeout=30, interval=0.5, message=f"not running after restart:\n{site.logs()}"
        )

        # the same notebook, reachable again: the hub's tunnel reconnected to the restarted
        # forwarder, and the notebook reaches the hub API again through the restarted relay
        # and the restored reverse forward (its activity reaches the hub)
        async def reachable() -> bool:
            return (await hub.get("/user/alice/api/status")).status_code == 200

        await wait_for(
            reachable, timeout=60, interval=1, message=f"not reachable after restart:\n{hub.tail()}"
        )
        before = (await hub.server_model("alice"))["last_activity"]
        await hub.get("/user/alice/api/contents")

        async def activity_moved() -> bool:
            return (await hub.server_model("alice"))["last_activity"] != before

        await wait_for(
            activity_moved, timeout=30, interval=0.5, message=f"no activity after restart:\n{site.logs()}"
        )
        model = await hub.server_model("alice")
        assert model["ready"] and model["state"]["start_id"] == start_id, model
        assert our_jobs(slurm) == [job]

        await hub.stop_server("alice")
        await wait_for(lambda: not our_jobs(slurm), 30, message=f"job still queued: {slurm.squeue()}")
    finally:
        if hub is not None:
            hub.stop()
            hub.stop_proxy()
        site.remove()


def processes(docker, name: str) -> list[tuple[str, str]]:
    """(uid, command line) of the container's processes, the first one first."""
    lines = docker("top", name, "-o", "pid,uid,args").stdout.splitlines()[1:]
    rows = [line.split(None, 2) for line in lines]
    return [(uid, args) for _, uid, args in sorted(rows, key=lambda row: int(row[0]))]


def health(docker, name: str) -> str:
    state = json.loads(docker("inspect", name).stdout)[0]["State"]
    return state.get("Health", {}).get("Status", "")
