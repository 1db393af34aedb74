"""The container image (Dockerfile), with a real Docker engine: built on a base made from
Debian packages (no registry here), run read-only as its non-root user with tini as PID 1,
serving gRPC with mTLS to a real JupyterHub on this host, which spawns a notebook inside
the container through the embedded SSH forwarder and its tunnel.

The engine is private to the test (tests/harness/docker.py): its own socket and data root,
--bridge=none, containers on the host network. The image is built with
``EXTRA_PACKAGES=jupyter-server`` (jupyterhub-singleuser needs it; the Outpost's image
itself does not).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import asyncssh
import pytest
from cryptography.fernet import Fernet

from outpost_client import pb
from outpost_server.certs import Pair

from .harness.docker import PrivateDockerd, base_image_tar, docker_unavailable
from .harness.hub import hub_client
from .harness.outpost import ROOT
from .harness.util import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UID = 1000  # the image's user (Dockerfile)
CONFIG = """\
from jupyterhub.spawner import SimpleLocalProcessSpawner

c = get_config()  # noqa
c.Outpost.spawner_class = SimpleLocalProcessSpawner
c.Outpost.ip = "127.0.0.1"
c.Outpost.port = {port}
c.Outpost.tls_cert = "/etc/jupyterhub-outpost/certs/outpost-server/outpost-server.crt"
c.Outpost.tls_key = "/etc/jupyterhub-outpost/certs/outpost-server/outpost-server.key"
c.Outpost.tls_client_ca = "/etc/jupyterhub-outpost/certs/outpost-ca/outpost-ca.crt"
c.Outpost.allowed_hubs = ["hub-a"]
c.Outpost.crypt_key_file = "/etc/jupyterhub-outpost/crypt_key"
c.Outpost.poll_interval = 2
c.Spawner.cmd = ["jupyterhub-singleuser"]
c.SSHForwarder.enabled = True
c.SSHForwarder.ip = "127.0.0.1"
c.SSHForwarder.port = {ssh_port}
c.SSHForwarder.host_key_file = "/var/lib/jupyterhub-outpost/ssh_host_key"
c.SSHForwarder.authorized_keys = {{"hub-a": ["{hub_pub}"]}}
c.SSHForwarder.reverse_listen = {{"hub-a": ["127.0.0.1:{rport}"]}}
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
            "--build-arg", "BASE=local/bookworm-python:test", "--build-arg", "EXTRA_PACKAGES=jupyter-server",
            "-t", "jupyterhub-outpost:test", str(ROOT),
            timeout=900,
        )  # fmt: skip
        timings["build"] = time.monotonic() - began
        print(f"container test: base image {timings['base']:.1f}s, import+build {timings['build']:.1f}s")
        yield dockerd
    finally:
        dockerd.stop()


def image_config(dockerd: PrivateDockerd) -> dict:
    return json.loads(dockerd.docker("image", "inspect", "jupyterhub-outpost:test").stdout)[0]["Config"]


def test_image_runs_as_non_root_under_tini_with_volumes(engine):
    config = image_config(engine)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"][0] == "/usr/bin/tini"
    assert set(config["Volumes"]) == {"/var/lib/jupyterhub-outpost", "/etc/jupyterhub-outpost"}
    assert "python3" in config["Healthcheck"]["Test"]
    # no compilers in the final stage
    found = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", "jupyterhub-outpost:test", "-c",
        "command -v gcc cc g++ make || true",
    ).stdout  # fmt: skip
    assert found.strip() == "", found


