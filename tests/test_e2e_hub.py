"""End to end: a real JupyterHub 6 with the real proxy spawns real notebooks
(jupyterhub-singleuser from jupyter-server, started by the real LocalProcessSpawner inside
an Outpost) through OutpostSpawner, the gRPC contract and an SSH tunnel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
import requests

from outpost_client import OutpostClient, pb
from outpost_server.hosting import CERT_FILES, certs_location

from .harness.hub import TOKEN, JupyterHubProcess
from .harness.netns import HUB_IP, SITE_IP, hub_and_site, netns_unavailable
from .harness.outpost import BIN, ROOT, sqlite_bytes
from .harness.procs import children_of
from .harness.site import Site
from .harness.util import free_port, port_open, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_spawn_progress_proxy_and_stop(site, hub_factory):
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()

    events = await hub.spawn("alice")
    messages = [e.get("message", "") for e in events]
    assert "site-a: preparing a notebook for alice" in messages, (messages, hub.tail())
    assert events[-1].get("ready"), (events, hub.tail())

    # through the proxy, the tunnel, to the notebook; it checks the token with the hub
    # API through the reverse forward
    r = await hub.get("/user/alice/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())

    model = await hub.server_model("alice")
    local_port = model["state"]["local_port"]
    remote = (await site.servers())["alice"]
    assert model["state"]["remote_port"] == remote.address.port
    assert port_open(local_port) and port_open(remote.address.port)

    await hub.stop_server("alice")
    assert "alice" not in await site.servers()
    await wait_for(lambda: not port_open(remote.address.port), timeout=15, message="notebook still listening")
    assert not port_open(local_port), "the forward must close with the server"


async def test_proxy_elsewhere_reaches_the_tunnel(site, hub_factory):
    """A proxy not on the hub's host (Kubernetes: its own pod) reaches notebooks at the
    address the hub names: here the tunnel listens everywhere and the hub names 127.0.0.5."""
    hub = hub_factory(
        site.hub_config()
        + 'c.OutpostSpawner.tunnel_listen_host = "0.0.0.0"\n'
        + 'c.OutpostSpawner.tunnel_connect_host = "127.0.0.5"\n'
    )
    hub.start()
    await hub.wait_ready()
    events = await hub.spawn("nia")
    assert events[-1].get("ready"), (events, hub.tail())
    assert "to proxy /user/nia/ => http://127.0.0.5:" in hub.tail(20000), hub.tail()
    r = await hub.get("/user/nia/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())
    await hub.stop_server("nia")


async def test_notebook_env_uses_reverse_forward(site, hub_factory):
    """The notebook's hub URLs point at the site-side end of the reverse forward."""
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()
    await hub.spawn("bob")
    async with OutpostClient(site.grpc_address) as client:
        status = await client.poll("bob")
        assert status.state == pb.SERVER_STATE_RUNNING
    # the env the Outpost persisted for the server is what the hub sent
    assert "JUPYTERHUB_API_TOKEN" not in site.stored("bob", "env")  # encrypted at rest
    rec_env = site.stored_env("bob")
    assert rec_env["JUPYTERHUB_API_URL"] == f"http://127.0.0.1:{site.rport}/hub/api"
    assert rec_env["JUPYTERHUB_ACTIVITY_URL"].startswith(f"http://127.0.0.1:{site.rport}/hub/api/users/bob/activity")
    assert "PATH" not in rec_env  # the hub's PATH means nothing at the site
    await hub.stop_server("bob")


async def test_two_outposts_behind_one_hub(make_site, hub_factory):
    a, b = await asyncio.gather(make_site("site-a"), make_site("site-b"))
    hub = hub_factory(
        a.hub_config()
        + f"c.OutpostSpawner.outposts = {{'gpu': {b.outposts_entry()!r}}}\n"
    )
    hub.start()
    await hub.wait_ready()
    # chosen per named server ("gpu") and through user_options ({"outpost": "gpu"})
    ev_default, ev_named, ev_option = await asyncio.gather(
        hub.spawn("carol"),
        hub.spawn("carol", "gpu"),
        hub.spawn("dave", options={"outpost": "gpu"}),
    )
    assert any("site-a:" in e.get("message", "") for e in ev_default)
    assert any("site-b:" in e.get("message", "") for e in ev_named)
    assert any("site-b:" in e.get("message", "") for e in ev_option)
    assert set(await a.servers()) == {"carol"}
    assert set(await b.servers()) == {"carol--gpu", "dave"}
    for path in ("/user/carol/api/status", "/user/carol/gpu/api/status", "/user/dave/api/status"):
        r = await hub.get(path)
        assert r.status_code == 200, (path, r.status_code)


