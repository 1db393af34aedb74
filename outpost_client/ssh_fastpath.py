"""The hub's SSH receive fast path: AES-GCM channel data decrypted outside asyncssh.

What it is: for the hub's tunnel connections (:mod:`outpost_client.tunnel`), it replaces
asyncssh's receive path for ``CHANNEL_DATA`` packets of TCP channels. Their AES-GCM
ciphertext is decrypted here with cryptography's ``AESGCM`` and the data handed to
asyncssh's own channel (windows, pausing and delivery stay asyncssh's); every other
packet, and any packet that is not exactly as expected, goes to asyncssh unchanged. To
do so it wraps the connection's ``data_received`` and reaches into asyncssh internals
(see :class:`FastReceive`), which asyncssh does not promise to keep.

Why: asyncssh's generic packet handling costs the hub about 1.05 s of CPU per GB
downloaded through a tunnel; with this path about 0.6 s, on a par with ``ssh -L``
(``benchmarks/tunnel_bench.py``, docs/performance.md).

When it is on: only for the asyncssh versions it was checked against
(:data:`CHECKED_ASYNCSSH`, major.minor; a test fails when asyncssh moves past them), and
only for AES-GCM (the tunnel prefers it). With any other asyncssh, or when a required
internal is missing, it is off and asyncssh's own path does everything.

The switch: on by default. A site turns it off for the whole hub process with
``OUTPOST_TUNNEL_FAST_PATH=0`` in the hub's environment, or for one Outpost with
``c.OutpostSpawner.ssh_fast_path = False`` (``ssh_fast_path`` in an ``outposts`` entry),
which reaches its tunnel as ``SSHTarget.fast_path``. The tunnel asks :func:`install` on
every new connection; off, the connection is not touched.
"""

from __future__ import annotations

import asyncio
import os

import asyncssh

try:  # the building blocks (asyncssh internals; cryptography's AEAD)
    from asyncssh.channel import SSHTCPChannel
    from asyncssh.encryption import GCMEncryption
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # pragma: no cover - another asyncssh layout: no fast path
    GCMEncryption = None

ENV_SWITCH = "OUTPOST_TUNNEL_FAST_PATH"  # "0" turns the fast path off for the process
CHECKED_ASYNCSSH = ((2, 24), (2, 24))  # (oldest, newest) major.minor, inclusive


def asyncssh_version() -> tuple[int, int]:
    """The installed asyncssh's (major, minor); (0, 0) if it cannot be read."""
    try:
        major, minor = asyncssh.__version__.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):  # pragma: no cover
        return (0, 0)


