"""Late addresses: a starting server's job reports where its notebook listens.

Some jobs learn their address only when they run: a UNICORE job, a batch job on whichever
node the scheduler picked, a container whose port is mapped at run time. Such a job
reports its host and port to the Outpost's hub API relay (the same server its notebook
already talks to for the hub API):

    POST <relay>/hubs/<hub>/servers/<server_name>/outpost/address
    Authorization: token $JUPYTERHUB_API_TOKEN
    {"host": "10.1.2.3", "port": 8888}

The notebook's env carries the URL as ``OUTPOST_ADDRESS_URL`` (:data:`ENV_KEY`). The
token must be the one the Outpost gave that server; the server must still be starting;
one report per start. ``host`` may be left out: then it is the address the report came
from. A name is resolved once, at the report, and the address it resolves to is what is
stored (and what the SSH forwarder forwards to: no later DNS answer can move it).

What the site allows (``c.HubAPIRelay.late_address_networks``, ``late_address_ports``):
a notebook user writes the report, so without a limit a hostile one could name any
service the Outpost's host reaches (a database, the Outpost's own ports, a metadata
service), and the hub's tunnel would forward the hub's users to it. By default no network
is allowed: the endpoint refuses every report until the site names its notebooks'
networks. The Outpost's own listening ports are refused on any host.

How the start ends (``StartRun`` in starts.py waits for it):

- start() returns None and the Spawner's port is 0 (no address): the Outpost waits for
  the report, within the Spawner's ``start_timeout``, polling the Spawner meanwhile; a
  job that ends first fails the start;
- start() is still running when the report arrives: the report sets the Spawner's
  ``ip`` and ``port`` (a start() that waits for them, as batchspawner's does, returns),
  and start() gets ``c.HubAPIRelay.late_address_grace`` seconds to return; after them it
  is cancelled and the server is ready at the reported address all the same;
- a report always wins over what start() returns.

This module holds the pure checks; the relay (relay.py) answers the HTTP request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass

#: the endpoint, below the relay's /hubs/<hub>/servers/<server_name>
ADDRESS_PATH = "/outpost/address"
#: the notebook's env key that holds the endpoint's URL
ENV_KEY = "OUTPOST_ADDRESS_URL"
#: the keys a report may have
REPORT_KEYS = frozenset({"host", "port"})
#: the longest host name a report may carry (RFC 1035)
MAX_HOST_LENGTH = 253
#: seconds a host name of a report may take to resolve
RESOLVE_TIMEOUT = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ReportRefused(Exception):
    """A report the endpoint refuses: ``status`` is the HTTP status, the message is for
    the job's log (never a token)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Report:
    """What a job asked: the host as it was written (or the caller's address) and port."""

    host: str
    port: int


def parse_report(body: bytes, remote_ip: str) -> Report:
    """The report in a request body; ReportRefused(400) if it is malformed.

    ``{"port": N}`` alone means "the address this request came from" (``remote_ip``)."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ReportRefused(
            400, 'the body is not JSON; send {"host": "<ip or name>", "port": <1-65535>}'
        ) from None
    if not isinstance(data, dict):
        raise ReportRefused(
            400, 'the body must be a JSON object: {"host": "<ip or name>", "port": <1-65535>}'
        )
    unknown = sorted(str(k)[:64] for k in data.keys() - REPORT_KEYS)
    if unknown:
        raise ReportRefused(400, f"unknown keys {', '.join(unknown)}; a report has only host and port")
    port = data.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ReportRefused(400, "port must be an integer from 1 to 65535")
    host = data.get("host", remote_ip)
    if not isinstance(host, str) or not host.strip():
        raise ReportRefused(400, "host must be a non-empty string: an IP address or a host name")
    host = host.strip().removeprefix("[").removesuffix("]")
    if len(host) > MAX_HOST_LENGTH or any(c in host for c in "/@?#% \t\r\n"):
        raise ReportRefused(400, "host must be an IP address or a host name, nothing more")
    return Report(host=host, port=port)


def parse_networks(values: Iterable[str]) -> list[IPNetwork]:
    """ "10.0.0.0/8", "127.0.0.1" -> networks; ValueError naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a network (e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)") from None
    return networks


def _as_ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1, for the network check too
    return ip


async def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT) -> list[IPAddress]:
    """The addresses ``host`` stands for: itself if it is an IP address, else what the
    resolver answers (ReportRefused(400) if it answers nothing in ``timeout`` seconds)."""
    ip = _as_ip(host)
    if ip is not None:
        return [ip]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
        )
    except (OSError, UnicodeError, asyncio.TimeoutError):
        raise ReportRefused(400, f"host {host!r} does not resolve here; report an IP address") from None
    ips: list[IPAddress] = []
    for info in infos:
        resolved = _as_ip(info[4][0].split("%", 1)[0])
        if resolved is not None and resolved not in ips:
            ips.append(resolved)
    if not ips:
        raise ReportRefused(400, f"host {host!r} does not resolve here; report an IP address")
    return ips


def check_allowed(
    ips: list[IPAddress],
    port: int,
    *,
    networks: list[IPNetwork],
    ports: tuple[int, int],
    own_ports: set[int],
) -> IPAddress:
    """The address to store (the first of ``ips``) if the site allows every one of them
    with ``port``; ReportRefused(403) with the reason otherwise."""
    if not networks:
        raise ReportRefused(
            403,
            "this site accepts no reported addresses (its admin allows networks with "
            "c.HubAPIRelay.late_address_networks)",
        )
    low, high = ports
    if not low <= port <= high:
        raise ReportRefused(403, f"port {port} is outside the ports this site allows ({low}-{high})")
    if port in own_ports:
        raise ReportRefused(
            403, f"port {port} is one of the Outpost's own ports; the notebook must use another"
        )
    for ip in ips:
        if ip.is_unspecified or ip.is_multicast:
            raise ReportRefused(403, f"{ip} is not an address a notebook can listen at")
        if not any(ip.version == net.version and ip in net for net in networks):
            raise ReportRefused(
                403,
                f"{ip} is outside the networks this site allows for notebooks (c.HubAPIRelay.late_address_networks)",
            )
    return ips[0]
