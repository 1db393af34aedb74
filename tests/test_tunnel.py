"""The hub-side SSH tunnel manager (outpost_client.tunnel) against a real OpenSSH sshd.

Each test starts its own private sshd (the ``sshd_server`` fixture) and echo servers in this process;
"the site" and "the hub" are both this machine, reached through the tunnel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import pytest

from outpost_client import ssh_fastpath
from outpost_client import tunnel as tunnel_mod
from outpost_client.outposts import OutpostConfig
from outpost_client.tunnel import SSHTarget, Tunnel, TunnelError
from outpost_server.testing import InstantSpawner, class_state

from .harness.util import free_port, wait_for

pytestmark = pytest.mark.e2e

LOGGER = "outpost.tunnel"


# --- helpers ----------------------------------------------------------------------------


class EchoServer:
    """An asyncio TCP server on 127.0.0.1 that sends back what it reads (a "notebook")."""

    def __init__(self, tag: bytes = b""):
        self.tag = tag
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _handle(self, reader, writer):
        try:
            if self.tag:
                writer.write(self.tag)
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


async def round_trip(
    port: int, payload: bytes = b"ping", timeout: float = 5.0, tag: bytes = b"", host: str = "127.0.0.1"
) -> bytes:
    """Connect to host:port, send payload, return what came back (tag + echo)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(tag) + len(payload)), timeout)
    finally:
        writer.close()


async def echoed_whole(port: int, payload: bytes, timeout: float = 30) -> bool:
    """Send all of payload to the echo behind port, then EOF; whether all of it came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def works(port: int, payload: bytes = b"ping") -> bool:
    try:
        return await round_trip(port, payload, timeout=2) == payload
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return False


async def closed_without_answer(port: int) -> bool:
    """True if a connection to port is accepted and then closed without any data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"hello?")
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:
            data = b""
        return data == b""
    finally:
        writer.close()


def target_for(sshd, key, **kw) -> SSHTarget:
    kw.setdefault("known_hosts", str(sshd.known_hosts))
    return SSHTarget("127.0.0.1", sshd.port, sshd.user, client_keys=(str(key),), **kw)


@pytest.fixture
async def tunnels():
    """Factory: Tunnel.for_target(target); every tunnel is closed after the test."""
    made: list[Tunnel] = []

    def factory(target: SSHTarget) -> Tunnel:
        tunnel = Tunnel.for_target(target)
        made.append(tunnel)
        return tunnel

    yield factory
    for tunnel in made:
        await tunnel.close()


# --- tests --------------------------------------------------------------------------------


async def test_forward_round_trip_ports_and_close(sshd_server, tunnels):
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as one, EchoServer(tag=b"two:") as two:
        target = target_for(sshd, key)
        tunnel = tunnels(target)
        assert Tunnel.for_target(target) is tunnel  # the registry: one tunnel per target
        assert not tunnel.connected  # lazy: no connection before the first forward

        port1 = await tunnel.forward("alice", "127.0.0.1", one.port)
        assert tunnel.connected
        assert await round_trip(port1, b"hello") == b"hello"

        port2 = await tunnel.forward("bob", "127.0.0.1", two.port)
        assert port2 != port1
        assert await round_trip(port2, b"x", tag=b"two:") == b"two:x"
        assert (tunnel.local_port("alice"), tunnel.local_port("bob")) == (port1, port2)

        # idempotent per key; several TCP connections share the SSH connection at once
        assert await tunnel.forward("alice", "127.0.0.1", one.port) == port1
        results = await asyncio.gather(*(round_trip(port1, b"n%d" % i) for i in range(10)))
        assert results == [b"n%d" % i for i in range(10)]
        assert len(sshd.connection_pids()) <= 2  # one SSH connection (monitor + its child)

        # another destination for the same key replaces the forward
        moved = await tunnel.forward("alice", "127.0.0.1", two.port)
        assert await round_trip(moved, b"y", tag=b"two:") == b"two:y"

        # close_forward closes the port and the connections it accepted
        reader, writer = await asyncio.open_connection("127.0.0.1", moved)
        writer.write(b"z")
        assert await reader.readexactly(5) == b"two:z"
        await tunnel.close_forward("alice")
        assert tunnel.local_port("alice") is None
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # the open connection is closed too
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", moved)
        await tunnel.close_forward("alice")  # closing again is fine
        assert await round_trip(port2, b"still", tag=b"two:") == b"two:still"

    await tunnel.close()
    assert not tunnel.connected
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port2)
    assert Tunnel.for_target(target) is not tunnel  # a closed tunnel is replaced
    await Tunnel.for_target(target).close()


