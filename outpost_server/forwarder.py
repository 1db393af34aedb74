"""The embedded SSH forwarder: an asyncssh server that only forwards ports.

Hubs reach their notebooks through one SSH connection per Outpost: a local forward
(direct-tcpip channel) per notebook, and optionally a reverse forward (tcpip-forward)
so notebooks can reach the hub API. This server allows exactly that:

- public-key authentication only; the key names the hub (the SSH username is ignored);
- direct-tcpip only to an address in ``allowed_destinations(hub)``, asked when the
  channel opens (the Outpost passes ``LifecycleManager.forward_targets``);
- tcpip-forward only on a "host:port" listed for that hub in ``reverse_listen``;
- no sessions (shell, exec, subsystem, pty), no agent, X11 or UNIX-socket forwarding.

Every refusal is logged at WARNING on ``outpost.forwarder``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import asyncssh
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode, validate
from traitlets.config import Configurable

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
        addresses are accepted; by default no hub may listen anywhere.
        """,
    )

    @validate("reverse_listen")
    def _check_reverse_listen(self, proposal):
        for hub, addresses in proposal.value.items():
            for address in addresses:
                try:
                    split_host_port(address)
                except ValueError:
                    raise TraitError(
                        f"SSHForwarder.reverse_listen[{hub!r}]: {address!r} is not host:port"
                    ) from None
        return proposal.value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.host_key: asyncssh.SSHKey | None = None
        self._hub_by_key: dict[bytes, str] = {}
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._allowed: AllowedDestinations = lambda hub: set()

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

    async def start(self, allowed_destinations: AllowedDestinations) -> None:
        """Listen; ``allowed_destinations(hub)`` is asked for every direct-tcpip channel."""
        self.load_keys()
        self._allowed = allowed_destinations
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
            )
        except OSError as e:
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


class _HubConnection(asyncssh.SSHServer):
    """One SSH connection: which hub it is (from its key), and what it may do."""

    def __init__(self, forwarder: SSHForwarder):
        self.forwarder = forwarder
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.hub: str | None = None
        self.fingerprint = ""

    def _refuse(self, what: str, why: str) -> None:
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
            self._refuse(f"key {self.fingerprint} (user {username!r})", "not an authorized key of any hub")
            return False
        return True

    def auth_completed(self):
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
            self._refuse(what, "not the address of one of this hub's running servers")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"{dest_host}:{dest_port} is not a running server of hub {self.hub!r} on this Outpost",
            )
        log.debug("Hub %r forwards to %s:%d", self.hub, dest_host, dest_port)
        return True

    def server_requested(self, listen_host, listen_port):
        what = f"a reverse forward listening on {listen_host}:{listen_port}"
        if (listen_host, listen_port) not in self.forwarder.reverse_allowed(self.hub):
            self._refuse(what, f"not in c.SSHForwarder.reverse_listen[{self.hub!r}]")
            return False
        log.info("Hub %r listens on %s:%d at the site (reverse forward)", self.hub, listen_host, listen_port)
        return True

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
