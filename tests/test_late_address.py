"""Late addresses (outpost_server/late.py): a starting server's job reports host and port
to the hub API relay's endpoint with its own token, and that address ends the start.

A real Outpost in this process with the relay and the SSH forwarder on; the jobs of
``LateAddressSpawner`` are real processes (a small HTTP server, outpost_server.testing
LATE_JOB) that report through the endpoint; the hub is a real asyncssh client with the
hub's key, forwarding to what the start ended with. Refusals are checked by the test
playing a hostile notebook user. With a real JupyterHub and jupyterhub-singleuser:
tests/test_e2e_hub.py ``test_late_address_hub_reaches_the_notebook``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import asyncssh
import pytest
from traitlets import TraitError

from outpost_client import OutpostClient, pb
from outpost_server import late
from outpost_server.identity import hash_token
from outpost_server.relay import HubAPIRelay

from .harness.util import wait_for
from .test_forwarder import forwarding_outpost, keys, ssh_connect, traits  # noqa: F401
from .test_relay import HUB_A_TOKEN, HUB_B_TOKEN, call, http, notebook_env, upstream  # noqa: F401

pytestmark = pytest.mark.rpc

SPAWNER = "outpost_server.testing.LateAddressSpawner"
LATE_PORT = "outpost_server.testing.LatePortSpawner"
LOOPBACK = {
    "HubAPIRelay.enabled": True,
    "HubAPIRelay.port": 0,
    "HubAPIRelay.late_address_networks": ["127.0.0.0/8"],
}


async def start(client: OutpostClient, op, name: str, env: dict, hub: str = "default"):
    """Start ``name`` (not waiting); its record, once its Spawner exists."""
    await client.start(name, uuid.uuid4().hex, user_name=name, env=env)
    rec = op.manager.records[(hub, name)]
    await wait_for(lambda: rec.spawner is not None, message="no Spawner")
    return rec


async def follow(client: OutpostClient, name: str) -> list[pb.Event]:
    async def events():
        return [event async for event in client.events(name)]

    return await asyncio.wait_for(events(), 30)


async def http_get_through(conn, host: str, port: int) -> bytes:
    """GET / at host:port through the hub's SSH connection (a local forward)."""
    reader, writer = await conn.open_connection(host, port)
    try:
        writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


# --- the start ends at the address the job reports --------------------------------------------