async def test_bulk_data_both_ways_with_rekeying(sshd_server, tunnels):
    """Megabytes both ways stay intact, through the receive fast path and across key
    exchanges (sshd re-keys every 1 MB here), with a slow reader (back-pressure)."""
    sshd = sshd_server(extra_config="RekeyLimit 1M\n")
    key = sshd.add_client_key("hub")
    sshd.start()
    payload = os.urandom(12 << 20)
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        port = await tunnel.forward("bulk", "127.0.0.1", echo.port)
        assert tunnel._fast_path, "the receive fast path is off: check CHECKED_ASYNCSSH for this asyncssh"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send():
            for i in range(0, len(payload), 1 << 20):
                writer.write(payload[i:i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        async def receive():
            digest, n = hashlib.sha256(), 0
            while chunk := await reader.read(1 << 18):
                digest.update(chunk)
                n += len(chunk)
                if n < (2 << 20):
                    await asyncio.sleep(0.01)  # slow at first: the channel must pause
            return n, digest.hexdigest()

        sender = asyncio.ensure_future(send())
        n, digest = await asyncio.wait_for(receive(), 60)
        await sender
        writer.close()
        assert n == len(payload)
        assert digest == hashlib.sha256(payload).hexdigest()
        assert tunnel._conn is not None
        fast = tunnel._conn.data_received.__self__
        assert fast.packets > 100  # most data packets took the fast path
        assert fast.keys > 3  # and it followed the key exchanges
    assert sshd.log.read_text().count("Accepted publickey") == 1  # no reconnect happened


async def test_bulk_data_through_an_asyncssh_server(tunnels, tmp_path):
    """An asyncssh server (like the Outpost's embedded forwarder) sends an IGNORE packet
    before every data packet: the fast path skips them, the data stays intact."""
    import asyncssh

    host_key, client_key = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    client_key.write_private_key(str(tmp_path / "client"))

    class ForwardOnly(asyncssh.SSHServer):
        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            return True

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], server_factory=ForwardOnly,
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
    )
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n"
    )
    payload = os.urandom(4 << 20)
    try:
        async with EchoServer() as echo:
            target = SSHTarget("127.0.0.1", port, "hub", client_keys=(str(tmp_path / "client"),),
                               known_hosts=str(tmp_path / "known_hosts"))
            tunnel = tunnels(target)
            local = await tunnel.forward("bulk", "127.0.0.1", echo.port)
            assert await echoed_whole(local, payload)
            assert tunnel._conn.data_received.__self__.packets > 50
    finally:
        server.close()
        await server.wait_closed()


async def test_permitopen_is_enforced(sshd_server, tunnels, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with EchoServer() as allowed, EchoServer() as other:
        sshd = sshd_server()
        key = sshd.add_client_key("hub", options=f'restrict,port-forwarding,permitopen="127.0.0.1:{allowed.port}"')
        sshd.start()
        tunnel = tunnels(target_for(sshd, key))
        good = await tunnel.forward("good", "127.0.0.1", allowed.port)
        bad = await tunnel.forward("bad", "127.0.0.1", other.port)  # the listener itself is ours

        assert await closed_without_answer(bad)
        assert await closed_without_answer(bad)
        refusals = [r for r in caplog.records if r.name == LOGGER and "refused the connection" in r.getMessage()]
        assert len(refusals) == 1, "a refused destination is logged once per key"
        assert "'bad'" in refusals[0].getMessage() and str(other.port) in refusals[0].getMessage()

        assert tunnel.connected
        assert await round_trip(good, b"fine") == b"fine"


async def test_reconnects_after_the_connection_is_killed(sshd_server, tunnels, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        port = await tunnel.forward("alice", "127.0.0.1", echo.port)
        assert await round_trip(port) == b"ping"

        killed = sshd.kill_connections()
        assert killed, "no per-connection sshd found"
        began = time.monotonic()
        # no call by the test: the same local port works again on its own
        await wait_for(lambda: works(port), timeout=10, interval=0.1, message="the forward did not come back")
        assert time.monotonic() - began < 5
        assert tunnel.local_port("alice") == port
        assert tunnel.connected
        assert set(sshd.connection_pids()).isdisjoint(killed)
        messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert any("lost" in m for m in messages) and any("re-established" in m for m in messages)


async def test_a_silent_peer_is_noticed_by_keepalives(sshd_server, tunnels, monkeypatch):
    """The server side stops answering without closing TCP (SIGSTOP): keepalives notice,
    the tunnel reconnects on its own."""
    import signal

    monkeypatch.setattr(tunnel_mod, "KEEPALIVE_INTERVAL", 0.5)
    monkeypatch.setattr(tunnel_mod, "KEEPALIVE_COUNT_MAX", 2)
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        port = await tunnel.forward("alice", "127.0.0.1", echo.port)
        assert await round_trip(port) == b"ping"
        frozen = sshd.connection_pids()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: not tunnel.connected, timeout=10, message="the silent peer was not noticed")
            await wait_for(lambda: works(port), timeout=10, interval=0.1, message="no reconnect")
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGKILL)


