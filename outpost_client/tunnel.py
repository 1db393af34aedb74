"""Hub-side SSH tunnels to Outposts: one SSH connection per Outpost, one local port per server.

The hub reaches a remote notebook through ``127.0.0.1:<local port>`` (or another address
of the hub's, ``OutpostSpawner.tunnel_listen_host``): every TCP connection
accepted there becomes one ``direct-tcpip`` channel on the Outpost's SSH connection (any
OpenSSH server, or the Outpost's embedded forwarder), and the bytes are piped both ways.

- **One connection per target.** :meth:`Tunnel.for_target` keeps a process-wide registry,
  so every spawner of the hub that talks to the same Outpost shares one SSH connection.
- **Same local port across SSH drops.** The local listeners are ours (``asyncio`` servers),
  not asyncssh's, so they stay bound when the SSH connection drops. A reconnect loop
  (back-off 0.2 s doubling to 2 s, until :meth:`Tunnel.close`) brings the connection back;
  TCP connections accepted meanwhile wait for it up to :data:`ACCEPT_WAIT` seconds. What
  was in flight when the connection dropped is closed (TCP cannot survive that).
- **Reverse forwards** (``SSHTarget.reverse_forwards``: a port at the site that reaches the
  hub API) are requested again after every reconnect, and retried in the background while
  the server refuses them (a stale connection at the site may still hold the port).
- **Host keys are checked.** A target without ``known_hosts`` (or whose file does not
  exist) is not connected to unless ``insecure_no_host_key_check`` waives the check
  explicitly; the error says where the key comes from.
- **Errors.** A missing or non-matching ``known_hosts`` or a refused login raises
  :class:`TunnelError` from the first :meth:`Tunnel.forward`, and is logged while
  reconnecting. A destination the server refuses (``permitopen``) closes that TCP
  connection and is logged once per key.
- **Throughput.** The data path is callbacks only: asyncssh channel callbacks
  (:class:`asyncssh.SSHTCPSession`) on one side, :class:`asyncio.Protocol` on the other,
  ``transport.write`` straight through and back-pressure with ``pause_reading`` /
  ``resume_reading``. AES-GCM is preferred and its channel data is decrypted by a fast
  path (:mod:`outpost_client.ssh_fastpath`, which reaches into asyncssh's internals; a
  site can turn it off) instead of asyncssh's generic packet handling: about 0.6 s of
  hub CPU per GB downloaded instead of 1.1-1.3 s, on a par with ``ssh -L``
  (``benchmarks/tunnel_bench.py``; the constants below say what was measured).

Everything is logged on the ``outpost.tunnel`` logger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import ClassVar

import asyncssh
from asyncssh.misc import ChannelListenError

from . import ssh_fastpath

log = logging.getLogger("outpost.tunnel")

LISTEN_HOST = "127.0.0.1"
CONNECT_TIMEOUT = 10.0  # seconds for one SSH connect (TCP, key exchange, login)
KEEPALIVE_INTERVAL = 5  # seconds; a peer that misses KEEPALIVE_COUNT_MAX in a row is dead
KEEPALIVE_COUNT_MAX = 3
RECONNECT_MIN = 0.2  # seconds; back-off doubles up to RECONNECT_MAX, forever until close()
RECONNECT_MAX = 2.0
ACCEPT_WAIT = 10.0  # seconds a new local TCP connection waits for the SSH connection
FORWARD_WAIT = 10.0  # seconds forward() waits for a reconnect in progress
REVERSE_RETRY_MAX = 30.0  # seconds between retries of a refused reverse forward (at most)

# Ciphers, cheapest for the hub first. Measured with benchmarks/tunnel_bench.py --cipher
# (hub CPU seconds per GB downloaded through OpenSSH's sshd, x86-64 with AES-NI): AES-GCM
# 0.63 (with the receive fast path, ssh_fastpath.py; 1.05 without), aes128-ctr + MAC 1.35,
# chacha20-poly1305 1.96 (several Python-level crypto calls per packet). asyncssh's own
# default puts chacha20 first. Every one of asyncssh's defaults stays in the list, so any
# server still finds a common cipher.
ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "chacha20-poly1305@openssh.com",
)
# Per-channel receive window (bytes in flight per TCP connection; also what one channel
# may buffer in the hub when its local reader stalls) and the largest packet we accept.
# Measured: 1, 2 and 4 MiB windows are alike, 8 MiB is slower; OpenSSH's sshd sends 32 KiB
# packets whatever we allow, and an asyncssh server (the embedded forwarder) is slower
# with 128 KiB packets than with 32 KiB. OpenSSH's own client uses the same 2 MiB / 32 KiB.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 32768
# Write buffer of the local TCP connection before the channel is paused (asyncio's
# default; 1 MiB measured no faster). Writing each packet at once beats gathering the
# packets of one read into one write (measured: 20 % more CPU).
LOCAL_WRITE_HIGH = 64 * 1024


class TunnelError(Exception):
    """A tunnel cannot be used; the message says why, for a person. ``permanent``: retrying
    cannot help until someone changes the configuration (a host key that does not match,
    a refused login), as against a server that is down or a network that dropped."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one Outpost's SSH server."""

    host: str
    port: int = 22
    username: str = "outpost"
    client_keys: tuple[str, ...] = ()  # private key file paths; () => asyncssh's defaults (~/.ssh)
    known_hosts: str | None = None  # path of the known_hosts file; required unless waived below
    # True: without known_hosts, accept any host key (a warning is logged); never implied
    insecure_no_host_key_check: bool = False
    # (site_listen_host, site_listen_port, hub_dest_host, hub_dest_port)
    reverse_forwards: tuple[tuple[str, int, str, int], ...] = ()
    fast_path: bool = True  # False: never the receive fast path (ssh_fastpath.py) on this connection

    def __str__(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


@dataclass(eq=False)
class _Forward:
    key: str
    host: str
    port: int
    listen_host: str = LISTEN_HOST
    server: asyncio.AbstractServer | None = None
    local_port: int = 0
    pipes: set[_LocalSide] = field(default_factory=set)
    refused_logged: bool = False
    carried: bool = False  # a connection went through at least once


class _Client(asyncssh.SSHClient):
    """Tells the tunnel at once when its SSH connection is gone."""

    def __init__(self, tunnel: Tunnel):
        self._tunnel = tunnel
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._tunnel._lost(self._conn, exc)


class _ChannelSide(asyncssh.SSHTCPSession):
    """The SSH channel's callbacks: data from the site goes straight to the local socket."""

    def __init__(self, local: _LocalSide):
        self._local = local
        self._write = local.transport.write  # the hot path: one call per SSH packet

    def data_received(self, data: bytes, datatype) -> None:
        self._write(data)

    def eof_received(self) -> bool:
        local = self._local
        local.remote_eof = True
        if local.transport.can_write_eof():
            local.transport.write_eof()
        if local.local_eof:  # both directions done
            local.transport.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        local = self._local
        local.chan = None
        if exc is None:
            local.transport.close()
        else:
            local.transport.abort()

    def pause_writing(self) -> None:  # the site is slower than the local client sends
        self._local.transport.pause_reading()

    def resume_writing(self) -> None:
        self._local.transport.resume_reading()


class _LocalSide(asyncio.Protocol):
    """One accepted local TCP connection: opens its channel, then pipes data to it."""

    def __init__(self, tunnel: Tunnel, fwd: _Forward):
        self.tunnel = tunnel
        self.fwd = fwd
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.chan: asyncssh.SSHTCPChannel | None = None
        self.local_eof = False
        self.remote_eof = False
        self.closed = False
        self.early: list[bytes] = []  # data that arrived before the channel was open
        self._opener: asyncio.Task | None = None
        self._opening = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=LOCAL_WRITE_HIGH)
        transport.pause_reading()  # nothing to read until the channel is open
        self.fwd.pipes.add(self)
        self._opener = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        tunnel, fwd = self.tunnel, self.fwd
        peer = self.transport.get_extra_info("peername") or ("", 0)
        deadline = time.monotonic() + ACCEPT_WAIT
        while True:
            conn = await tunnel._wait_connected(deadline - time.monotonic())
            if self.closed:
                return
            if conn is None:
                log.warning(
                    "forward %r: no SSH connection to %s within %.0f s, closing a connection to port %d",
                    fwd.key, tunnel.target, ACCEPT_WAIT, fwd.local_port,
                )
                self.transport.abort()
                return
            self._opening = True  # not cancelled from here on: asyncssh would keep a half-open channel
            try:
                chan, _ = await conn.create_connection(
                    lambda: _ChannelSide(self), fwd.host, fwd.port, peer[0], peer[1],
                    window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE,
                )
            except (asyncssh.Error, OSError) as e:
                self._opening = False
                if self.closed:
                    return
                if conn.is_closed() or conn is not tunnel._conn:
                    continue  # the connection dropped meanwhile: wait for the next one
                not_listening = (
                    isinstance(e, asyncssh.ChannelOpenError) and e.code == asyncssh.OPEN_CONNECT_FAILED
                )
                if not_listening and not fwd.carried:
                    # usual while a notebook starts: the hub checks it before it listens
                    # (a refusal by the SSH server's policy is always logged below)
                    log.debug(
                        "forward %r: %s:%d not reachable yet (%s)", fwd.key, fwd.host, fwd.port, _describe(e)
                    )
                elif not fwd.refused_logged:
                    fwd.refused_logged = True
                    log.warning(
                        "forward %r: %s refused the connection to %s:%d (%s); closing connections "
                        "to local port %d (logged once per key)",
                        fwd.key, tunnel.target, fwd.host, fwd.port, _describe(e), fwd.local_port,
                    )
                self.transport.abort()
                return
            self._opening = False
            fwd.carried = True
            if self.closed:
                chan.close()
                return
            self.chan = chan
            if self.early:
                chan.write(b"".join(self.early))
                self.early.clear()
            if self.local_eof:
                chan.write_eof()
            else:
                self.transport.resume_reading()
            return

    def data_received(self, data: bytes) -> None:
        chan = self.chan
        if chan is None:  # before the channel is open (uvloop ignores a pause in connection_made)
            if not self.closed:
                self.early.append(data)
                self.transport.pause_reading()
            return
        try:
            chan.write(data)
        except BrokenPipeError:  # the channel is closing; connection_lost follows
            self.transport.abort()

    def eof_received(self) -> bool:
        self.local_eof = True
        if self.chan is not None:
            self.chan.write_eof()
        return not self.remote_eof  # keep the socket open for the answer unless both are done

    def pause_writing(self) -> None:  # the local client reads slower than the site sends
        if self.chan is not None:
            self.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.chan is not None:
            self.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fwd.pipes.discard(self)
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self._opener is not None and not self._opener.done() and not self._opening:
            self._opener.cancel()  # it was waiting for the SSH connection

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.chan is not None:
            self.chan.close()