async def test_hub_restart_finds_the_same_notebook(site, hub_factory):
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()
    await hub.spawn("erin")
    before = (await site.servers())["erin"]
    local_port = (await hub.server_model("erin"))["state"]["local_port"]

    hub.stop()  # cleanup_servers = False: the notebook keeps running
    assert not port_open(local_port)  # the hub process held the tunnel
    hub.start()
    await hub.wait_ready()
    model = await hub.server_model("erin")
    assert model and model["ready"], model
    assert model["state"]["local_port"] == local_port
    r = await hub.get("/user/erin/api/status")
    assert r.status_code == 200, (r.status_code, hub.tail())
    after = (await site.servers())["erin"]
    assert after.start_id == before.start_id and after.address.port == before.address.port


async def test_outpost_sigkill_restart_keeps_notebook_reachable(subreaper, site, hub_factory):
    # subreaper first: it must outlive the teardown that stops the orphaned notebook
    hub = hub_factory(site.hub_config() + "c.JupyterHub.last_activity_interval = 5\n")
    hub.start()
    await hub.wait_ready()
    await hub.spawn("fred")
    before = (await site.servers())["fred"]
    subreaper.pids.update(children_of(site.op.proc.pid))  # the notebook, orphaned by the kill

    site.op.kill(signal.SIGKILL)
    started = time.monotonic()
    site.op.start()

    async def reachable():
        r = await hub.get("/user/fred/api/status")
        return r.status_code == 200

    await wait_for(reachable, timeout=15, interval=0.3, message=f"not reachable again:\n{hub.tail()}")
    elapsed = time.monotonic() - started
    after = (await site.servers())["fred"]
    assert after.address.port == before.address.port  # the same notebook process
    model = await hub.server_model("fred")
    assert model and model["ready"], "the hub must never mark it dead"
    print(f"reachable again {elapsed:.1f}s after the Outpost restart")


# --- an outbound-only site --------------------------------------------------------------