async def test_hub_spawns_a_notebook_in_the_container(engine, hub_factory, tmp_path):
    docker = engine.docker
    name = f"outpost-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    volume = f"{name}-state"
    port, ssh_port, rport, health_port = free_port(), free_port(), free_port(), free_port()

    # the config volume: certificates made by the image's own generate-certs, the crypt key
    # as a file only the image's user reads, outpost_config.py
    etc = tmp_path / "etc"
    etc.mkdir()
    os.chown(etc, UID, UID)
    docker(
        "run", "--rm", "--read-only", "--network", "none", "-v", f"{etc}:/etc/jupyterhub-outpost",
        "jupyterhub-outpost:test",
        "jupyterhub-outpost", "generate-certs", "--out", "/etc/jupyterhub-outpost/certs", "--host", "127.0.0.1",
        "--hub", "hub-a",
    )  # fmt: skip
    certs = etc / "certs"
    key = etc / "crypt_key"
    key.write_text(Fernet.generate_key().decode() + "\n")
    key.chmod(0o600)
    os.chown(key, UID, UID)

    hub_key = asyncssh.generate_private_key("ssh-ed25519")
    hub_key_file = tmp_path / "hub_ssh_key"
    hub_key_file.write_bytes(hub_key.export_private_key())
    hub_key_file.chmod(0o600)
    (etc / "outpost_config.py").write_text(
        CONFIG.format(
            port=port, ssh_port=ssh_port, rport=rport, hub_pub=hub_key.export_public_key().decode().strip()
        )
    )

    docker("volume", "create", volume)
    docker(
        "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-v", f"{volume}:/var/lib/jupyterhub-outpost", "-v", f"{etc}:/etc/jupyterhub-outpost:ro",
        "-e", f"OUTPOST_HEALTH_PORT={health_port}", "--health-interval", "1s", "--health-start-period", "60s",
        "jupyterhub-outpost:test",
    )  # fmt: skip

    def logs(n: int = 4000) -> str:
        out = docker("logs", name, check=False)
        return (out.stdout + out.stderr)[-n:]

    ca, hub_pair = str(certs / "outpost-ca" / "outpost-ca.crt"), certs / "hub-a"
    pair = Pair(str(hub_pair / "hub-a.crt"), str(hub_pair / "hub-a.key"))

    async def serving_over_mtls() -> bool:
        try:
            async with hub_client(f"127.0.0.1:{port}", ca=ca, pair=pair) as client:
                await client.list_servers()
            return True
        except Exception:
            return False

    await wait_for(serving_over_mtls, timeout=60, interval=0.3, message=f"no mTLS gRPC:\n{logs()}")
    # tini is PID 1 (the first process), the Outpost its child, both as the image's user
    procs = processes(docker, name)
    assert procs[0][1].startswith("/usr/bin/tini"), procs
    assert ("1000", "/opt/outpost/bin/python3 /opt/outpost/bin/jupyterhub-outpost") in [
        (uid, " ".join(args.split()[:2])) for uid, args in procs
    ], procs
    assert all(uid == str(UID) for uid, _ in procs), procs
    # the image's HEALTHCHECK: the gRPC health service on c.Outpost.health_port
    await wait_for(
        lambda: health(docker, name) == "healthy", timeout=60, interval=0.5, message=f"not healthy:\n{logs()}"
    )

    host_pub = docker("exec", name, "cat", "/var/lib/jupyterhub-outpost/ssh_host_key.pub").stdout.strip()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{ssh_port} {host_pub}\n")
    hub = hub_factory(
        "\n".join(
            [
                f'c.OutpostSpawner.outpost_address = "127.0.0.1:{port}"',
                f'c.OutpostSpawner.outpost_ca = "{ca}"',
                f'c.OutpostSpawner.outpost_cert = "{pair.cert}"',
                f'c.OutpostSpawner.outpost_key = "{pair.key}"',
                'c.OutpostSpawner.ssh_host = "127.0.0.1"',
                f"c.OutpostSpawner.ssh_port = {ssh_port}",
                f'c.OutpostSpawner.ssh_key = "{hub_key_file}"',
                f'c.OutpostSpawner.ssh_known_hosts = "{known_hosts}"',
                "c.OutpostSpawner.hub_api_forward = True",
                f"c.OutpostSpawner.hub_api_site_port = {rport}",
                "",
            ]
        )
    )
    hub.start()
    await hub.wait_ready()
    try:
        events = await hub.spawn("alice")
        assert events[-1].get("ready"), (events, hub.tail(), logs())
        r = await hub.get("/user/alice/api/status")
        assert r.status_code == 200, (r.status_code, r.text, hub.tail(), logs())
        # the notebook runs inside the container, as the image's user
        notebooks = [uid for uid, args in processes(docker, name) if "jupyterhub-singleuser" in args]
        assert notebooks == [str(UID)], processes(docker, name)
        model = await hub.server_model("alice")

        # restart: the database, the SSH host key and the certificates are on the volumes.
        # The notebook was a process of the container and ends with it (notebooks that
        # outlive the Outpost's container are KubeSpawner pods, batch jobs); its server
        # comes back from the database, stopped, and the hub starts it again through a
        # tunnel to the same host key
        docker("restart", "-t", "20", name, timeout=120)
        await wait_for(serving_over_mtls, timeout=60, interval=0.3, message=f"no mTLS gRPC after restart:\n{logs()}")
        assert docker("exec", name, "cat", "/var/lib/jupyterhub-outpost/ssh_host_key.pub").stdout.strip() == host_pub
        async with hub_client(f"127.0.0.1:{port}", ca=ca, pair=pair) as client:
            servers = {s.server_name: s for s in await client.list_servers()}
        assert servers["alice"].start_id == model["state"]["start_id"], (servers, logs())
        assert servers["alice"].state == pb.SERVER_STATE_STOPPED, (servers, logs())
        # tini passed docker's SIGTERM on: the Outpost shut down in order, then came back
        whole = logs(10**7)
        assert "Outpost stopped; running notebooks keep running" in whole, logs()
        assert "Restored 1 servers from the database" in whole, logs()
        await hub.stop_server("alice")
        events = await hub.spawn("alice")
        assert events[-1].get("ready"), (events, hub.tail(), logs())
        r = await hub.get("/user/alice/api/status")
        assert r.status_code == 200, (r.status_code, r.text, hub.tail(), logs())
        await hub.stop_server("alice")
    finally:
        hub.stop()
        hub.stop_proxy()
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def processes(docker, name: str) -> list[tuple[str, str]]:
    """(uid, command line) of the container's processes, the first one first."""
    lines = docker("top", name, "-o", "pid,uid,args").stdout.splitlines()[1:]
    rows = [line.split(None, 2) for line in lines]
    return [(uid, args) for _, uid, args in sorted(rows, key=lambda row: int(row[0]))]


def health(docker, name: str) -> str:
    state = json.loads(docker("inspect", name).stdout)[0]["State"]
    return state.get("Health", {}).get("Status", "")


