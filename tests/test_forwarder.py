"""The embedded SSH forwarder: real asyncssh clients against a real in-process Outpost.

Hub "default" is the plaintext gRPC identity (c.Outpost.default_hub), so servers started
through ``op.client`` belong to it; hub "other" only has an SSH key (given as a file).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import socket
import stat
from contextlib import asynccontextmanager

import asyncssh
import pytest
from traitlets import TraitError

from outpost_client import pb
from outpost_server.forwarder import ForwarderConfigError, SSHForwarder
from outpost_server.records import EventLog, Record
from outpost_server.testing import InstantSpawner, class_state

from .harness.outpost import one_line, run_outpost
from .harness.util import captured_log, free_port, wait_for

pytestmark = pytest.mark.rpc

ECHO_SPAWNER = "tests.test_forwarder.EchoAddressSpawner"


@class_state("port")
class EchoAddressSpawner(InstantSpawner):
    """Starts at once and reports 127.0.0.1:<port>, where a test's echo server listens."""

    port = 0

    async def start(self):
        return ("127.0.0.1", EchoAddressSpawner.port)


@pytest.fixture
def keys():
    return {name: asyncssh.generate_private_key("ssh-ed25519") for name in ("default", "other", "stranger")}


@pytest.fixture
def traits(tmp_path, keys):
    """Forwarder config: "default"'s key inline, "other"'s key in an authorized_keys file."""
    other_file = tmp_path / "other_authorized_keys"
    other_file.write_text("# hub other\n\n" + keys["other"].export_public_key().decode())
    return {
        "SSHForwarder.enabled": True,
        "SSHForwarder.port": 0,
        "SSHForwarder.host_key_file": str(tmp_path / "host_key"),
        "SSHForwarder.authorized_keys": {
            "default": [keys["default"].export_public_key().decode()],
            "other": [str(other_file)],
        },
    }


@pytest.fixture
async def echo_port():
    """A TCP echo server on 127.0.0.1; also what EchoAddressSpawner reports."""

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    EchoAddressSpawner.port = port
    yield port
    server.close()
    await server.wait_closed()


@pytest.fixture
def forwarder_log():
    """Records of the "outpost.forwarder" logger, whatever its propagation."""
    with captured_log("outpost.forwarder") as records:
        yield records


def warnings(records) -> str:
    return "\n".join(r.getMessage() for r in records if r.levelno == logging.WARNING)


@asynccontextmanager
async def forwarding_outpost(start_outpost, spawner=ECHO_SPAWNER, **traits):
    async with start_outpost(spawner, **traits) as op:
        if op.app.forwarder is None or op.app.forwarder.bound_port is None:
            await op.app.init_forwarder()
        yield op


def ssh_connect(port: int, key, **kwargs):
    options = dict(username="any-user", client_keys=[key], known_hosts=None, agent_path=None, config=None)
    options.update(kwargs)
    return asyncssh.connect("127.0.0.1", port, **options)