async def test_late_address_start_returns_none_job_reports(start_outpost, traits, keys, upstream, caplog):  # noqa: F811
    """start() returns None (a submit); the job, a real process, reports its address with
    its own token; the start ends READY there and the hub forwards to it (only that hub)."""
    caplog.set_level(logging.INFO)
    async with forwarding_outpost(start_outpost, SPAWNER, **traits, **LOOPBACK) as op:
        env = notebook_env(upstream, "alice")
        rec = await start(op.client, op, "alice", env)
        events = await follow(op.client, "alice")
        assert events[-1].kind == pb.EVENT_KIND_READY, [e.message for e in events]
        assert "Submitted; waiting for the notebook to report its address" in [e.message for e in events]
        address = events[-1].address
        assert address.host == "127.0.0.1" and address.port >= 1024
        status = await op.client.poll("alice")
        assert (status.state, status.address.port) == (pb.SERVER_STATE_RUNNING, address.port)
        assert f"default/alice: the job reported its address 127.0.0.1:{address.port}" in caplog.text
        assert env["JUPYTERHUB_API_TOKEN"] not in caplog.text

        # the hub reaches the job through the SSH forwarder; another hub does not
        port = op.app.forwarder.bound_port
        async with ssh_connect(port, keys["default"]) as conn:
            answer = await http_get_through(conn, "127.0.0.1", address.port)
            assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"late job of alice"), answer
        async with ssh_connect(port, keys["other"]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection("127.0.0.1", address.port)

        proc = rec.spawner.proc
        await op.client.stop("alice")
        assert proc.returncode is not None, "Stop ends the job"
    assert not upstream.seen, "the report is answered at the site, never passed on to the hub"


async def test_late_address_start_waiting_for_port_returns(start_outpost, upstream):  # noqa: F811
    """start() waits for self.port (batchspawner's way): the report sets ip and port, so
    start() returns them. The job leaves host out: the address it reported from."""
    async with start_outpost(
        SPAWNER,
        **LOOPBACK,
        **{"LateAddressSpawner.mode": "wait", "Spawner.environment": {"LATE_JOB_HOST": ""}},
    ) as op:
        rec = await start(op.client, op, "bea", notebook_env(upstream, "bea"))
        events = await follow(op.client, "bea")
        assert events[-1].kind == pb.EVENT_KIND_READY, [e.message for e in events]
        assert events[-1].address.host == "127.0.0.1"
        assert "Submitted; waiting" not in " ".join(e.message for e in events)
        assert rec.spawner.port == events[-1].address.port
        await op.client.stop("bea")


async def test_late_address_start_that_hangs_is_cancelled_after_the_grace(start_outpost, upstream):  # noqa: F811
    async with start_outpost(
        SPAWNER, **LOOPBACK, **{"LateAddressSpawner.mode": "hang", "HubAPIRelay.late_address_grace": 0.2}
    ) as op:
        rec = await start(op.client, op, "cid", notebook_env(upstream, "cid"))
        events = await follow(op.client, "cid")
        assert events[-1].kind == pb.EVENT_KIND_READY, [e.message for e in events]
        assert events[-1].address.host == "127.0.0.1" and events[-1].address.port >= 1024
        assert (await op.client.poll("cid")).state == pb.SERVER_STATE_RUNNING  # poll() works after the cancel
        proc = rec.spawner.proc
        await op.client.stop("cid")
        assert proc.returncode is not None


async def test_late_address_not_forwarded_before_ready(start_outpost, traits, keys, upstream):  # noqa: F811
    """A reported address is forwarded to only once the start has ended READY with it."""
    async with forwarding_outpost(
        start_outpost, SPAWNER, **traits, **LOOPBACK,
        **{"LateAddressSpawner.mode": "hang", "HubAPIRelay.late_address_grace": 600},
    ) as op:  # fmt: skip
        rec = await start(op.client, op, "dan", notebook_env(upstream, "dan"))
        run = rec.run
        await wait_for(lambda: run.late_address is not None, timeout=30, message="the job did not report")
        host, port = run.late_address
        assert rec.state == pb.SERVER_STATE_STARTING
        async with ssh_connect(op.app.forwarder.bound_port, keys["default"]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection(host, port)
        proc = rec.spawner.proc
        await op.client.stop("dan")
        assert proc.returncode is not None


async def test_late_address_job_ends_before_reporting_fails_the_start(start_outpost, upstream):  # noqa: F811
    """The job's report is refused (a host that is no address) and the job exits: the
    start fails with that, not after start_timeout."""
    async with start_outpost(
        SPAWNER, **LOOPBACK, **{"Spawner.environment": {"LATE_JOB_HOST": "no such host!"}}
    ) as op:
        await start(op.client, op, "eve", notebook_env(upstream, "eve"))
        events = await follow(op.client, "eve")
        assert events[-1].kind == pb.EVENT_KIND_FAILED
        assert (
            "The notebook's job ended (exit status 1) before it reported its address." in events[-1].message
        )


# --- what the endpoint refuses ---------------------------------------------------------------


async def test_late_address_refusals(start_outpost, upstream, http, caplog):  # noqa: F811
    """The test plays a hostile notebook user against LatePortSpawner (start() waits for its
    port): every refused report changes nothing; a good one ends the start."""
    async with start_outpost(
        LATE_PORT, **{**LOOPBACK, "HubAPIRelay.late_address_networks": ["127.0.0.0/8", "::1/128"]}
    ) as op:
        relay = op.app.relay
        rec, other = [
            await start(op.client, op, name, notebook_env(upstream, name)) for name in ("fay", "gus")
        ]
        url = rec.spawner.get_env()[late.ENV_KEY]
        assert url == f"{relay.base_url}/hubs/default/servers/fay/outpost/address"
        token = rec.spec.env["JUPYTERHUB_API_TOKEN"]
        good = {"host": "127.0.0.1", "port": 40001}

        for kwargs, status in (
            ({}, 403),  # no token
            ({"token": "not-the-token"}, 403),
            ({"token": other.spec.env["JUPYTERHUB_API_TOKEN"]}, 403),  # another server's
        ):
            r = await call(http, url, "POST", body=good, **kwargs)
            assert r.code == status, (kwargs, r.code, r.body)
        for body, status, says in (
            (b"{port: 1", 400, "not JSON"),
            ([1], 400, "JSON object"),
            ({"port": "40001"}, 400, "port must be an integer"),
            ({"port": 0}, 400, "port must be an integer"),
            ({"host": "127.0.0.1", "port": 40001, "scheme": "https"}, 400, "unknown keys scheme"),
            ({"host": "127.0.0.1/x", "port": 40001}, 400, "IP address or a host name"),
            ({"host": "10.1.2.3", "port": 40001}, 403, "outside the networks"),
            ({"host": "169.254.169.254", "port": 8080}, 403, "outside the networks"),
            ({"host": "0.0.0.0", "port": 40001}, 403, "not an address a notebook can listen at"),
            ({"host": "127.0.0.1", "port": 22}, 403, "outside the ports"),
            ({"host": "127.0.0.1", "port": op.app.bound_port}, 403, "the Outpost's own ports"),
            ({"host": "127.0.0.1", "port": relay.bound_port}, 403, "the Outpost's own ports"),
        ):
            r = await call(http, url, "POST", token=token, body=body)
            assert r.code == status and says in json.loads(r.body)["message"], (body, r.code, r.body)
        r = await call(http, url, "GET", token=token)
        assert r.code == 405
        r = await call(http, url.replace("/fay/", "/nobody/"), "POST", token=token, body=good)
        assert r.code == 404
        assert rec.state == other.state == pb.SERVER_STATE_STARTING and rec.spawner.port == 0

        # a name is resolved once; the address it stands for is stored
        r = await call(http, url, "POST", token=token, body={"host": "localhost", "port": 40001})
        assert r.code == 200, r.body
        answer = json.loads(r.body)
        assert answer["host"] in ("127.0.0.1", "::1") and answer["port"] == 40001
        ready = (await follow(op.client, "fay"))[-1]
        assert (ready.kind, ready.address.host, ready.address.port) == (
            pb.EVENT_KIND_READY,
            answer["host"],
            40001,
        )
        r = await call(http, url, "POST", token=token, body={"host": "127.0.0.1", "port": 40002})
        assert r.code == 409 and "not starting" in json.loads(r.body)["message"]
        assert (await op.client.poll("fay")).address.port == 40001

        # another server cannot take fay's address
        other_url = other.spawner.get_env()[late.ENV_KEY]
        r = await call(http, other_url, "POST", token=other.spec.env["JUPYTERHUB_API_TOKEN"],
                       body={"host": answer["host"], "port": 40001})  # fmt: skip
        assert r.code == 409 and "another server" in json.loads(r.body)["message"]
        assert other.state == pb.SERVER_STATE_STARTING
        await op.client.stop("gus")
        await op.client.stop("fay")
    assert token not in caplog.text and "not-the-token" not in caplog.text
    assert not upstream.seen


async def test_late_address_another_hubs_token_refused(start_outpost, upstream, http):  # noqa: F811
    """Two hubs with a server of the same name: only each server's own token reports."""
    tokens = {"hub-a": hash_token(HUB_A_TOKEN), "hub-b": hash_token(HUB_B_TOKEN)}
    async with start_outpost(LATE_PORT, hub_tokens=tokens, **LOOPBACK) as op:
        async with (
            OutpostClient(op.address, token=HUB_A_TOKEN) as a,
            OutpostClient(op.address, token=HUB_B_TOKEN) as b,
        ):
            rec_a = await start(a, op, "hal", notebook_env(upstream, "hal"), hub="hub-a")
            rec_b = await start(b, op, "hal", notebook_env(upstream, "hal"), hub="hub-b")
            url_a = rec_a.spawner.get_env()[late.ENV_KEY]
            assert "/hubs/hub-a/servers/hal/" in url_a
            r = await call(http, url_a, "POST", token=rec_b.spec.env["JUPYTERHUB_API_TOKEN"],
                           body={"host": "127.0.0.1", "port": 40010})  # fmt: skip
            assert r.code == 403
            assert rec_a.state == pb.SERVER_STATE_STARTING and rec_a.spawner.port == 0
            await a.stop("hal")
            await b.stop("hal")


async def test_late_address_refused_by_default(start_outpost, upstream, http):  # noqa: F811
    """No c.HubAPIRelay.late_address_networks: no env key, and every report is refused."""
    async with start_outpost(LATE_PORT, **{"HubAPIRelay.enabled": True, "HubAPIRelay.port": 0}) as op:
        rec = await start(op.client, op, "ida", notebook_env(upstream, "ida"))
        assert late.ENV_KEY not in rec.spawner.get_env()
        url = f"{op.app.relay.base_url}/hubs/default/servers/ida{late.ADDRESS_PATH}"
        r = await call(http, url, "POST", token=rec.spec.env["JUPYTERHUB_API_TOKEN"],
                       body={"host": "127.0.0.1", "port": 40020})  # fmt: skip
        assert r.code == 403 and "accepts no reported addresses" in json.loads(r.body)["message"]
        assert rec.state == pb.SERVER_STATE_STARTING and rec.spawner.port == 0
        await op.client.stop("ida")


# --- the pure parts ---------------------------------------------------------------------------


def test_late_address_config_checked():
    with pytest.raises(TraitError, match="'10.0.0.0/33' is not a network"):
        HubAPIRelay(late_address_networks=["10.0.0.0/33"])
    with pytest.raises(TraitError, match="is empty"):
        HubAPIRelay(late_address_ports=(2000, 1999))
    relay = HubAPIRelay(late_address_networks=[" 10.20.0.0/16", "fd00::/8"])
    assert relay.late_address_networks == ["10.20.0.0/16", "fd00::/8"]
    assert relay.late_address_ports == (1024, 65535)


def test_late_address_checks():
    ip = late._as_ip
    nets = late.parse_networks(["10.20.0.0/16"])

    def allowed(*ips, port=8888, own=()):
        return late.check_allowed(
            [ip(i) for i in ips], port, networks=nets, ports=(1024, 65535), own_ports=set(own)
        )

    assert str(allowed("10.20.3.4")) == "10.20.3.4"
    assert str(allowed("::ffff:10.20.3.4")) == "10.20.3.4"  # a mapped v4 address is that address
    for ips, port, own in ((("10.21.0.1",), 8888, ()), (("10.20.0.1", "10.99.0.1"), 8888, ()),
                           (("10.20.0.1",), 80, ()), (("10.20.0.1",), 8888, (8888,))):  # fmt: skip
        with pytest.raises(late.ReportRefused) as e:
            allowed(*ips, port=port, own=own)
        assert e.value.status == 403
    with pytest.raises(late.ReportRefused, match="accepts no reported addresses"):
        late.check_allowed([ip("10.20.0.1")], 8888, networks=[], ports=(1, 65535), own_ports=set())
    assert late.parse_report(b'{"port": 9000}', "10.20.0.7") == late.Report("10.20.0.7", 9000)
    assert late.parse_report(b'{"host": "[fd00::1]", "port": 9000}', "x") == late.Report("fd00::1", 9000)