def enabled_by_environment() -> bool:
    """False when the hub's environment has OUTPOST_TUNNEL_FAST_PATH=0."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def supported() -> bool:
    """This asyncssh is one the fast path was checked against."""
    oldest, newest = CHECKED_ASYNCSSH
    return GCMEncryption is not None and oldest <= asyncssh_version() <= newest


def install(conn: asyncssh.SSHClientConnection, *, enabled: bool = True) -> bool:
    """Put the fast path under conn's receive path if it is on; whether it did.

    On: ``enabled`` (the tunnel's ``SSHTarget.fast_path``), the environment does not
    turn it off, this asyncssh is :func:`supported` and conn has every internal the
    fast path uses. Otherwise conn is left as asyncssh made it.
    """
    if not (enabled and enabled_by_environment() and supported()):
        return False
    return FastReceive.install(conn)


_MSG_IGNORE = 2
_MSG_CHANNEL_DATA = 94
_GCM_TAG = 16


class FastReceive:
    """A faster ``data_received`` for one asyncssh client connection (AES-GCM only).

    asyncssh handles every SSH packet generically: several copies of the data, a packet
    object, logging calls, handler lookups. On a download that is most of the hub's CPU
    per byte (profiled: ``benchmarks/tunnel_bench.py``). This wrapper decrypts whole
    ``CHANNEL_DATA`` packets of TCP channels itself (one ``AESGCM`` object per key, the
    ciphertext as a memoryview) and hands the data to asyncssh's own channel
    (``_accept_data``: windows, pausing and delivery stay asyncssh's). Everything else,
    and every packet that is not exactly as expected (other types, a tag that does not
    verify, an unknown or closed channel, a window overrun, a key exchange in progress,
    compression), goes to asyncssh's ``data_received`` unchanged, from that packet on.

    It uses asyncssh internals (``_inpbuf``, ``_recv_handler``, ``_recv_encryption``,
    ``_recv_seq``, ``_channels``), hence the version range in ``CHECKED_ASYNCSSH`` and a
    test that fails when an upgrade turns it off.
    """

    REQUIRED = ("_inpbuf", "_recv_handler", "_recv_pkthdr", "_recv_encryption", "_recv_seq", "_channels",
                "_transport", "_decompressor", "_auth_complete", "_max_recv_pktlen",
                "_reset_keepalive_timer", "internal_error")

    @classmethod
    def install(cls, conn: asyncssh.SSHClientConnection) -> bool:
        """Wrap conn's data_received if conn has every internal this uses (the switch and
        the version are :func:`install`'s)."""
        if not all(hasattr(conn, name) for name in cls.REQUIRED) or conn._transport is None:
            return False
        fast = cls(conn)
        conn.data_received = fast.data_received
        # asyncio's transports look data_received up on every read; uvloop's cache it when
        # the protocol is set: setting the same protocol again makes them see the wrapper
        conn._transport.set_protocol(conn)
        return True

    def __init__(self, conn: asyncssh.SSHClientConnection):
        self._conn = conn
        self._stock = conn.data_received
        self._pkthdr = conn._recv_pkthdr
        self._enc = None
        self._aead = None
        self._loop = asyncio.get_running_loop()
        self._keepalive_reset = 0.0
        self.packets = 0  # data packets delivered by the fast path (for tests and benchmarks)
        self.keys = 0  # receive keys it has used (more than one: key exchanges happened)

    def data_received(self, data: bytes, datatype=None) -> None:
        conn = self._conn
        enc = conn._recv_encryption
        if (
            type(enc) is not GCMEncryption
            or conn._recv_handler != self._pkthdr  # mid-packet, or an async handler runs
            or conn._decompressor
            or not conn._auth_complete
            or conn._transport is None
        ):
            self._stock(data, datatype)
            return
        if conn._inpbuf:  # the start of a packet kept from the previous call
            data = conn._inpbuf + data
            conn._inpbuf = b""
        try:
            pos = self._deliver(conn, enc, data)
        except Exception:  # as asyncssh's _recv_data does
            conn.internal_error()
            return
        if pos is None:  # the connection closed meanwhile
            return
        if pos:
            # asyncssh re-arms its keepalive timer (cancel + call_later) on every read; once a
            # second is enough (a keepalive may go out up to 1 s early on an idle link)
            now = self._loop.time()
            if now - self._keepalive_reset >= 1.0:
                self._keepalive_reset = now
                conn._reset_keepalive_timer()
        rest = len(data) - pos
        if not rest:
            return
        pktlen = int.from_bytes(data[pos:pos + 4], "big") if rest >= 4 else 0
        if rest < 4 or (pktlen <= conn._max_recv_pktlen and 4 + pktlen + _GCM_TAG > rest):
            conn._inpbuf = data[pos:] if pos else data  # an incomplete packet: wait for the rest
        else:
            self._stock(data[pos:] if pos else data, datatype)  # a packet for asyncssh

    def _deliver(self, conn, enc, data: bytes) -> int | None:
        """Deliver the leading CHANNEL_DATA packets of data; the offset of the first one left."""
        if enc is not self._enc:  # new keys (first call, or after a key exchange)
            self._enc, self._aead = enc, AESGCM(enc._cipher._key)
            self.keys += 1
        cipher, aead, channels = enc._cipher, self._aead, conn._channels
        view = memoryview(data)
        n, pos = len(data), 0
        while n - pos >= 4 + _GCM_TAG:
            header = data[pos:pos + 4]
            pktlen = int.from_bytes(header, "big")
            end = pos + 4 + pktlen + _GCM_TAG
            if end > n or pktlen > conn._max_recv_pktlen:
                break
            try:
                plain = aead.decrypt(cipher._iv, view[pos + 4:end], header)
            except InvalidTag:
                break  # asyncssh reports it
            if plain[1] != _MSG_CHANNEL_DATA:
                if plain[1] == _MSG_IGNORE:  # asyncssh peers send one before every packet
                    cipher._update_iv()
                    conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
                    pos = end
                    continue
                break
            chan = channels.get(int.from_bytes(plain[2:6], "big"))
            datalen = int.from_bytes(plain[6:10], "big")
            if (
                type(chan) is not SSHTCPChannel
                or chan._recv_state != "open"
                or datalen > chan._recv_window
                or 10 + datalen != len(plain) - plain[0]  # padding length
            ):
                break
            cipher._update_iv()
            conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
            pos = end
            self.packets += 1
            chan._accept_data(plain[10:10 + datalen])
            if conn._transport is None:
                return None
        return pos