async def round_trip(conn, host: str, port: int, payload: bytes = b"hello notebook") -> bytes:
    reader, writer = await conn.open_connection(host, port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


async def test_hub_forwards_to_its_running_server(start_outpost, traits, keys, echo_port, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        forwarder = op.app.forwarder
        assert forwarder.bound_port
        result = await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        assert (result.status.address.host, result.status.address.port) == ("127.0.0.1", echo_port)
        conn = await ssh_connect(forwarder.bound_port, keys["default"])
        assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
        assert await round_trip(conn, "127.0.0.1", echo_port, b"x" * 200_000) == b"x" * 200_000
        messages = "\n".join(r.getMessage() for r in forwarder_log)
        assert (
            "SSH connection of hub 'default' from 127.0.0.1" in messages
            and keys["default"].get_fingerprint() in messages
        )
    # stopping the Outpost closes the hub's connection
    await asyncio.wait_for(conn.wait_closed(), 10)


async def test_hub_cannot_forward_elsewhere(start_outpost, traits, keys, echo_port, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        port = op.app.forwarder.bound_port
        async with ssh_connect(port, keys["default"]) as conn:
            # another port, the Outpost's own gRPC port, and a name the manager did not report
            for host, dest in [
                ("127.0.0.1", echo_port + 1),
                ("127.0.0.1", op.port),
                ("localhost", echo_port),
            ]:
                with pytest.raises(asyncssh.ChannelOpenError, match="not a running server of hub 'default'"):
                    await conn.open_connection(host, dest)
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
        # hub "other" cannot reach hub "default"'s server
        async with ssh_connect(port, keys["other"]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_connection("127.0.0.1", echo_port)
            assert refused.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            assert "hub 'other'" in refused.value.reason
    logged = warnings(forwarder_log)
    assert (
        f"a forward to 127.0.0.1:{echo_port} from hub 'other' (key {keys['other'].get_fingerprint()})"
        in logged
    )
    assert f"a forward to localhost:{echo_port} from hub 'default'" in logged
    assert "not the address of one of this hub's running servers" in logged


async def test_stopped_server_is_refused(start_outpost, traits, keys, echo_port, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        async with ssh_connect(op.app.forwarder.bound_port, keys["default"]) as conn:
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
            await op.client.stop("nb", "s1")
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection("127.0.0.1", echo_port)
    assert f"a forward to 127.0.0.1:{echo_port} from hub 'default'" in warnings(forwarder_log)


async def test_sessions_refused(start_outpost, traits, keys, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        async with ssh_connect(op.app.forwarder.bound_port, keys["default"]) as conn:
            attempts = {
                "exec": conn.run("id"),
                "shell": conn.create_process(term_type="xterm"),
                "subsystem": conn.create_session(asyncssh.SSHClientSession, subsystem="sftp"),
            }
            for what, attempt in attempts.items():
                with pytest.raises(asyncssh.ChannelOpenError) as refused:
                    await attempt
                assert "only forwards ports" in refused.value.reason, what
                assert "sessions are not allowed" in refused.value.reason, what
    logged = warnings(forwarder_log)
    assert logged.count("refused a session (shell, exec or subsystem) from hub 'default'") == 3


async def test_unknown_key_and_passwords_refused(start_outpost, traits, keys, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        port = op.app.forwarder.bound_port
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(port, keys["stranger"])
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(port, None, password="secret", client_keys=None)
        methods = await asyncssh.get_server_auth_methods("127.0.0.1", port, username="x", config=None)
        assert methods == ["publickey"]
    assert f"refused key {keys['stranger'].get_fingerprint()}" in warnings(forwarder_log)
    assert "not an authorized key of any hub" in warnings(forwarder_log)


async def test_reverse_forward_only_where_configured(start_outpost, traits, keys, echo_port, forwarder_log):
    # echo_port plays the hub API here: the notebook side connects to the listen port
    allowed, other = free_port(), free_port()
    traits["SSHForwarder.reverse_listen"] = {"default": [f"127.0.0.1:{allowed}"]}
    async with forwarding_outpost(start_outpost, **traits) as op:
        port = op.app.forwarder.bound_port
        async with ssh_connect(port, keys["default"]) as conn:
            await conn.forward_remote_port("127.0.0.1", allowed, "127.0.0.1", echo_port)
            reader, writer = await asyncio.open_connection("127.0.0.1", allowed)  # at the site
            writer.write(b"to the hub API")
            assert await asyncio.wait_for(reader.readexactly(14), 10) == b"to the hub API"
            writer.close()
            # ChannelListenError is not an asyncssh.Error: catch it by name
            with pytest.raises(asyncssh.misc.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", other, "127.0.0.1", echo_port)
        async with ssh_connect(port, keys["other"]) as conn:
            with pytest.raises(asyncssh.misc.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", allowed, "127.0.0.1", echo_port)
    logged = warnings(forwarder_log)
    assert f"listening on 127.0.0.1:{other} from hub 'default'" in logged
    assert f"listening on 127.0.0.1:{allowed} from hub 'other'" in logged
    assert "not in c.SSHForwarder.reverse_listen['other']" in logged


async def test_host_key_persisted(start_outpost, traits, tmp_path):
    key_file = tmp_path / "host_key"
    async with forwarding_outpost(start_outpost, **traits) as op:
        first = await asyncssh.get_server_host_key("127.0.0.1", op.app.forwarder.bound_port)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    published = asyncssh.read_public_key(tmp_path / "host_key.pub")  # what hubs put in known_hosts
    assert published.public_data == first.public_data
    async with forwarding_outpost(start_outpost, **traits) as op:
        again = await asyncssh.get_server_host_key("127.0.0.1", op.app.forwarder.bound_port)
    assert again.public_data == first.public_data
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "entry, message",
    [
        ("ssh-ed25519 AAAAnot-a-key hub", "authorized_keys['default'][1]: not a valid OpenSSH public key"),
        ("/nonexistent/authorized_keys", "neither an OpenSSH public key nor a readable file"),
        ("OPTIONS", "line 1 is not a public key (authorized_keys options are not supported here)"),
        ("OTHER", "is listed for both 'default' and 'other'"),
    ],
)
async def test_misconfigured_authorized_key(start_outpost, traits, keys, tmp_path, entry, message):
    if entry == "OPTIONS":
        entry = str(tmp_path / "with_options")
        (tmp_path / "with_options").write_text("restrict " + keys["default"].export_public_key().decode())
    elif entry == "OTHER":
        entry = keys["other"].export_public_key().decode()
    traits["SSHForwarder.authorized_keys"]["default"].append(entry)
    with pytest.raises(ForwarderConfigError) as error:
        async with start_outpost(ECHO_SPAWNER, **traits):
            pass
    assert message in str(error.value) and "\n" not in str(error.value)


def test_misconfigured_key_stops_the_process_before_it_starts(tmp_path):
    (tmp_path / "outpost_config.py").write_text(
        "c.SSHForwarder.enabled = True\n"
        "c.SSHForwarder.authorized_keys = {'hub-a': ['ssh-ed25519 AAAAbroken']}\n"
    )
    out = run_outpost("--port", "0", cwd=tmp_path)
    assert "authorized_keys['hub-a'][0]: not a valid OpenSSH public key" in one_line(out), out.stderr
    assert not (tmp_path / "outpost.sqlite").exists() and not (tmp_path / "outpost_ssh_host_key").exists()


async def test_console_script_runs_and_stops_the_forwarder(outpost_process, keys):
    ssh_port = free_port()
    op = outpost_process(
        "c.Outpost.spawner_class = 'outpost_server.testing.InstantSpawner'\n"
        "c.SSHForwarder.enabled = True\n"
        f"c.SSHForwarder.port = {ssh_port}\n"
        f"c.SSHForwarder.authorized_keys = {{'default': [{keys['default'].export_public_key().decode()!r}]}}\n"
    )
    op.start()
    await op.wait_serving()
    host_key = asyncssh.read_public_key(op.workdir / "outpost_ssh_host_key.pub")  # default: in the cwd
    await wait_for(lambda: f"SSH forwarder listening on 127.0.0.1:{ssh_port}" in op.log.read_text())
    assert f"(host key fingerprint {host_key.get_fingerprint()})" in op.log.read_text()
    conn = await ssh_connect(ssh_port, keys["default"], known_hosts=([host_key], [], []))
    assert op.kill(signal.SIGTERM) == 0
    await asyncio.wait_for(conn.wait_closed(), 10)


# --- only fresh addresses owned by exactly one server ----------------------------------


def plant(op, like, hub: str, state=None, name: str = "nb") -> Record:
    """A record of ``hub`` with the address of record ``like`` (what a restored row or a
    notebook's port callback could leave), put straight into the manager's table."""
    rec = Record(
        hub=hub,
        spec=dataclasses.replace(like.spec, server_name=name),
        state=state or pb.SERVER_STATE_RUNNING,
        start_time=like.start_time,
        events=EventLog(10),
        address=dict(like.address),
    )
    op.manager.records.put(rec)
    return rec


async def test_only_fresh_addresses_are_forwarded(start_outpost, traits, keys, echo_port, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        rec = op.manager.records[("default", "nb")]
        async with ssh_connect(op.app.forwarder.bound_port, keys["default"]) as conn:
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
            # UNKNOWN (its last poll failed): its notebook may be gone, the port reused
            rec.state = pb.SERVER_STATE_UNKNOWN
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection("127.0.0.1", echo_port)
            # RUNNING, but without a Spawner: a row that could not be decrypted or restored
            rec.state, spawner, rec.spawner = pb.SERVER_STATE_RUNNING, rec.spawner, None
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection("127.0.0.1", echo_port)
            rec.spawner = spawner
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"


async def test_address_claimed_twice_is_not_forwarded(start_outpost, traits, keys, echo_port, forwarder_log):
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        rec = op.manager.records[("default", "nb")]
        port = op.app.forwarder.bound_port
        # another hub's server claims the same address: neither hub is forwarded there
        other = plant(op, rec, "other")
        for hub in ("default", "other"):
            async with ssh_connect(port, keys[hub]) as conn:
                with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                    await conn.open_connection("127.0.0.1", echo_port)
        op.manager.records.remove(other)
        # two servers of one hub: the same
        twin = plant(op, rec, "default", state=pb.SERVER_STATE_UNKNOWN, name="twin")
        async with ssh_connect(port, keys["default"]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError, match="not a running server"):
                await conn.open_connection("127.0.0.1", echo_port)
            op.manager.records.remove(twin)
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"


async def test_start_cannot_take_another_hubs_address(start_outpost, traits, keys, echo_port, caplog):
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        rec = op.manager.records[("default", "nb")]
        # hub "other"'s active server has the address the next start of "default" reports
        # (a notebook's port callback can report any port)
        await op.client.stop("nb")
        other = plant(op, rec, "other")
        with caplog.at_level(logging.WARNING, logger="outpost.manager"):
            result = await op.client.start("nb", "s2", user_name="alice", wait_until_ready=True)
        assert result.status.state == pb.SERVER_STATE_STOPPED
        assert f"reported the address 127.0.0.1:{echo_port}, which another server" in result.status.failure_message
        assert "'other'" not in result.status.failure_message  # no other hub's names for the user
        assert "which other/nb (running) already has: failing it" in caplog.text
        assert other.address == {"scheme": "http", "host": "127.0.0.1", "port": echo_port}  # kept
        # once that server is gone, the address is free again
        op.manager.records.remove(other)
        result = await op.client.start("nb", "s3", user_name="alice", wait_until_ready=True)
        assert result.status.state == pb.SERVER_STATE_RUNNING


# --- reverse forwards: the forwarder holds the address ---------------------------------


async def test_reverse_listen_port_cannot_be_squatted(start_outpost, traits, keys, echo_port, forwarder_log):
    """While the hub is away, a notebook user at the site cannot listen on the hub's
    reverse_listen port (and pose as the hub API): the forwarder holds it from start-up."""
    listen = free_port()
    traits["SSHForwarder.reverse_listen"] = {"default": [f"127.0.0.1:{listen}"]}

    def squat() -> None:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", listen))
            s.listen()

    async def through_listen() -> bytes:
        """What comes back through the listen port (b"": closed, or reset, at once)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        try:
            writer.write(b"to the hub API")
            return await asyncio.wait_for(reader.readexactly(14), 10)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return b""
        finally:
            writer.close()

    async def held_and_closed():
        with pytest.raises(OSError) as squatted:
            squat()
        assert squatted.value.errno == errno.EADDRINUSE
        assert await through_listen() == b""

    async def reaches_the_hub(port):
        async with ssh_connect(port, keys["default"]) as conn:
            await conn.forward_remote_port("127.0.0.1", listen, "127.0.0.1", echo_port)
            assert await through_listen() == b"to the hub API"

    async with forwarding_outpost(start_outpost, **traits) as op:
        port = op.app.forwarder.bound_port
        await held_and_closed()  # no hub connected yet: held, a connection there is closed
        await reaches_the_hub(port)
        # the hub disconnected: still held
        await wait_for(lambda: not op.app.forwarder._reverse_owner)
        await held_and_closed()
        await reaches_the_hub(port)  # the hub reconnects: a request reaches its side again
    # the Outpost stopped: the port is free
    squat()


def test_reverse_listen_address_belongs_to_one_hub():
    with pytest.raises(TraitError, match="is listed for both 'a' and 'b'; an address may belong to one hub"):
        SSHForwarder(reverse_listen={"a": ["127.0.0.1:18081"], "b": ["127.0.0.1:18081"]})


async def test_reverse_listen_address_in_use_stops_the_outpost(start_outpost, traits):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        traits["SSHForwarder.reverse_listen"] = {"default": [f"127.0.0.1:{taken}"]}
        with pytest.raises(ForwarderConfigError) as error:
            async with forwarding_outpost(start_outpost, **traits):
                pass
    assert f"reverse_listen['default']: cannot listen on 127.0.0.1:{taken}" in str(error.value)


# --- caps and timeouts -----------------------------------------------------------------


async def test_unauthenticated_connection_dropped_after_login_timeout(start_outpost, traits):
    traits["SSHForwarder.login_timeout"] = 0.5
    async with forwarding_outpost(start_outpost, **traits) as op:
        reader, writer = await asyncio.open_connection("127.0.0.1", op.app.forwarder.bound_port)
        try:
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
            # says nothing more: the forwarder hangs up (the guard only keeps a broken
            # forwarder from hanging the test)
            assert await asyncio.wait_for(reader.read(), 30) == b""
        finally:
            writer.close()


async def test_connections_over_the_hub_cap_refused(start_outpost, traits, keys, echo_port, forwarder_log):
    traits["SSHForwarder.max_connections_per_hub"] = 1
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        port = op.app.forwarder.bound_port
        first = await ssh_connect(port, keys["default"])
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(port, keys["default"])
        # another hub is not affected
        async with ssh_connect(port, keys["other"]):
            pass
        assert await round_trip(first, "127.0.0.1", echo_port) == b"hello notebook"
        first.close()
        await first.wait_closed()
        await wait_for(lambda: not op.app.forwarder._hub_connections.get("default"))
        async with ssh_connect(port, keys["default"]) as again:
            assert await round_trip(again, "127.0.0.1", echo_port) == b"hello notebook"
    assert "refused another SSH connection from hub 'default'" in warnings(forwarder_log)
    assert "c.SSHForwarder.max_connections_per_hub" in warnings(forwarder_log)


async def test_forwards_over_the_hub_cap_refused(start_outpost, traits, keys, echo_port, forwarder_log):
    traits["SSHForwarder.max_channels_per_hub"] = 2
    async with forwarding_outpost(start_outpost, **traits) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        async with ssh_connect(op.app.forwarder.bound_port, keys["default"]) as conn:
            open_ = [await conn.open_connection("127.0.0.1", echo_port) for _ in range(2)]
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_connection("127.0.0.1", echo_port)
            assert refused.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert "has 2 forwards open" in refused.value.reason
            for _, writer in open_:
                writer.close()
            await wait_for(lambda: not op.app.forwarder._channels.get("default"))
            assert await round_trip(conn, "127.0.0.1", echo_port) == b"hello notebook"
    assert "c.SSHForwarder.max_channels_per_hub" in warnings(forwarder_log)
