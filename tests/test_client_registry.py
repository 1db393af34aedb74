"""What the hub holds open to each Outpost (outpost_client.registry): one client, poller
and tunnel per config, made on first use, closed together."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from outpost_client.errors import Unavailable
from outpost_client.outposts import OutpostConfig
from outpost_client.registry import REGISTRY, Registry
from outpost_client.tunnel import TunnelError

from .harness.hub import make_spawner

pytestmark = pytest.mark.rpc

HUB_API = "http://127.0.0.1:8081/hub/api"
SSH = {"ssh_host": "127.0.0.1", "ssh_port": 1}  # nothing listens there: nothing here connects


@pytest.fixture
async def registry():
    """A registry of the test's own, closed after it."""
    registry = Registry()
    yield registry
    await registry.close_all()


async def test_equal_configs_share_one_client_poller_and_tunnel(registry):
    a, b = OutpostConfig("127.0.0.1:1", **SSH), OutpostConfig("127.0.0.1:1", **SSH)
    assert a is not b
    resources = registry.get(a)
    assert registry.get(b) is resources and len(registry) == 1
    client = resources.client(5)
    assert registry.get(b).client(5) is client
    poller = resources.poller(5, 0.2)
    assert poller.client is client and registry.get(b).poller(5, 0.2) is poller
    tunnel = resources.tunnel(HUB_API)
    assert tunnel is not None and registry.get(b).tunnel(HUB_API) is tunnel
    assert not tunnel.connected  # made, not connected: that is the first forward's job

    other_hub = registry.get(OutpostConfig("127.0.0.1:1", token="another-hub", **SSH))
    assert other_hub.client(5) is not client and other_hub.poller(5, 0.2) is not poller
    assert registry.get(OutpostConfig("127.0.0.1:1")).tunnel(HUB_API) is None  # no ssh_host
    assert len(registry) == 3


async def test_the_tunnel_follows_the_config(registry):
    """What the SSH target of an Outpost's tunnel is made of, ssh_fast_path included."""
    config = OutpostConfig(
        "127.0.0.1:1", ssh_host="site", ssh_port=22, ssh_user="hub", ssh_key="/k", ssh_known_hosts="/kh",
        ssh_fast_path=False, hub_api_forward=True, hub_api_site_port=18081,
    )
    target = registry.get(config).tunnel(HUB_API).target
    assert (target.host, target.port, target.username) == ("site", 22, "hub")
    assert (target.client_keys, target.known_hosts) == (("/k",), "/kh")
    assert target.reverse_forwards == (("127.0.0.1", 18081, "127.0.0.1", 8081),)
    assert target.fast_path is False
    assert registry.get(OutpostConfig("127.0.0.1:1", ssh_host="site")).tunnel(HUB_API).target.fast_path


async def test_closing_an_outpost_closes_its_tunnel_poller_and_channel(registry):
    config = OutpostConfig("127.0.0.1:1", **SSH)
    resources = registry.get(config)
    client, poller, tunnel = resources.client(5), resources.poller(5, 60), resources.tunnel(HUB_API)
    waiting = asyncio.ensure_future(poller.status("alice"))  # its window is 60 s
    await asyncio.sleep(0)

    await registry.close(config)
    assert config not in registry
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, 5)
    assert tunnel.closed
    with pytest.raises(TunnelError, match="closed"):
        await tunnel.forward("alice", "127.0.0.1", 9)
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await client.poll("alice")

    again = registry.get(config)  # the next use makes new ones
    assert again.client(5) is not client and again.tunnel(HUB_API) is not tunnel
    await registry.close(config)
    await registry.close(config)  # closing what is not there is fine


async def test_a_tunnel_two_outposts_share_stays_open_while_one_uses_it(registry):
    """Two Outposts behind one SSH server (same user, same forwards) share one SSH
    connection; closing one of them leaves it to the other, close_all closes it."""
    gpu, cpu = OutpostConfig("127.0.0.1:1", **SSH), OutpostConfig("127.0.0.1:2", **SSH)
    tunnel = registry.get(gpu).tunnel(HUB_API)
    assert registry.get(cpu).tunnel(HUB_API) is tunnel
    assert registry.get(cpu).client(5) is not registry.get(gpu).client(5)
    await registry.close(gpu)
    assert not tunnel.closed
    await registry.close_all()
    assert tunnel.closed and len(registry) == 0


async def test_spawners_share_the_hub_registry_and_survive_a_close(start_outpost):
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawner, twin = make_spawner(op), make_spawner(op, name="other")
        assert spawner.client is twin.client  # one channel per Outpost for the hub process
        await spawner.start()
        assert await spawner.poll() is None
        first = spawner.client
        assert spawner.outpost in REGISTRY

        await REGISTRY.close(spawner.outpost)  # e.g. a reconciler
        assert await spawner.poll() is None  # through a new client and poller
        assert spawner.client is not first
        await spawner.stop()
        assert await spawner.poll() == 0
        await REGISTRY.close(spawner.outpost)