async def test_reconnects_after_sshd_restart_on_the_same_port(sshd_server, tunnels):
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        port = await tunnel.forward("alice", "127.0.0.1", echo.port)
        assert await round_trip(port) == b"ping"

        sshd.stop()  # the whole server: listener and connections
        await wait_for(lambda: not tunnel.connected, timeout=5, message="the drop was not noticed")
        # a connection that arrives while the SSH connection is down waits for it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"early")
        await asyncio.sleep(2)
        assert not tunnel.connected
        sshd.start()  # same port, same host key
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"early"
        writer.close()
        assert tunnel.connected and tunnel.local_port("alice") == port
        assert await round_trip(port, b"after") == b"after"


async def test_reverse_forward_reaches_the_hub(sshd_server, tunnels, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    site_port, refused_port = free_port(), free_port()
    async with EchoServer(tag=b"hub:") as hub_api, EchoServer() as notebook:
        sshd = sshd_server()
        key = sshd.add_client_key("hub", options=f'restrict,port-forwarding,permitlisten="127.0.0.1:{site_port}"')
        sshd.start()
        target = target_for(
            sshd, key,
            reverse_forwards=(
                ("127.0.0.1", site_port, "127.0.0.1", hub_api.port),
                ("127.0.0.1", refused_port, "127.0.0.1", hub_api.port),  # not permitted
            ),
        )
        tunnel = tunnels(target)
        port = await tunnel.forward("alice", "127.0.0.1", notebook.port)

        # a notebook at the site connects to 127.0.0.1:site_port and reaches the hub
        async def reaches_hub():
            try:
                return await round_trip(site_port, b"api", timeout=2, tag=b"hub:") == b"hub:api"
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                return False

        await wait_for(reaches_hub, timeout=10, interval=0.1, message="the reverse forward does not work")
        await wait_for(
            lambda: any("refused" in r.getMessage() and str(refused_port) in r.getMessage()
                        for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR),
            timeout=5, message="the refused reverse forward was not logged",
        )
        message = next(r.getMessage() for r in caplog.records if str(refused_port) in r.getMessage())
        assert "cannot reach the hub API" in message
        # the refusal does not break the tunnel or the local forwards
        assert tunnel.connected
        assert await round_trip(port, b"nb") == b"nb"

        # after a reconnect the reverse forward is requested again
        sshd.kill_connections()
        await wait_for(lambda: works(port), timeout=10, interval=0.1)
        await wait_for(reaches_hub, timeout=10, interval=0.1, message="the reverse forward did not come back")


async def test_host_key_mismatch_is_a_clear_error(sshd_server, tunnels, tmp_path):
    import asyncssh

    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(sshd.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519")))
    tunnel = tunnels(target_for(sshd, key, known_hosts=str(wrong)))
    with pytest.raises(TunnelError) as err:
        await tunnel.forward("alice", "127.0.0.1", 9)
    message = str(err.value)
    assert "host key" in message and "does not match" in message and str(wrong) in message
    assert err.value.permanent  # a start fails at once (OutpostSpawner), no retry helps
    assert not tunnel.connected
    assert tunnel.local_port("alice") is None
    assert "Connection from" in sshd.log.read_text()  # it was the host key, not the network


async def test_refused_login_is_a_clear_error(sshd_server, tunnels):
    sshd = sshd_server()
    sshd.add_client_key("hub")
    stranger = sshd.dir / "stranger"
    import asyncssh

    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    sshd.start()
    tunnel = tunnels(target_for(sshd, stranger))
    with pytest.raises(TunnelError) as err:
        await tunnel.forward("alice", "127.0.0.1", 9)
    assert "login" in str(err.value) and "refused" in str(err.value) and sshd.user in str(err.value)
    assert err.value.permanent


async def test_nothing_listening_is_a_clear_error(tunnels):
    port = free_port()
    tunnel = tunnels(SSHTarget("127.0.0.1", port, "nobody", known_hosts="/dev/null"))
    with pytest.raises(TunnelError) as err:
        await tunnel.forward("alice", "127.0.0.1", 9)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert not err.value.permanent  # the server may come (back): _connect() tries again


async def test_a_requested_local_port_is_used_exactly(sshd_server, tunnels):
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        wanted = free_port()
        assert await tunnel.forward("alice", "127.0.0.1", echo.port, local_port=wanted) == wanted
        assert await round_trip(wanted) == b"ping"
        assert await tunnel.forward("alice", "127.0.0.1", echo.port, local_port=wanted) == wanted
        assert await tunnel.forward("alice", "127.0.0.1", echo.port) == wanted

        # "after a hub restart": a new tunnel restores the recorded port
        await tunnel.close()
        restored = tunnels(target_for(sshd, key))
        assert restored is not tunnel
        assert await restored.forward("alice", "127.0.0.1", echo.port, local_port=wanted) == wanted
        assert await round_trip(wanted, b"again") == b"again"

        # a port someone else holds is a clear error
        with pytest.raises(TunnelError) as err:
            await restored.forward("bob", "127.0.0.1", echo.port, local_port=wanted)
        assert str(wanted) in str(err.value)


@pytest.mark.parametrize("known_hosts", [None, "", "missing"])
async def test_no_known_hosts_is_refused_before_connecting(sshd_server, tunnels, tmp_path, known_hosts):
    """The hub checks the Outpost's host key by default: no known_hosts (None and "" are no
    waiver), or a file that is not there, is an error saying where the key comes from, and
    nothing is sent to the SSH server."""
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    if known_hosts == "missing":
        known_hosts = str(tmp_path / "known_hosts")
    tunnel = tunnels(target_for(sshd, key, known_hosts=known_hosts))
    probes = sshd.log.read_text().count("Connection from")  # sshd.start()'s own
    with pytest.raises(TunnelError) as err:
        await tunnel.forward("alice", "127.0.0.1", 9)
    message = str(err.value)
    expected = "does not exist" if known_hosts else "no known_hosts for the SSH server"
    assert expected in message and f"127.0.0.1:{sshd.port}" in message
    assert "<host_key_file>.pub" in message and "ssh_insecure_no_host_key_check = True" in message
    assert not tunnel.connected and tunnel.local_port("alice") is None
    assert sshd.log.read_text().count("Connection from") == probes


async def test_the_explicit_waiver_connects_unchecked_and_warns_once(sshd_server, tunnels, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        target = target_for(sshd, key, known_hosts=None, insecure_no_host_key_check=True)
        tunnel = tunnels(target)
        port = await tunnel.forward("alice", "127.0.0.1", echo.port)
        assert await round_trip(port) == b"ping"
        sshd.kill_connections()
        await wait_for(lambda: works(port), timeout=10, interval=0.1)
    warnings = [r for r in caplog.records if "NOT checked" in r.getMessage()]
    assert len(warnings) == 1


@class_state("port")
class EchoAddressSpawner(InstantSpawner):
    """Starts at once and reports 127.0.0.1:<port>, where the test's echo server listens."""

    port = 0

    async def start(self):
        return ("127.0.0.1", EchoAddressSpawner.port)


async def test_outpost_options_check_the_forwarders_host_key(start_outpost, tunnels, tmp_path):
    """An Outpost's options as a hub gives them (OutpostConfig: the OutpostSpawner traits, or
    an ``outposts`` entry) against the Outpost's embedded forwarder: the key the forwarder
    writes to <host_key_file>.pub, in known_hosts, is what lets the hub in; no known_hosts
    or another key is refused; only the explicit waiver connects unchecked."""
    import asyncssh

    hub_key = asyncssh.generate_private_key("ssh-ed25519")
    hub_key.write_private_key(str(tmp_path / "hub_key"))
    host_key_file = tmp_path / "outpost_host_key"
    async with EchoServer() as echo:
        EchoAddressSpawner.port = echo.port
        traits = {
            "SSHForwarder.enabled": True,
            "SSHForwarder.port": 0,
            "SSHForwarder.host_key_file": str(host_key_file),
            "SSHForwarder.authorized_keys": {"default": [hub_key.export_public_key().decode()]},
        }
        async with start_outpost("tests.test_tunnel.EchoAddressSpawner", **traits) as op:
            if op.app.forwarder is None or op.app.forwarder.bound_port is None:
                await op.app.init_forwarder()
            await op.client.start("alice", "s1", user_name="alice", wait_until_ready=True)
            entry = {
                "address": op.address, "ssh_host": "127.0.0.1", "ssh_port": op.app.forwarder.bound_port,
                "ssh_user": "hub", "ssh_key": str(tmp_path / "hub_key"),
            }  # fmt: skip

            def tunnel_for(**options) -> Tunnel:
                config = OutpostConfig.from_dict("site", {**entry, **options})
                return tunnels(config.ssh_target("http://127.0.0.1:8081/hub/api"))

            with pytest.raises(TunnelError, match=r"no known_hosts .*<host_key_file>\.pub"):
                await tunnel_for().forward("alice", "127.0.0.1", echo.port)

            stranger = tmp_path / "stranger_known_hosts"
            stranger.write_text(
                f"[127.0.0.1]:{entry['ssh_port']} {asyncssh.generate_private_key('ssh-ed25519').export_public_key().decode()}"
            )
            with pytest.raises(TunnelError, match="does not match"):
                await tunnel_for(ssh_known_hosts=str(stranger)).forward("alice", "127.0.0.1", echo.port)

            known_hosts = tmp_path / "known_hosts"
            published = (tmp_path / "outpost_host_key.pub").read_text().strip()
            known_hosts.write_text(f"[127.0.0.1]:{entry['ssh_port']} {published}\n")
            checked = await tunnel_for(ssh_known_hosts=str(known_hosts)).forward("alice", "127.0.0.1", echo.port)
            assert await round_trip(checked) == b"ping"

            waived = tunnel_for(ssh_insecure_no_host_key_check=True)
            assert await round_trip(await waived.forward("alice", "127.0.0.1", echo.port)) == b"ping"


def test_fast_path_covers_this_asyncssh():
    """Fails when asyncssh is upgraded past the versions the receive fast path was checked
    against: re-check FastReceive against asyncssh's connection.py, then widen the range."""
    import asyncssh

    oldest, newest = ssh_fastpath.CHECKED_ASYNCSSH
    assert oldest <= ssh_fastpath.asyncssh_version() <= newest, asyncssh.__version__


@pytest.mark.parametrize("switch", ["target", "environment"])
async def test_the_fast_path_can_be_turned_off(sshd_server, tunnels, monkeypatch, switch):  # noqa: F811
    """SSHTarget.fast_path=False or OUTPOST_TUNNEL_FAST_PATH=0: asyncssh's own receive
    path carries the data (key exchanges included), the connection is not touched."""
    sshd = sshd_server(extra_config="RekeyLimit 1M\n")
    key = sshd.add_client_key("hub")
    sshd.start()
    if switch == "environment":
        monkeypatch.setenv(ssh_fastpath.ENV_SWITCH, "0")
        target = target_for(sshd, key)
    else:
        target = target_for(sshd, key, fast_path=False)
    payload = os.urandom(4 << 20)
    async with EchoServer() as echo:
        tunnel = tunnels(target)
        port = await tunnel.forward("bulk", "127.0.0.1", echo.port)
        assert not tunnel._fast_path
        assert "data_received" not in vars(tunnel._conn)  # asyncssh's own method, not wrapped
        assert await echoed_whole(port, payload)
    assert sshd.log.read_text().count("Accepted publickey") == 1  # no reconnect happened


async def test_forward_listens_where_the_proxy_can_reach_it(sshd_server, tunnels):
    """A proxy on another host (Kubernetes: its own pod) needs the tunnel on an address of
    the hub's other than 127.0.0.1: exactly that address, or every address (0.0.0.0)."""
    sshd = sshd_server()
    key = sshd.add_client_key("hub")
    sshd.start()
    async with EchoServer() as echo:
        tunnel = tunnels(target_for(sshd, key))
        port = await tunnel.forward("alice", "127.0.0.1", echo.port, listen_host="127.0.0.3")
        assert await round_trip(port, b"there", host="127.0.0.3") == b"there"
        with pytest.raises(OSError):
            await round_trip(port, host="127.0.0.1")  # only where it was asked to listen

        # another listen address replaces the forward (a changed hub config after a restart)
        anywhere = await tunnel.forward("alice", "127.0.0.1", echo.port, local_port=port, listen_host="0.0.0.0")
        assert anywhere == port
        for host in ("127.0.0.1", "127.0.0.4"):
            assert await round_trip(port, b"any", host=host) == b"any"
