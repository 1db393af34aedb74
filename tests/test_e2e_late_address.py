"""End to end: a late address (outpost_server/late.py) with a real JupyterHub and proxy.

The site hosts ``LateAddressSpawner``: its start() returns no address once its job (a
real process) runs. The job picks a free port, reports it to the Outpost's hub API relay
with the token the Outpost gave the server, and becomes jupyterhub-singleuser on that
port. The hub reaches the notebook at the reported address through its SSH tunnel, and
the notebook checks the user's token with the hub through the relay and the hub's reverse
forward.
"""

from __future__ import annotations

import pytest

from outpost_client import pb

from .harness.outpost import BIN
from .harness.util import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def late_site(relay_port: int) -> str:
    return f"""
c.Outpost.spawner_class = "outpost_server.testing.LateAddressSpawner"
c.LateAddressSpawner.job_cmd = ["{BIN}/jupyterhub-singleuser", "--allow-root"]
c.HubAPIRelay.enabled = True
c.HubAPIRelay.ip = "127.0.0.1"
c.HubAPIRelay.port = {relay_port}
c.HubAPIRelay.late_address_networks = ["127.0.0.0/8"]
"""


async def test_late_address_hub_reaches_the_notebook(make_site, hub_factory):
    site = await make_site("site-late", extra=late_site(free_port()))
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()

    events = await hub.spawn("alice")
    assert events[-1].get("ready"), (events, hub.tail(), site.op.tail(4000))
    messages = [e.get("message", "") for e in events]
    assert "Submitted; waiting for the notebook to report its address" in messages, messages

    remote = (await site.servers())["alice"]
    assert remote.state == pb.SERVER_STATE_RUNNING and remote.address.host == "127.0.0.1"
    log = site.op.tail(20000)
    assert f"default/alice: the job reported its address 127.0.0.1:{remote.address.port}" in log, log
    model = await hub.server_model("alice")
    assert model["state"]["remote_port"] == remote.address.port

    # through the proxy and the tunnel to the reported address; the notebook checks the
    # token with the hub through the relay
    r = await hub.get("/user/alice/api/status")
    assert r.status_code == 200, (r.status_code, r.text, hub.tail())

    await hub.stop_server("alice")
    assert "alice" not in await site.servers()
