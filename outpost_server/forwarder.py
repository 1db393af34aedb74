"""The embedded SSH forwarder: an asyncssh server that only forwards ports.

Hubs reach their notebooks through one SSH connection per Outpost: a local forward
(direct-tcpip channel) per notebook, and optionally a reverse forward (tcpip-forward)
so notebooks can reach the hub API. This server allows exactly that:

- public-key authentication only; the key names the hub (the SSH username is ignored);
- direct-tcpip only to an address in ``allowed_destinations(hub)``, asked when the
  channel opens (the Outpost passes ``LifecycleManager.forward_targets``);
- tcpip-forward only on a "host:port" listed for that hub in ``reverse_listen``. The
  forwarder binds every such address itself when it starts and holds it for as long as it
  runs: while the hub is connected (and has asked for the forward), connections there go
  through that hub's SSH connection; while it is away they are closed. A notebook user at
  the site can never bind the port in between and pose as the hub API;
- no sessions (shell, exec, subsystem, pty), no agent, X11 or UNIX-socket forwarding;
- per hub at most ``max_connections_per_hub`` SSH connections and ``max_channels_per_hub``
  open forwards; unauthenticated connections are dropped after ``login_timeout``, and
  silent ones after ``keepalive_interval`` x ``keepalive_count_max``.

Every refusal is logged at WARNING on ``outpost.forwarder``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import asyncssh
from traitlets import Bool, Dict, Float, Integer, List, TraitError, Unicode, validate
from traitlets.config import Configurable

from . import metrics

log = logging.getLogger("outpost.forwarder")

SESSION_REFUSED = "This SSH server only forwards ports for JupyterHub Outpost hubs; sessions are not allowed"
KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-")

AllowedDestinations = Callable[[str], set[tuple[str, int]]]


class ForwarderConfigError(ValueError):
    """The forwarder's keys cannot be used; the message is one line a person can act on."""


def split_host_port(value: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port), host lowercased like asyncssh does."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]").lower()
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host, int(port)