# where a hub gets the host key, for the errors below
HOST_KEY_HINT = (
    "put the SSH server's host key in a known_hosts file as \"[{host}]:{port} <key>\" and set "
    "ssh_known_hosts to it (the Outpost's SSH forwarder writes its key to <host_key_file>.pub, "
    "and logs its fingerprint; for a site's OpenSSH ask the site for /etc/ssh/ssh_host_*_key.pub), "
    "or set ssh_insecure_no_host_key_check = True (tests only)"
)


def host_key_problem(target: SSHTarget) -> str | None:
    """Why the tunnel must not connect to target without checking its host key, or None."""
    hint = HOST_KEY_HINT.format(host=target.host, port=target.port)
    if not target.known_hosts:
        if target.insecure_no_host_key_check:
            return None
        return f"no known_hosts for the SSH server {target.host}:{target.port}, so its host key cannot be checked: {hint}"
    if not os.path.exists(target.known_hosts):
        return f"the known_hosts file {target.known_hosts} for {target.host}:{target.port} does not exist: {hint}"
    return None


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


class Tunnel:
    """One SSH connection to one target, shared; local forwards keyed by a name."""

    _registry: ClassVar[dict[SSHTarget, Tunnel]] = {}
    _warned_unchecked: ClassVar[set[SSHTarget]] = set()

    def __init__(self, target: SSHTarget):
        self.target = target
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._close_event = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._forward_lock = asyncio.Lock()
        self._forwards: dict[str, _Forward] = {}
        self._supervisor: asyncio.Task | None = None
        self._reverse_tasks: set[asyncio.Task] = set()
        self._last_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fast_path = False

    # --- public API ------------------------------------------------------------------------

    @classmethod
    def for_target(cls, target: SSHTarget) -> Tunnel:
        """The process-wide tunnel for target (a new one once the old one was closed)."""
        tunnel = cls._registry.get(target)
        if tunnel is None or tunnel._closed or (tunnel._loop is not None and tunnel._loop.is_closed()):
            tunnel = cls._registry[target] = cls(target)
        return tunnel

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def closed(self) -> bool:
        """close() was called: the tunnel cannot be used any more."""
        return self._closed

    def local_port(self, key: str) -> int | None:
        fwd = self._forwards.get(key)
        return fwd.local_port if fwd is not None else None

    async def forward(
        self, key: str, remote_host: str, remote_port: int, local_port: int = 0, listen_host: str = LISTEN_HOST
    ) -> int:
        """The local port (on ``listen_host``, 127.0.0.1 unless the hub's proxy runs
        elsewhere) that reaches remote_host:remote_port at the site.

        Idempotent per key: the same destination returns the existing port; another
        destination (or another explicitly requested ``local_port`` or ``listen_host``)
        replaces the forward.
        ``local_port`` asks for exactly that port (restoring the port a restarted hub
        recorded). Connects on first use; raises :class:`TunnelError` when the SSH server
        cannot be reached or refuses us, or the requested port cannot be bound.
        """
        self._check_open()
        async with self._forward_lock:
            fwd = self._forwards.get(key)
            if (
                fwd is not None
                and (fwd.host, fwd.port, fwd.listen_host) == (remote_host, remote_port, listen_host)
                and local_port in (0, fwd.local_port)
            ):
                return fwd.local_port
            await self._ensure_connected()
            if fwd is not None:
                log.info(
                    "forward %r: replacing %s:%d (port %d) by %s:%d",
                    key, fwd.host, fwd.port, fwd.local_port, remote_host, remote_port,
                )
                self._drop_forward(fwd)
            fwd = _Forward(key, remote_host, remote_port, listen_host)
            loop = asyncio.get_running_loop()
            try:
                fwd.server = await loop.create_server(
                    lambda: _LocalSide(self, fwd), listen_host, local_port, reuse_address=True, backlog=128
                )
            except OSError as e:
                raise TunnelError(
                    f"cannot listen on {listen_host}:{local_port} for {key!r} ({e.strerror or e})"
                ) from None
            fwd.local_port = fwd.server.sockets[0].getsockname()[1]
            self._forwards[key] = fwd
            log.info(
                "forward %r: %s:%d -> %s:%d at %s", key, listen_host, fwd.local_port,
                remote_host, remote_port, self.target,
            )
            return fwd.local_port

    async def close_forward(self, key: str) -> None:
        """Close the local listener for key and every connection it accepted."""
        async with self._forward_lock:
            fwd = self._forwards.pop(key, None)
            if fwd is not None:
                self._drop_forward(fwd)
                log.info("forward %r: closed port %d", key, fwd.local_port)

    async def close(self) -> None:
        """Close every forward, the SSH connection and the reconnect loop."""
        if self._closed:
            return
        self._closed = True
        self._close_event.set()
        if Tunnel._registry.get(self.target) is self:
            del Tunnel._registry[self.target]
        tasks = [t for t in (self._supervisor, *self._reverse_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for fwd in list(self._forwards.values()):
            self._drop_forward(fwd)
        self._forwards.clear()
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is not None:
            conn.close()
            await conn.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("tunnel to %s closed", self.target)

    # --- connection ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TunnelError(f"the tunnel to {self.target} is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise TunnelError(f"the tunnel to {self.target} belongs to another event loop")

    async def connect(self) -> None:
        """Connect now (and open the reverse forwards), if not connected yet: before a
        notebook starts, so it reaches the hub API at the site while it starts."""
        self._check_open()
        await self._ensure_connected()

    async def _ensure_connected(self) -> asyncssh.SSHClientConnection:
        if self._conn is not None:
            return self._conn
        if self._supervisor is None:  # first connect: its errors are the caller's
            async with self._connect_lock:
                if self._conn is None and self._supervisor is None:
                    conn = await self._connect()
                    self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
                    return conn
        conn = await self._wait_connected(FORWARD_WAIT)
        if conn is None:
            self._check_open()
            raise TunnelError(
                f"no SSH connection to {self.target} (reconnecting for {FORWARD_WAIT:.0f} s; "
                f"last error: {self._last_error or 'none'})"
            )
        return conn

    async def _wait_connected(self, timeout: float) -> asyncssh.SSHClientConnection | None:
        """The current connection, waiting up to timeout for a reconnect; None if none."""
        if self._conn is not None or self._closed:
            return self._conn
        if timeout <= 0:
            return None
        waiters = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._close_event.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return self._conn

    def _connect_options(self) -> dict:
        t = self.target
        return dict(
            host=t.host,
            port=t.port,
            username=t.username,
            client_keys=list(t.client_keys) if t.client_keys else (),
            known_hosts=t.known_hosts or None,  # None only when waived (host_key_problem)
            agent_path=None,
            config=None,
            encryption_algs=list(ENCRYPTION_ALGS),
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
            connect_timeout=CONNECT_TIMEOUT,
            login_timeout=CONNECT_TIMEOUT,
            client_factory=lambda: _Client(self),
        )

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """One connection attempt; TunnelError with a message for a person if it fails."""
        t = self.target
        problem = host_key_problem(t)
        if problem:
            raise self._failed(problem, permanent=True)
        if not t.known_hosts and t not in Tunnel._warned_unchecked:
            Tunnel._warned_unchecked.add(t)
            log.warning(
                "tunnel to %s: no known_hosts (ssh_insecure_no_host_key_check), the SSH host key is NOT checked", t
            )
        try:
            conn = await asyncio.wait_for(asyncssh.connect(**self._connect_options()), CONNECT_TIMEOUT + 5)
        except asyncssh.HostKeyNotVerifiable as e:
            raise self._failed(
                f"the SSH host key of {t.host}:{t.port} does not match {t.known_hosts} ({e.reason}); "
                "refusing to connect",
                permanent=True,
            ) from None
        except asyncssh.PermissionDenied as e:
            keys = ", ".join(t.client_keys) or "the default keys"
            raise self._failed(
                f"SSH login as {t.username!r} to {t.host}:{t.port} was refused with {keys} ({e.reason})",
                permanent=True,
            ) from None
        except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
            raise self._failed(f"cannot connect to the SSH server {t.host}:{t.port}: {_describe(e)}") from None
        if self._closed:
            conn.close()
            raise TunnelError(f"the tunnel to {t} is closed")
        self._fast_path = ssh_fastpath.install(conn, enabled=t.fast_path)
        self._conn = conn
        self._connected.set()
        self._last_error = ""
        for entry in t.reverse_forwards:
            self._start_reverse(conn, entry)
        return conn

    def _failed(self, message: str, permanent: bool = False) -> TunnelError:
        self._last_error = message
        return TunnelError(message, permanent=permanent)

    def _lost(self, conn: asyncssh.SSHClientConnection, exc: Exception | None) -> None:
        """asyncssh's callback: conn is gone (the supervisor reconnects)."""
        if conn is self._conn:
            self._conn = None
            self._connected.clear()
            if not self._closed:
                log.warning(
                    "SSH connection to %s lost (%s); reconnecting, local ports stay bound",
                    self.target, _describe(exc) if exc else "closed",
                )

    async def _supervise(self) -> None:
        """Reconnect whenever the connection is gone, until close()."""
        while not self._closed:
            conn = self._conn
            if conn is not None:
                await conn.wait_closed()
                self._lost(conn, None)
                continue
            delay, attempts, began, last_logged = RECONNECT_MIN, 0, time.monotonic(), ""
            while not self._closed:
                attempts += 1
                try:
                    await self._connect()
                    break
                except TunnelError as e:
                    if self._closed:
                        break
                    if str(e) != last_logged:  # log each new reason once, not every attempt
                        last_logged = str(e)
                        log.error("reconnecting to %s: %s (retrying)", self.target, e)
                except Exception:  # never let the reconnect loop die
                    log.exception("reconnecting to %s failed unexpectedly (retrying)", self.target)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
            if self._conn is not None:
                log.warning(
                    "SSH connection to %s re-established after %.1f s (%d attempt%s)",
                    self.target, time.monotonic() - began, attempts, "s" if attempts > 1 else "",
                )

    # --- reverse forwards -----------------------------------------------------------------

    def _start_reverse(self, conn: asyncssh.SSHClientConnection, entry: tuple[str, int, str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._reverse(conn, entry))
        self._reverse_tasks.add(task)
        task.add_done_callback(self._reverse_tasks.discard)

    async def _reverse(self, conn: asyncssh.SSHClientConnection, entry: tuple[str, int, str, int]) -> None:
        """Request one reverse forward on conn; retry in the background while refused."""
        listen_host, listen_port, dest_host, dest_port = entry
        delay, failures = 1.0, 0
        while not self._closed and not conn.is_closed():
            try:
                await conn.forward_remote_port(listen_host, listen_port, dest_host, dest_port)
            except (ChannelListenError, asyncssh.Error, OSError) as e:
                failures += 1
                if conn.is_closed():
                    return
                level = logging.ERROR if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "reverse forward %s:%d (site) -> %s:%d (hub) refused by %s (%s): notebooks at the "
                    "site cannot reach the hub API through this tunnel; local forwards are unaffected; "
                    "retrying every %.0f s at most",
                    listen_host, listen_port, dest_host, dest_port, self.target, _describe(e), REVERSE_RETRY_MAX,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, REVERSE_RETRY_MAX)
                continue
            log.log(
                logging.WARNING if failures else logging.INFO,
                "reverse forward %s:%d (site) -> %s:%d (hub) at %s%s",
                listen_host, listen_port, dest_host, dest_port, self.target,
                f" after {failures} refusal(s)" if failures else "",
            )
            return

    # --- forwards --------------------------------------------------------------------------

    def _drop_forward(self, fwd: _Forward) -> None:
        if fwd.server is not None:
            fwd.server.close()
        for pipe in list(fwd.pipes):
            pipe.abort()
        fwd.pipes.clear()
