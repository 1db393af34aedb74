"""The hub API relay's bounds (outpost_server/relay.py): open connections in all, relayed
requests in flight per hub, idle and body time; and the Outpost's open-files limit.

The relay runs in the Outpost's process, next to its gRPC server: a flood of connections
to it from the cluster network must not take gRPC's file descriptors, and one hub's stuck
requests must not hold up another hub's. Stand-ins and helpers are test_relay.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import uuid

import pytest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from outpost_client import OutpostClient, pb
from outpost_server.app import raise_open_files_limit
from outpost_server.identity import hash_token

from .harness.util import wait_for
from .test_relay import (
    HUB_A_TOKEN,
    HUB_B_TOKEN,
    LATE,
    RELAY,
    call,
    notebook_env,
    routed,
    serve_upstream,
    start_server,
)

pytestmark = pytest.mark.rpc

IDLE_CONNECTIONS = 1100
MAX_CONNECTIONS = 1000  # the default of c.HubAPIRelay.max_connections


@pytest.fixture
async def upstream():
    """The hub API, as the site routes to it (test_relay.py's stand-in)."""
    async for state in serve_upstream():
        yield state


@pytest.fixture
async def http():
    client = SimpleAsyncHTTPClient(force_instance=True)
    yield client
    client.close()


async def open_idle(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` TCP connections to 127.0.0.1:port that send nothing (opened in batches:
    the listen backlog is 128, and the relay accepts while we wait)."""
    opened = []
    for start in range(0, count, 100):
        batch = [asyncio.open_connection("127.0.0.1", port) for _ in range(min(100, count - start))]
        opened.extend(await asyncio.gather(*batch))
    return opened


@pytest.fixture
def low_soft_nofile():
    """The soft RLIMIT_NOFILE at a distribution's usual 1024 (the hard limit unchanged),
    restored afterwards: what the Outpost must raise for the test below to pass."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * IDLE_CONNECTIONS:
        pytest.skip(f"the hard open-files limit ({hard}) is too low for {IDLE_CONNECTIONS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_connections_do_not_stop_grpc(start_outpost, low_soft_nofile, caplog):
    """1,100 idle connections to the relay: past the cap they are closed at accept (logged
    once), and a hub's Start and Poll over gRPC still succeed."""
    caplog.set_level(logging.INFO, logger="outpost")
    async with start_outpost(**RELAY) as op:
        # the Outpost raised its soft limit (1024 here) to the hard limit at start
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        relay = op.app.relay
        assert relay.max_connections == MAX_CONNECTIONS
        connections = await open_idle(relay.bound_port, IDLE_CONNECTIONS)
        try:
            await wait_for(
                lambda: sum(reader.at_eof() for reader, _ in connections) == IDLE_CONNECTIONS - MAX_CONNECTIONS,
                message="the connections past the cap were not closed",
            )
            assert relay.open_connections == MAX_CONNECTIONS

            await op.client.start("kim", uuid.uuid4().hex, user_name="kim", env={"JUPYTERHUB_API_TOKEN": "x"})
            status = await wait_for(
                lambda: _running(op.client, "kim"), message="the start did not complete over gRPC"
            )
            assert status.state == pb.SERVER_STATE_RUNNING
            await op.client.stop("kim")
        finally:
            for _, writer in connections:
                writer.close()
        await wait_for(lambda: relay.open_connections == 0, message="the relay kept closed connections")
    refusals = [r for r in caplog.records if "closed" in r.getMessage() and "at accept" in r.getMessage()]
    assert len(refusals) == 1, "refused connections are logged at most once a minute"


async def _running(client, name):
    status = await client.poll(name)
    return status if status.state == pb.SERVER_STATE_RUNNING else None


async def test_per_hub_cap_answers_503_while_another_hub_is_relayed(start_outpost, upstream, http):
    tokens = {"hub-a": hash_token(HUB_A_TOKEN), "hub-b": hash_token(HUB_B_TOKEN)}
    traits = routed(upstream, "hub-a", "hub-b", **{"HubAPIRelay.max_requests_per_hub": 2})
    async with start_outpost(LATE, hub_tokens=tokens, **traits) as op:
        async with (
            OutpostClient(op.address, token=HUB_A_TOKEN) as a,
            OutpostClient(op.address, token=HUB_B_TOKEN) as b,
        ):
            _, env_a = await start_server(a, op, "hub-a", "lea", notebook_env(upstream, "lea"))
            _, env_b = await start_server(b, op, "hub-b", "lea", notebook_env(upstream, "lea"))
            api_a, api_b = env_a["JUPYTERHUB_API_URL"], env_b["JUPYTERHUB_API_URL"]

            held = [asyncio.ensure_future(call(http, f"{api_a}/hold", token="t")) for _ in range(2)]
            await wait_for(lambda: sum(s.path.endswith("/hold") for s in upstream.seen) == 2)
            seen = len(upstream.seen)
            r = await call(http, f"{api_a}/user", token="t")
            assert r.code == 503
            assert r.headers["Retry-After"] == "5"
            assert "max_requests_per_hub" in json.loads(r.body)["message"]
            assert len(upstream.seen) == seen, "a request over the cap reached the hub"
            # the callback is answered at the site: not counted
            r = await call(http, f"{api_a}/batchspawner", "POST", token=env_a["JUPYTERHUB_API_TOKEN"],
                           body={"port": 4260})  # fmt: skip
            assert r.code == 200

            r = await call(http, f"{api_b}/user", token="t")  # another hub: relayed
            assert r.code == 200 and upstream.seen[-1].path == "/hub/api/user"

            upstream.release.set()
            assert [r.code for r in await asyncio.gather(*held)] == [200, 200]
            r = await call(http, f"{api_a}/user", token="t")  # below the cap again
            assert r.code == 200
            await a.stop("lea")
            await b.stop("lea")


async def test_idle_and_slow_body_connections_are_closed(start_outpost, upstream):
    traits = routed(upstream, **{"HubAPIRelay.idle_connection_timeout": 1.0, "HubAPIRelay.body_timeout": 1.0})
    async with start_outpost(LATE, **traits) as op:
        _, nb_env = await start_server(op.client, op, "default", "max", notebook_env(upstream, "max"))
        relay = op.app.relay
        path = nb_env["JUPYTERHUB_API_URL"].split(f":{relay.bound_port}", 1)[1]
        idle = await asyncio.open_connection("127.0.0.1", relay.bound_port)
        slow = await asyncio.open_connection("127.0.0.1", relay.bound_port)
        try:
            # half a request's headers, then nothing
            idle[1].write(f"GET {path}/user HTTP/1.1\r\nHost: x\r\n".encode())
            # all headers, 10 bytes of a 100-byte body, then nothing
            slow[1].write(
                f"POST {path}/users/max/activity HTTP/1.1\r\nHost: x\r\nAuthorization: token t\r\n"
                "Content-Length: 100\r\n\r\n0123456789".encode()
            )
            for reader, _ in (idle, slow):
                assert await asyncio.wait_for(reader.read(), 20) == b""  # closed, no answer
        finally:
            for _, writer in (idle, slow):
                writer.close()
        assert upstream.seen == []
        await op.client.stop("max")


def test_raise_open_files_limit(monkeypatch):
    calls = []
    limits = {"now": (1024, 524288)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: calls.append(value))
    log = logging.getLogger("test")
    assert raise_open_files_limit(log) == (1024, 524288)
    assert calls == [(524288, 524288)]
    limits["now"] = (524288, 524288)
    assert raise_open_files_limit(log) == (524288, 524288)
    limits["now"] = (1024, resource.RLIM_INFINITY)
    assert raise_open_files_limit(log) == (1024, 1 << 20)
    assert calls[-1] == (1 << 20, resource.RLIM_INFINITY)

    def refuse(which, value):
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_files_limit(log) == (1024, 1024)