def _parse_key(text: str, where: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ForwarderConfigError(f"{where}: not a valid OpenSSH public key ({e})") from None


def read_authorized_keys(hub: str, entries: list[str]) -> list[asyncssh.SSHKey]:
    """One hub's keys: each entry is a public key line or the path of a file of them."""
    keys = []
    for i, entry in enumerate(entries):
        where = f"c.SSHForwarder.authorized_keys[{hub!r}][{i}]"
        entry = entry.strip()
        if entry.startswith(KEY_PREFIXES):
            keys.append(_parse_key(entry, where))
            continue
        path = Path(entry).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ForwarderConfigError(
                f"{where}: neither an OpenSSH public key nor a readable file: {entry!r} ({e})"
            ) from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith(KEY_PREFIXES):
                raise ForwarderConfigError(
                    f"{where}: {path} line {n} is not a public key"
                    " (authorized_keys options are not supported here)"
                )
            keys.append(_parse_key(line, f"{where}: {path} line {n}"))
    return keys


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """Read the host key, or generate an ed25519 key there (mode 0600) and its .pub."""
    if path.exists():
        try:
            key = asyncssh.read_private_key(path)
        except (OSError, asyncssh.KeyImportError, ValueError) as e:
            raise ForwarderConfigError(f"c.SSHForwarder.host_key_file {path}: cannot read it ({e})") from None
        if path.stat().st_mode & 0o077:
            log.warning("SSH host key %s is readable by others; chmod 600 it", path)
        return key
    key = asyncssh.generate_private_key("ssh-ed25519", comment="jupyterhub-outpost host key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    except OSError as e:
        raise ForwarderConfigError(f"c.SSHForwarder.host_key_file {path}: cannot create it ({e})") from None
    log.info("Generated SSH host key %s (%s)", path, key.get_fingerprint())
    return key


class SSHForwarder(Configurable):
    """An SSH server for hubs' tunnels: port forwards only, per-hub keys and targets."""

    enabled = Bool(
        False,
        config=True,
        help="""Run the embedded SSH forwarder.

        Hubs then open their tunnels (one SSH connection per Outpost, one local forward per
        notebook) to this server instead of a site's OpenSSH.
        """,
    )
    ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the SSH forwarder listens on.

        Hubs must reach it; unlike plaintext gRPC, any address is allowed (SSH is
        authenticated by the hubs' keys).
        """,
    )
    port = Integer(2222, min=0, max=65535, config=True, help="The port the SSH forwarder listens on (0: any free port).")
    host_key_file = Unicode(
        "outpost_ssh_host_key",
        config=True,
        help="""The SSH host key (OpenSSH private key file), relative to the working directory.

        If it does not exist, an ed25519 key is generated and written there (mode 0600),
        with its public key next to it as <file>.pub: give that to the hubs for their
        known_hosts. Keep the file: a new key makes every hub refuse the Outpost.
        """,
    )
    authorized_keys = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        config=True,
        help="""The hubs that may connect: hub name -> list of public keys.

        Each entry is an OpenSSH public key ("ssh-ed25519 AAAA... comment") or the path of
        an authorized_keys-style file of such lines (options are not supported). The key a
        hub authenticates with is its identity; the SSH username is ignored. A key may
        belong to only one hub. Checked at start: an unreadable or invalid key stops the
        Outpost with an error naming it.
        """,
    )
    reverse_listen = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        config=True,
        help="""Where each hub may listen at the site with a reverse (remote) forward.

        Hub name -> list of "host:port" (e.g. {"hub-a": ["127.0.0.1:18081"]}), so notebooks
        can reach the hub API through the hub's SSH connection. Only exactly these
        addresses are accepted; by default no hub may listen anywhere. An address belongs
        to one hub.

        The forwarder binds each of them itself when it starts (an address it cannot bind
        stops the Outpost with an error naming it) and holds it while it runs: while the
        hub is away, connections there are closed, and no one else at the site can listen
        there and pose as the hub API.
        """,
    )
    max_connections_per_hub = Integer(
        8,
        min=1,
        max=10000,
        config=True,
        help="""How many SSH connections one hub may have open at the same time.

        A hub needs one per Outpost (a few more for a moment while it reconnects); one
        beyond the limit is refused at authentication, with a WARNING naming the hub.
        """,
    )
    max_channels_per_hub = Integer(
        4096,
        min=1,
        max=1000000,
        config=True,
        help="""How many forwarded TCP connections (to notebooks, and from the site through
        reverse forwards) one hub may have open at the same time, over all its SSH
        connections. One beyond the limit is refused (a WARNING naming the hub); the
        others, and the other hubs, are not affected.
        """,
    )
    login_timeout = Float(
        30.0,
        min=0.01,
        max=3600.0,
        config=True,
        help="""Seconds a client has to authenticate after connecting; then it is
        disconnected. Short: unauthenticated connections cost the Outpost memory.""",
    )
    keepalive_interval = Float(
        30.0,
        min=0.0,
        max=3600.0,
        config=True,
        help="""Seconds of silence from a hub's connection after which the forwarder sends
        an SSH keepalive (0: never). After ``keepalive_count_max`` unanswered ones the
        connection is closed, and its forwards (and its hold on reverse forwards) with
        it.""",
    )
    keepalive_count_max = Integer(
        3,
        min=1,
        max=100,
        config=True,
        help="How many keepalives in a row may go unanswered before a hub's connection is closed.",
    )

    @validate("reverse_listen")
    def _check_reverse_listen(self, proposal):
        owners: dict[tuple[str, int], str] = {}
        for hub, addresses in proposal.value.items():
            for address in addresses:
                try:
                    key = split_host_port(address)
                except ValueError:
                    raise TraitError(
                        f"SSHForwarder.reverse_listen[{hub!r}]: {address!r} is not host:port"
                    ) from None
                other = owners.setdefault(key, hub)
                if other != hub:
                    raise TraitError(
                        f"SSHForwarder.reverse_listen: {address!r} is listed for both {other!r} and "
                        f"{hub!r}; an address may belong to one hub"
                    )
        return proposal.value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.host_key: asyncssh.SSHKey | None = None
        self._hub_by_key: dict[bytes, str] = {}
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._allowed: AllowedDestinations = lambda hub: set()
        #: hub -> its authenticated connections
        self._hub_connections: dict[str, set[_HubConnection]] = {}
        #: hub -> its open forwarded TCP connections
        self._channels: dict[str, int] = {}
        #: every reverse_listen address, bound by the forwarder itself
        self._held: dict[tuple[str, int], asyncio.AbstractServer] = {}
        #: reverse_listen address -> the hub connection whose forward it is now
        self._reverse_owner: dict[tuple[str, int], _HubConnection] = {}
        self._pipes: set[asyncio.Task] = set()

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (useful with port = 0), once started."""
        return self._acceptor.get_port() if self._acceptor else None

    def load_keys(self) -> None:
        """Read every hub's keys, then read (or create) the host key; ForwarderConfigError if unusable."""
        hub_by_key: dict[bytes, str] = {}
        for hub, entries in self.authorized_keys.items():
            for key in read_authorized_keys(hub, entries):
                other = hub_by_key.setdefault(key.public_data, hub)
                if other != hub:
                    raise ForwarderConfigError(
                        f"c.SSHForwarder.authorized_keys: key {key.get_fingerprint()} is listed for "
                        f"both {other!r} and {hub!r}; a key must identify one hub"
                    )
        if not hub_by_key:
            log.warning("SSH forwarder has no authorized keys: no hub can connect")
        self.host_key = load_host_key(Path(self.host_key_file))
        self._hub_by_key = hub_by_key

    def reverse_allowed(self, hub: str) -> set[tuple[str, int]]:
        return {split_host_port(address) for address in self.reverse_listen.get(hub, [])}

    def take_channel(self, hub: str) -> bool:
        """Count one more open forward of hub; False (counted nothing) at its limit."""
        count = self._channels.get(hub, 0)
        if count >= self.max_channels_per_hub:
            return False
        self._channels[hub] = count + 1
        return True

    def release_channel(self, hub: str) -> None:
        count = self._channels.get(hub, 0) - 1
        if count > 0:
            self._channels[hub] = count
        else:
            self._channels.pop(hub, None)

    async def _hold_reverse_addresses(self) -> None:
        """Bind every reverse_listen address (ForwarderConfigError if one cannot be)."""
        for hub, addresses in self.reverse_listen.items():
            for address in addresses:
                key = split_host_port(address)
                try:
                    self._held[key] = await asyncio.start_server(
                        functools.partial(self._reverse_client, key), key[0], key[1]
                    )
                except OSError as e:
                    raise ForwarderConfigError(
                        f"c.SSHForwarder.reverse_listen[{hub!r}]: cannot listen on {address} ({e}); "
                        "something else holds it, or it is not an address of this host"
                    ) from None
                log.info("Holding %s for the reverse forward of hub %r", address, hub)

    async def _reverse_client(self, key: tuple[str, int], reader, writer) -> None:
        """A connection to a held reverse_listen address: through its hub's SSH
        connection if the hub asked for the forward, else closed."""
        host, port = key
        peer = writer.get_extra_info("peername") or ("", 0)
        owner = self._reverse_owner.get(key)
        if owner is None or owner.conn is None:
            log.info("Closed a connection from %s:%s to %s:%d: its hub has no reverse forward there now",
                     peer[0], peer[1], host, port)  # fmt: skip
            writer.close()
            return
        hub = owner.hub
        if not self.take_channel(hub):
            log.warning(
                "SSH forwarder refused a connection from %s:%s to the reverse forward %s:%d of hub %r: "
                "it has %d forwards open (c.SSHForwarder.max_channels_per_hub)",
                peer[0], peer[1], host, port, hub, self.max_channels_per_hub,
            )  # fmt: skip
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
        try:
            try:
                ssh_reader, ssh_writer = await owner.conn.open_connection(host, port, peer[0], peer[1])
            except (asyncssh.Error, OSError) as e:
                log.info("Hub %r did not take the connection to %s:%d: %s", hub, host, port, e)
                return
            await _splice(reader, writer, ssh_reader, ssh_writer)
        finally:
            writer.close()
            self.release_channel(hub)
            if task is not None:
                self._pipes.discard(task)

    async def start(self, allowed_destinations: AllowedDestinations) -> None:
        """Listen; ``allowed_destinations(hub)`` is asked for every direct-tcpip channel."""
        self.load_keys()
        self._allowed = allowed_destinations
        try:
            await self._hold_reverse_addresses()
        except ForwarderConfigError:
            await self._release_held()
            raise
        try:
            self._acceptor = await asyncssh.listen(
                self.ip,
                self.port,
                server_factory=lambda: _HubConnection(self),
                server_host_keys=[self.host_key],
                # public keys only, nothing that needs a session
                password_auth=False,
                kbdint_auth=False,
                host_based_auth=False,
                gss_host=None,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
                login_timeout=self.login_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max,
            )
        except OSError as e:
            await self._release_held()
            raise ForwarderConfigError(
                f"SSH forwarder cannot listen on {self.ip}:{self.port} ({e})"
            ) from None

    async def stop(self) -> None:
        """Close the listener and every hub's connection (their forwards with it)."""
        if self._acceptor is not None:
            self._acceptor.close()
        for conn in list(self._connections):
            conn.close()
            await conn.wait_closed()
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
            self._acceptor = None
        await self._release_held()

    async def _release_held(self) -> None:
        held, self._held = self._held, {}
        for server in held.values():
            server.close()
        for task in list(self._pipes):
            task.cancel()
        for server in held.values():
            await server.wait_closed()


class _HubConnection(asyncssh.SSHServer):
    """One SSH connection: which hub it is (from its key), and what it may do."""

    def __init__(self, forwarder: SSHForwarder):
        self.forwarder = forwarder
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.hub: str | None = None
        self.fingerprint = ""

    def _refuse(self, what: str, why: str, reason: str = "other") -> None:
        """Log a refusal; ``reason`` is its label in outpost_ssh_refusals_total (metrics.py)."""
        if metrics.enabled:
            metrics.SSH_REFUSALS.labels(reason).inc()
        who = f"hub {self.hub!r} (key {self.fingerprint})" if self.hub else "unauthenticated client"
        log.warning("SSH forwarder refused %s from %s at %s: %s", what, who, self.peer, why)

    def connection_made(self, conn):
        self.conn = conn
        host, port = conn.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        self.forwarder._connections.add(conn)

    def connection_lost(self, exc):
        self.forwarder._connections.discard(self.conn)
        if self.hub:
            self.forwarder._hub_connections.get(self.hub, set()).discard(self)
            log.info(
                "SSH connection of hub %r from %s closed%s", self.hub, self.peer, f": {exc}" if exc else ""
            )

    # --- authentication: public key only, the key names the hub ----------------------

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def password_auth_supported(self):
        return False

    def kbdint_auth_supported(self):
        return False

    def validate_public_key(self, username, key):
        # Called for each key the client offers (with and without signature); the key of
        # the last call before auth_completed is the one that authenticated.
        self.hub = self.forwarder._hub_by_key.get(key.public_data)
        self.fingerprint = key.get_fingerprint()
        if self.hub is None:
            self._refuse(f"key {self.fingerprint} (user {username!r})", "not an authorized key of any hub", "unknown_key")
            return False
        if len(self.forwarder._hub_connections.get(self.hub, ())) >= self.forwarder.max_connections_per_hub:
            self._refuse_connection_over_cap()
            return False
        return True

    def _refuse_connection_over_cap(self) -> None:
        self._refuse(
            "another SSH connection",
            f"the hub has {self.forwarder.max_connections_per_hub} open "
            "(c.SSHForwarder.max_connections_per_hub)",
            "connection_cap",
        )

    def auth_completed(self):
        mine = self.forwarder._hub_connections.setdefault(self.hub, set())
        if len(mine) >= self.forwarder.max_connections_per_hub:
            # two connections authenticated at once: the limit holds all the same
            self._refuse_connection_over_cap()
            self.conn.close()
            return
        mine.add(self)
        if metrics.enabled:
            metrics.SSH_CONNECTIONS.labels(self.hub).inc()
        log.info("SSH connection of hub %r from %s (key %s)", self.hub, self.peer, self.fingerprint)

    # --- what a hub may do ---------------------------------------------------------------

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        # Exactly the (host, port) the manager reports, no name resolution: a hub asks for
        # the address Poll gave it. "localhost" and "127.0.0.1" are different addresses
        # here, so the check and the connection asyncssh then makes always agree.
        what = f"a forward to {dest_host}:{dest_port}"
        try:
            allowed = (dest_host, dest_port) in self.forwarder._allowed(self.hub)
        except Exception:
            log.exception("allowed_destinations(%r) failed", self.hub)
            allowed = False
        if not allowed:
            self._refuse(what, "not the address of one of this hub's running servers", "destination")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"{dest_host}:{dest_port} is not a running server of hub {self.hub!r} on this Outpost",
            )
        if not self.forwarder.take_channel(self.hub):
            limit = self.forwarder.max_channels_per_hub
            self._refuse(
                what, f"the hub has {limit} forwards open (c.SSHForwarder.max_channels_per_hub)", "channel_cap"
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"hub {self.hub!r} has {limit} forwards open on this Outpost (its limit); close some first",
            )
        if metrics.enabled:
            metrics.SSH_CHANNELS.labels(self.hub).inc()
        log.debug("Hub %r forwards to %s:%d", self.hub, dest_host, dest_port)
        return self._forward(dest_host, dest_port)

    async def _forward(self, dest_host: str, dest_port: int):
        """The session of one direct-tcpip channel: asyncssh's own forwarding, counted
        against the hub's channels until it closes."""
        hub = self.hub
        try:
            session = await self.conn.forward_connection(dest_host, dest_port)
        except BaseException:
            self.forwarder.release_channel(hub)
            raise
        lost = session.connection_lost
        released = False

        def connection_lost(exc):
            nonlocal released
            if not released:
                released = True
                self.forwarder.release_channel(hub)
            lost(exc)

        session.connection_lost = connection_lost
        return session

    def server_requested(self, listen_host, listen_port):
        what = f"a reverse forward listening on {listen_host}:{listen_port}"
        key = (listen_host, listen_port)
        if key not in self.forwarder.reverse_allowed(self.hub) or key not in self.forwarder._held:
            self._refuse(what, f"not in c.SSHForwarder.reverse_listen[{self.hub!r}]", "reverse_listen")
            return False
        previous = self.forwarder._reverse_owner.get(key)
        if previous is not None and previous is not self:
            log.info("Hub %r's newer connection from %s takes over the reverse forward %s:%d",
                     self.hub, self.peer, listen_host, listen_port)  # fmt: skip
        self.forwarder._reverse_owner[key] = self
        log.info("Hub %r listens on %s:%d at the site (reverse forward)", self.hub, listen_host, listen_port)
        return _ReverseLease(self.forwarder, key, self)

    def session_requested(self):
        self._refuse("a session (shell, exec or subsystem)", "sessions are not allowed")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, SESSION_REFUSED)

    def unix_connection_requested(self, dest_path):
        self._refuse(f"a forward to the UNIX socket {dest_path}", "only TCP forwards are allowed")
        return False

    def unix_server_requested(self, listen_path):
        self._refuse(f"a listener on the UNIX socket {listen_path}", "only TCP forwards are allowed")
        return False

    def tun_requested(self, unit):
        self._refuse("a tun device", "only TCP forwards are allowed")
        return False

    def tap_requested(self, unit):
        self._refuse("a tap device", "only TCP forwards are allowed")
        return False


class _ReverseLease:
    """What asyncssh keeps as the listener of a hub's reverse forward: the address is the
    forwarder's (held from start-up); closing the lease (cancel-tcpip-forward, the
    connection's end) only hands it back."""

    def __init__(self, forwarder: SSHForwarder, key: tuple[str, int], owner: _HubConnection):
        self.forwarder = forwarder
        self.key = key
        self.owner = owner

    def get_port(self) -> int:
        return self.key[1]

    def close(self) -> None:
        if self.forwarder._reverse_owner.get(self.key) is self.owner:
            del self.forwarder._reverse_owner[self.key]
            log.info("Hub %r no longer listens on %s:%d; the forwarder holds it", self.owner.hub, *self.key)

    async def wait_closed(self) -> None:
        return None


async def _splice(reader, writer, ssh_reader, ssh_writer) -> None:
    """Copy both ways until both sides have ended (half-closes passed on); an error on
    either side ends both."""

    async def copy(src, dst) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    tasks = [asyncio.ensure_future(copy(reader, ssh_writer)), asyncio.ensure_future(copy(ssh_reader, writer))]
    try:
        for task in asyncio.as_completed(tasks):
            try:
                await task
            except (OSError, asyncssh.Error, asyncio.IncompleteReadError):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ssh_writer.close()