@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
async def test_outbound_only_site(outpost_process, tmp_path, hub_factory):
    """Hub and site in two network namespaces; the site cannot open connections to the
    hub (a firewall in the hub's namespace drops them). Everything works anyway: the
    hub opens gRPC and SSH to the site, the notebook reaches the hub API (token checks,
    OAuth, activity) through the reverse forward."""
    with hub_and_site(outbound_only=True) as ns:
        site = Site(
            outpost_process, tmp_path, "site-ns", ip=SITE_IP, netns=ns.site,
            extra='c.Spawner.environment = {"OUTPOST_SITE": "site-ns", "JUPYTERHUB_ACTIVITY_INTERVAL": "1"}\n',
        )
        await site.start()
        await site.op.wait_log("serving jupyterhub.outpost.v1.OutpostService")
        hub = hub_factory(site.hub_config(), ip=HUB_IP, netns=ns.hub)
        hub.start()
        await hub.wait_ready()

        # the firewall holds: the site cannot connect to the hub
        probe = (
            "import socket\n"
            f"try:\n    socket.create_connection(('{HUB_IP}', {hub.hub_port}), timeout=3)\n    print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
        )
        out = subprocess.run(ns.exec_prefix(ns.site) + [str(BIN / "python"), "-c", probe],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() in ("TimeoutError", "timeout"), out.stdout + out.stderr

        driver = subprocess.run(
            ns.exec_prefix(ns.hub) + [str(BIN / "python"), "-m", "tests.harness.e2e_driver", hub.url, TOKEN, "alice"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        assert driver.returncode == 0, driver.stderr[-3000:] + hub.tail()
        result = json.loads(driver.stdout)
        messages = [e.get("message", "") for e in result["events"]]
        assert "site-ns: preparing a notebook for alice" in messages, (messages, hub.tail())
        assert result["events"][-1].get("ready"), result["events"]
        assert result["status_with_token"] == 200, (result, hub.tail())
        assert result["oauth_cookie"], result
        assert result["oauth_status"] == 200, result
        assert any(p.endswith("/oauth_callback") for p in result["oauth_path"]), result["oauth_path"]
        assert result["activity_after"] != result["activity_before"], result
        assert result["stop"] in (202, 204) and result["stopped"], result



# --- a stock OpenSSH server instead of the embedded forwarder ------------------------------


async def test_openssh_tunnel_and_drop(make_site, hub_factory, sshd_server):
    """OutpostSpawner through a site's OpenSSH (authorized_keys restrict, permitopen,
    permitlisten); the SSH connection killed from the server side is restored on the same
    local port without user action."""
    site = await make_site("site-ssh")
    rport = free_port()
    sshd = sshd_server()
    key = sshd.add_client_key(
        "hub", options=f'restrict,port-forwarding,permitopen="127.0.0.1:*",permitlisten="127.0.0.1:{rport}"'
    )
    sshd.start()
    hub = hub_factory(
        "\n".join(
            [
                f'c.OutpostSpawner.outpost_address = "{site.grpc_address}"',
                'c.OutpostSpawner.ssh_host = "127.0.0.1"',
                f"c.OutpostSpawner.ssh_port = {sshd.port}",
                f'c.OutpostSpawner.ssh_user = "{sshd.user}"',
                f'c.OutpostSpawner.ssh_key = "{key}"',
                f'c.OutpostSpawner.ssh_known_hosts = "{sshd.known_hosts}"',
                "c.OutpostSpawner.hub_api_forward = True",
                f"c.OutpostSpawner.hub_api_site_port = {rport}",
                "",
            ]
        )
    )
    hub.start()
    await hub.wait_ready()
    events = await hub.spawn("gail")
    assert events[-1].get("ready"), (events, hub.tail())
    r = await hub.get("/user/gail/api/status")
    assert r.status_code == 200, (r.status_code, hub.tail())
    local_port = (await hub.server_model("gail"))["state"]["local_port"]

    killed = sshd.kill_connections()
    assert killed, "no sshd connection process to kill"

    async def reachable():
        return (await hub.get("/user/gail/api/status")).status_code == 200

    await wait_for(reachable, timeout=15, interval=0.3, message=f"not restored:\n{hub.tail()}")
    assert (await hub.server_model("gail"))["state"]["local_port"] == local_port
    assert sshd.connection_pids() and not set(sshd.connection_pids()) & set(killed)
    await hub.stop_server("gail")


async def test_user_cancels_pending_spawn(make_site, hub_factory):
    """Stopping a pending spawn in the hub stops the start at the Outpost."""
    site = await make_site(
        "site-slow", extra='c.Outpost.spawner_class = "outpost_server.testing.NeverReadySpawner"\n'
    )
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()
    r = await hub.api("POST", "/users/hana")
    assert r.status_code == 201
    r = await hub.api("POST", "/users/hana/server", json={})
    assert r.status_code == 202, r.text

    async def starting():
        servers = await site.servers()
        return "hana" in servers and servers["hana"].state == pb.SERVER_STATE_STARTING

    await wait_for(starting, timeout=30, message="the start never reached the Outpost")
    r = await hub.api("DELETE", "/users/hana/server")
    assert r.status_code in (202, 204), r.text

    async def gone():
        return "hana" not in await site.servers()

    await wait_for(gone, timeout=30, message=f"the Outpost still has the start:\n{hub.tail()}")
    model = await hub.server_model("hana")
    assert not model or not model.get("ready")


async def test_remote_failure_reaches_the_user(make_site, hub_factory):
    """A Spawner that fails at the site: the spawn page shows its message."""
    site = await make_site(
        "site-fail", extra='c.Outpost.spawner_class = "outpost_server.testing.FailingSpawner"\n'
    )
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()
    events = await hub.spawn("ivan")
    assert events[-1].get("failed"), events
    assert "No GPU left for you today" in events[-1]["message"], events[-1]
    assert "Checking your quota" in [e.get("message") for e in events]
    assert "Traceback" not in events[-1]["message"]


async def test_denied_override_reason_on_spawn_page(site, hub_factory):
    """The hub asks for a config override the Outpost does not allow: the user sees why."""
    hub = hub_factory(site.hub_config() + 'c.OutpostSpawner.config_overrides = {"mem_limit": "64G"}\n')
    hub.start()
    await hub.wait_ready()
    events = await hub.spawn("jane")
    assert events[-1].get("failed"), events
    assert "does not allow your hub to override mem_limit" in events[-1]["message"], events[-1]
    assert "jane" not in await site.servers()


@pytest.mark.parametrize(
    "refused", [True, False], ids=["start-refused", "failed-at-the-site"]
)
async def test_spawn_page_opened_after_the_failure_shows_it(make_site, hub_factory, refused):
    """The spawn page's event stream opened just after a start failed shows the reason.

    JupyterHub polls a failed server before it clears the spawn, and its progress API
    answers 400 ("not starting") to anyone asking meanwhile. A hub that batches its
    polls over a long window made that gap last the whole window."""
    if refused:
        site = await make_site("site-refuse")
        config = 'c.OutpostSpawner.config_overrides = {"mem_limit": "64G"}\n'
        reason = "does not allow your hub to override mem_limit"
    else:
        site = await make_site(
            "site-fail", extra='c.Outpost.spawner_class = "outpost_server.testing.FailingSpawner"\n'
        )
        config = ""
        reason = "No GPU left for you today"
    hub = hub_factory(site.hub_config() + config + "c.OutpostSpawner.poll_batch_window = 3\n")
    events = await spawn_page_after_failure(hub, "kim")
    assert reason in events[-1]["message"], events[-1]


async def spawn_page_after_failure(hub: JupyterHubProcess, user: str) -> list[dict]:
    """Start the hub, ask for a spawn that will fail, and open its progress stream (the
    spawn page) only once the hub has logged the failure: the failed event it ends with."""
    hub.start()
    await hub.wait_ready()
    await hub.request_spawn(user)
    await wait_for(
        lambda: f"starting {user}'s server" in hub.tail(20000), interval=0.02, timeout=60,
        message=f"the start never failed:\n{hub.tail()}",
    )
    events = await hub.progress(user)
    assert events[-1].get("failed"), events
    return events


async def test_unreachable_notebook_is_stopped_and_the_user_told(site, hub_factory, tmp_path):
    """The notebook starts at the site, but the hub cannot make its tunnel (the site's SSH
    host key is not the one the hub knows): the spawn page says why, and the notebook is
    stopped at once rather than after JupyterHub's poll (a 3 s batch window here)."""
    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known_hosts = tmp_path / "stranger_known_hosts"
    known_hosts.write_text(f"[{site.ip}]:{site.ssh_port} {stranger}\n")
    config = site.hub_config().replace(str(site.known_hosts), str(known_hosts))
    hub = hub_factory(config + "c.OutpostSpawner.poll_batch_window = 3\n")
    events = await spawn_page_after_failure(hub, "lou")
    assert "host key" in events[-1]["message"].lower(), events[-1]
    assert "lou" not in await site.servers()
    # the hub's SSH connection, opened with the Start, failed for good: the start ended
    # there, before READY (the notebook, without the hub API's reverse forward, would
    # never answer the Outpost's readiness check)
    assert " started at " not in site.op.log.read_text(), site.op.log.read_text()[-3000:]


# --- a real JupyterHub with internal_ssl -----------------------------------------------------


async def test_internal_ssl_end_to_end(make_site, hub_factory):
    """internal_ssl (tests/test_internal_ssl.py) with a real hub, proxy and notebook."""
    site = await make_site("site-ssl")
    hub = hub_factory(site.hub_config(), internal_ssl=True)
    hub.start()
    await hub.wait_ready()

    events = await hub.spawn("alice")
    assert events[-1].get("ready"), (events, hub.tail())

    # through the proxy (https to the notebook, through the tunnel, verified by the
    # internal CA); the notebook checks the token with the hub over https through the
    # reverse forward
    r = await hub.get("/user/alice/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())

    remote = (await site.servers())["alice"]
    assert remote.address.scheme == "https"
    model = await hub.server_model("alice")
    assert model["url"] == "/user/alice/"
    assert model["state"]["remote_scheme"] == "https"

    # the notebook really serves TLS: plain http to its port does not get an answer
    def plain_http():
        try:
            return requests.get(f"http://127.0.0.1:{remote.address.port}/user/alice/api", timeout=5).status_code
        except requests.RequestException as e:
            return type(e).__name__

    assert await asyncio.to_thread(plain_http) in ("ConnectionError", 400), "plain http must not work"

    # certificates are not in the Outpost's database; the files it wrote exist until stop
    db = site.op.workdir / "outpost.sqlite"
    assert b"BEGIN" not in sqlite_bytes(db)
    # by default in the Outpost's working directory (its state_dir), never under /tmp
    directory = Path(*certs_location("default", "alice", remote.start_id, site.op.workdir / "internal-ssl"))
    assert directory.is_dir() and stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(directory / CERT_FILES["key_pem"][1]).st_mode) == 0o600

    await hub.stop_server("alice")
    assert "alice" not in await site.servers()
    assert not directory.exists(), "the Outpost's certificate files must go at stop"
    assert not await site.servers()
