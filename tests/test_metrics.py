"""Prometheus metrics (outpost_server/metrics.py): off by default (no port opened), and
with c.Outpost.metrics_port a scrape over HTTP shows what the Outpost did: RPCs by method
and code, starts and their failures, database writes, the SSH forwarder's connections
and channels, relay requests, and servers by hub and state read at scrape time.

The counters and histograms are the process's (as JupyterHub's), and other tests' Outposts
in this process may have moved them before: each test compares two scrapes.
"""

from __future__ import annotations

import os
import socket
import uuid

import asyncssh
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from outpost_client.errors import PersistenceUnavailable, ServerNotFound
from outpost_server import metrics

from .harness.outpost import one_line, run_outpost
from .harness.util import collect, free_port, wait_for
from .test_forwarder import ECHO_SPAWNER, echo_port, forwarding_outpost, keys, ssh_connect, round_trip, traits  # noqa: F401
from .test_relay import RELAY, call

pytestmark = pytest.mark.rpc


@pytest.fixture
async def http():
    client = SimpleAsyncHTTPClient(force_instance=True)
    yield client
    client.close()


async def scrape(http, port: int) -> dict[tuple[str, frozenset], float]:
    """GET /metrics: {(sample name, its labels): value}."""
    r = await call(http, f"http://127.0.0.1:{port}/metrics")
    assert r.code == 200, r.body
    assert r.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """A sample's value (0 when absent: a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def label_values(samples: dict, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name and label in dict(labels)}


async def test_scrape_after_start_and_stop(start_outpost, http):
    port = free_port()
    async with start_outpost(metrics_port=port) as op:
        client = op.client
        before = await scrape(http, port)
        assert value(before, "outpost_servers", hub="default", state="running") == 0

        await client.start("nb", uuid.uuid4().hex, user_name="alice", wait_until_ready=True)
        await collect(client, "nb")
        running = await scrape(http, port)
        assert value(running, "outpost_servers", hub="default", state="running") == 1
        assert value(running, "outpost_servers", hub="default", state="starting") == 0
        assert moved(before, running, "outpost_rpc_duration_seconds_count", method="Start", code="OK") == 1
        assert moved(before, running, "outpost_rpc_duration_seconds_count", method="Events", code="OK") == 1
        assert moved(before, running, "outpost_server_start_duration_seconds_count", hub="default", status="success") == 1
        assert moved(before, running, "outpost_db_write_duration_seconds_count", status="ok") >= 2  # accepted, ready
        assert moved(before, running, "outpost_db_commit_duration_seconds_count") >= 1

        with pytest.raises(ServerNotFound):
            await client.poll("no-such-server")
        await client.stop("nb")
        await wait_for(lambda: ("default", "nb") not in op.manager.records, message="nb not forgotten")
        after = await scrape(http, port)
        assert value(after, "outpost_servers", hub="default", state="running") == 0
        assert moved(running, after, "outpost_rpc_duration_seconds_count", method="Stop", code="OK") == 1
        assert moved(running, after, "outpost_rpc_duration_seconds_count", method="Poll", code="NOT_FOUND") == 1
        # bounded labels: no user or server name anywhere
        text = (await call(http, f"http://127.0.0.1:{port}/metrics")).body.decode()
        assert "alice" not in text and '"nb"' not in text and "no-such-server" not in text
        # only /metrics is served there
        assert (await call(http, f"http://127.0.0.1:{port}/")).code == 404
        assert (await call(http, f"http://127.0.0.1:{port}/metrics", "POST", body=b"")).code == 405
    # stopped with the Outpost
    with pytest.raises(ConnectionRefusedError):
        await call(http, f"http://127.0.0.1:{port}/metrics")
    assert not metrics.enabled


async def test_start_failures_by_exception_class(start_outpost, http):
    port = free_port()
    async with start_outpost("outpost_server.testing.FailingSpawner", metrics_port=port) as op:
        before = await scrape(http, port)
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice")
        await collect(op.client, "nb")
        after = await scrape(http, port)
    failed = {"hub": "default", "error_class": "QuotaExceeded"}
    assert moved(before, after, "outpost_server_start_failures_total", **failed) == 1
    assert moved(before, after, "outpost_server_start_duration_seconds_count", hub="default", status="failure") == 1
    assert value(after, "outpost_servers", hub="default", state="stopped") == 1


async def test_failed_database_writes_are_counted(start_outpost, http):
    port = free_port()
    async with start_outpost(metrics_port=port) as op:
        before = await scrape(http, port)

        async def refused(conn):
            raise BrokenDatabase("refused")

        with pytest.raises(PersistenceUnavailable):
            await op.app.store.write(refused)
        after = await scrape(http, port)
    assert moved(before, after, "outpost_db_write_failures_total", error_class="BrokenDatabase") == 1
    assert moved(before, after, "outpost_db_write_duration_seconds_count", status="error") == 1


class BrokenDatabase(Exception):
    pass


async def test_forwarder_connections_and_channels(start_outpost, http, traits, keys, echo_port):  # noqa: F811
    port = free_port()
    async with forwarding_outpost(start_outpost, metrics_port=port, **traits) as op:
        forwarder = op.app.forwarder
        before = await scrape(http, port)
        assert value(before, "outpost_ssh_open_connections", hub="default") == 0
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        conn = await ssh_connect(forwarder.bound_port, keys["default"])
        try:
            reader, writer = await conn.open_connection("127.0.0.1", echo_port)
            open_now = await scrape(http, port)
            assert value(open_now, "outpost_ssh_open_connections", hub="default") == 1
            assert value(open_now, "outpost_ssh_open_channels", hub="default") == 1
            assert value(open_now, "outpost_ssh_open_connections", hub="other") == 0
            writer.close()
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", 1)  # not a server of this hub
        finally:
            conn.close()
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(forwarder.bound_port, keys["stranger"])
        after = await scrape(http, port)
    assert moved(before, after, "outpost_ssh_connections_total", hub="default") == 1
    assert moved(before, after, "outpost_ssh_channels_total", hub="default") == 2
    assert moved(before, after, "outpost_ssh_refusals_total", reason="destination") == 1
    assert moved(before, after, "outpost_ssh_refusals_total", reason="unknown_key") >= 1


async def test_relay_requests_never_label_what_a_notebook_makes_up(start_outpost, http):
    """A path naming a hub the Outpost has no server of is counted as hub="" (route
    "none"): a notebook user cannot grow the metrics with names of its own."""
    port = free_port()
    async with start_outpost("outpost_server.testing.LatePortSpawner", metrics_port=port, **RELAY) as op:
        relay_port = op.app.relay.bound_port
        before = await scrape(http, port)
        for i in range(5):
            r = await call(http, f"http://127.0.0.1:{relay_port}/hubs/made-up-{i}/servers/x/hub/api/users")
            assert r.code == 404
        after = await scrape(http, port)
        assert value(after, "outpost_relay_open_connections") >= 0
    assert moved(before, after, "outpost_relay_request_duration_seconds_count", hub="", route="none", code="404") == 5
    assert not any(h.startswith("made-up") for h in label_values(after, "outpost_relay_request_duration_seconds_count", "hub"))


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process pid listens on (its sockets in /proc/<pid>/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_metrics_off_by_default_no_port_bound(outpost_process):
    op = outpost_process("")
    op.start("--spawner-class", "outpost_server.testing.InstantSpawner")
    await op.wait_serving()
    assert listening_ports(op.proc.pid) == {op.port}
    assert "metrics" not in op.tail()


async def test_console_script_serves_metrics(outpost_process, http):
    port = free_port()
    op = outpost_process(f"c.Outpost.metrics_port = {port}\n")
    op.start("--spawner-class", "outpost_server.testing.InstantSpawner")
    await op.wait_serving()
    assert listening_ports(op.proc.pid) == {op.port, port}
    samples = await scrape(http, port)
    assert "process_resident_memory_bytes" in {name for name, _ in samples}
    assert f"Prometheus metrics at http://127.0.0.1:{port}/metrics" in op.tail()


def test_metrics_port_in_use_is_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        out = run_outpost(
            "--port", str(free_port()), "--allow-unauthenticated", "--spawner-class",
            "outpost_server.testing.InstantSpawner", f"--db-url=sqlite:///{tmp_path}/db.sqlite",
            f"--Outpost.metrics_port={port}", cwd=tmp_path,
        )  # fmt: skip
    finally:
        busy.close()
    line = one_line(out)
    assert f"metrics endpoint cannot listen on 127.0.0.1:{port}" in line and "metrics_port" in line
