"""The hub API relay: notebooks at the site talk to "the hub" through the Outpost.

A Spawner like batchspawner's learns its notebook's port late: the job starts, the
notebook picks a free port and reports it with ``POST $JUPYTERHUB_API_URL/batchspawner``
(``{"port": N}``, with its own API token); in a normal hub the hub's batchspawner API
handler sets the port on the Spawner, whose start() has been waiting for it. Here that
Spawner lives in the Outpost, so the callback must be answered at the site. Everything
else the notebook asks the hub (token checks, the OAuth code exchange, activity) must
still reach the hub, usually through the site-side end of the hub's SSH reverse forward,
which compute nodes cannot reach.

With ``c.HubAPIRelay.enabled``, every hosted Spawner's notebook gets

    JUPYTERHUB_API_URL = <relay url>/hubs/<hub>/servers/<server_name><original path>

(the hub's JUPYTERHUB_ACTIVITY_URL, and any other env value under the original API URL,
moves along) and the relay

- answers ``POST .../batchspawner`` itself: the request's token must be that server's
  JUPYTERHUB_API_TOKEN; only the keys in :data:`CALLBACK_KEYS` are set, on the live
  Spawner of a server that is still starting;
- passes every other request below the hub's API path (``<base_url>hub/api``, the path of
  the JUPYTERHUB_API_URL that server's start carried) that has a token (``Authorization:
  token|bearer X`` or ``?token=``; exempt: ``GET`` of the API root itself, the hub's
  version, which jupyterhub-singleuser asks without one at start) to the hub's upstream,
  and the answer back. It adds no credentials: the hub checks every request as it always
  does.

The relay is not a proxy a hub can aim: the upstream (scheme, host, port) of each hub is
the site's choice, ``c.HubAPIRelay.hub_urls[hub]``, by default the hub's own reverse
forward (its one ``c.SSHForwarder.reverse_listen`` address). Of what the hub sends only
the path is used, and only if it ends in ``/hub/api``. A hub without an upstream gets
502 for everything but the callback. A request without a token never leaves the relay
(401).

It also serves the late-address endpoint, ``POST .../hubs/<hub>/servers/<server_name>
/outpost/address`` (late.py): a starting server's job reports where its notebook
listens, with that server's token, inside the networks the site allows
(``late_address_networks``; none by default); that address ends the start.

Hub and server come from the path, so one relay serves every hub of the Outpost and a
request can only ever reach its own hub's upstream. Bounded: bodies, upstream time,
a connection's idle and body time, relayed requests in flight per hub (503 with
Retry-After past the cap) and open connections in all (closed at accept past the cap).
Tokens are never logged (access lines carry no query string).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlparse

from tornado import httputil, netutil, web
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient
from traitlets import Bool, Dict, Float, Integer, List, TraitError, Tuple, Unicode, validate
from traitlets.config import Configurable

from outpost_client.v1 import outpost_pb2 as pb

from . import late, metrics
from .forwarder import split_host_port
from .late import parse_networks

log = logging.getLogger("outpost.relay")

# What batchspawner-singleuser sends (batchspawner 1.x: {"port": N}); nothing else is set
CALLBACK_KEYS = frozenset({"port"})
CALLBACK_PATH = "batchspawner"
# batchspawner's own handler answers this body (its 201 is set after finish(): the
# status on the wire is 200, which is what batchspawner-singleuser sees)
CALLBACK_ANSWER = {"message": "BatchSpawner data configured"}

# hop-by-hop headers (RFC 9110 7.6.1) and what the two HTTP stacks compute themselves
_SKIP_REQUEST_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_SKIP_RESPONSE_HEADERS = _SKIP_REQUEST_HEADERS - {"host"}
_AUTH = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)
_WILDCARD = ("", "0.0.0.0", "::", "[::]")
# every JupyterHub's API lives at <base_url>hub/api; nothing else of a hub is relayed
API_SUFFIX = "/hub/api"
# what a 503 (a hub's relayed requests at their cap) asks the notebook to wait, seconds
RETRY_AFTER = 5
# refused connections (over max_connections) are logged at most this often, seconds
REFUSAL_LOG_INTERVAL = 60.0

# (hub, server_name) -> what the relay needs of that server, or None
Lookup = Callable[[str, str], Any]


class RelayConfigError(ValueError):
    """The relay cannot start; the message is one line a person can act on."""


def relay_prefix(base_url: str, hub: str, server_name: str) -> str:
    """The part of a notebook's JUPYTERHUB_API_URL that names the relay, hub and server."""
    return f"{base_url.rstrip('/')}/hubs/{quote(hub, safe='')}/servers/{quote(server_name, safe='')}"


def relayed_env(env: dict[str, str], original_api_url: str, prefix: str) -> dict[str, str]:
    """env with the hub API URL (and every value under it) pointing at the relay.

    ``http://127.0.0.1:18081/hub/api`` becomes ``<prefix>/hub/api``; so does the start of
    ``JUPYTERHUB_ACTIVITY_URL``. Values that do not start with the original URL stay.
    """
    original = original_api_url.rstrip("/")
    if not original:
        return env
    origin = _origin(original)
    relayed = dict(env)
    for key, value in env.items():
        if value == original or value.startswith(original + "/"):
            relayed[key] = prefix + value[len(origin) :]
    relayed["JUPYTERHUB_API_URL"] = prefix + original[len(origin) :]
    return relayed


def _origin(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"


def check_hub_url(hub: str, value: str) -> str:
    """A hub's upstream as the site configures it: an http(s) origin, nothing more.

    Returns it without a trailing slash; ValueError with a message naming the hub if it
    has a path, a query, credentials or no host."""
    parsed = urlparse(value.strip())
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or parsed.path not in ("", "/")
        or parsed.query
        or parsed.fragment
        or parsed.username is not None
    ):
        raise ValueError(
            f"HubAPIRelay.hub_urls[{hub!r}] must be http(s)://host:port with no path, not {value!r} "
            "(the path comes from the hub's JUPYTERHUB_API_URL)"
        )
    return f"{parsed.scheme}://{parsed.netloc}"


def reverse_forward_url(addresses: Sequence[str]) -> str | None:
    """The upstream a hub's reverse forward gives: its one "host:port" as an http URL
    (a wildcard host is reached on loopback); None unless there is exactly one."""
    if len(addresses) != 1:
        return None
    host, port = split_host_port(addresses[0])
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def api_path_of(api_url: str) -> str | None:
    """The path of a hub's JUPYTERHUB_API_URL if it is a hub API path (ends in /hub/api),
    without a trailing slash; None otherwise (the relay passes nothing on for it)."""
    path = urlparse(api_url).path.rstrip("/")
    if not path.endswith(API_SUFFIX) or not path.startswith("/"):
        return None
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        return None
    return path


def has_token(request: httputil.HTTPServerRequest) -> bool:
    """Whether a request carries a hub API token (``Authorization: token|bearer X`` or
    ``?token=X``): the relay passes nothing else on."""
    if token_from(request.headers):
        return True
    return any(value for value in request.query_arguments.get("token", []))


def token_from(headers: httputil.HTTPHeaders) -> str:
    """The token of ``Authorization: token X`` or ``Bearer X`` ("" if none)."""
    match = _AUTH.match(headers.get("Authorization", "").strip())
    return match.group(1) if match else ""


def same_token(given: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token matches nothing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


class HubAPIRelay(Configurable):
    """Relays notebooks' hub API calls; answers batchspawner's port callback itself."""

    enabled = Bool(
        False,
        config=True,
        help="""Run the hub API relay and point every notebook's JUPYTERHUB_API_URL at it.

        Needed for Spawners whose notebooks report their port to the hub API once they
        run (batchspawner's SlurmSpawner and friends: batchspawner-singleuser POSTs it to
        $JUPYTERHUB_API_URL/batchspawner): the relay answers that callback at the site
        and passes every other hub API request with a token on to the hub's upstream
        (hub_urls: by default its reverse forward). Off: the notebook gets the hub's
        JUPYTERHUB_API_URL as it is.
        """,
    )
    ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the relay listens on.

        Notebooks must reach it: on a batch cluster, an address of the Outpost host the
        compute nodes can reach (or "0.0.0.0"), not 127.0.0.1. Anyone who can reach it
        can reach the hub API (and only that) of every hub with a server here, exactly as
        notebooks can (the hub still checks every request's token): keep it to the
        cluster's network.
        """,
    )
    port = Integer(8082, min=0, max=65535, config=True, help="The port the relay listens on (0: any free port).")
    url = Unicode(
        "",
        config=True,
        help="""The base URL notebooks reach the relay at, e.g. "http://login1.cluster:8082"
        (a name the compute nodes resolve).

        Empty (default): http://<ip>:<port> with the port actually bound; for a wildcard
        ip ("0.0.0.0", "::", "") the host's fully qualified name instead of the ip.
        """,
    )
    max_body_bytes = Integer(
        4 * 1024 * 1024,
        min=1024,
        config=True,
        help="""The largest body the relay passes on, in either direction. A larger request
        gets 413 (or 400 if it is chunked) and never reaches the hub; a larger answer from
        the hub becomes 502.""",
    )
    upstream_timeout = Float(
        30.0,
        min=0.01,
        max=3600.0,
        config=True,
        help="""Seconds a relayed request may take at the hub (connecting included) before the
        notebook gets 504. A hub that refuses the connection (its reverse forward down) is 502.""",
    )
    hub_urls = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""Where the relay reaches each hub's API: hub name -> "http(s)://host:port".

        The site's choice, never the hub's: of the JUPYTERHUB_API_URL a hub sends only the
        path (its base_url, ending in /hub/api) is used. A hub not listed here is reached
        through its reverse forward, when c.SSHForwarder.reverse_listen lists exactly one
        address for it (a wildcard host as 127.0.0.1). A hub with neither has no upstream:
        its notebooks' hub API requests get 502 (their batchspawner callback still works),
        and the Outpost logs it once. E.g. {"hub-a": "http://127.0.0.1:18081",
        "hub-b": "https://hub-b.example.org"}.
        """,
    )
    idle_connection_timeout = Float(
        60.0,
        min=1.0,
        max=3600.0,
        config=True,
        help="""Seconds a notebook's connection to the relay may sit idle (also: the time it
        has to send a request's headers) before the relay closes it.""",
    )
    body_timeout = Float(
        30.0,
        min=1.0,
        max=3600.0,
        config=True,
        help="Seconds a notebook has to send a request's body to the relay before it closes the connection.",
    )
    max_requests_per_hub = Integer(
        32,
        min=1,
        max=10000,
        config=True,
        help="""Relayed requests of one hub's notebooks that may be in flight at once (waiting
        for the hub). One more gets 503 with Retry-After and never reaches the hub; other
        hubs are not affected. The batchspawner callback is answered at the site and is
        not counted.""",
    )
    max_connections = Integer(
        1000,
        min=1,
        max=1000000,
        config=True,
        help="""Open connections to the relay, of all hubs' notebooks together. A connection
        past the cap is closed as soon as it is accepted (logged at most once a minute),
        so the relay's sockets cannot starve the Outpost's gRPC server of file descriptors
        (the Outpost also raises its soft open-files limit to the hard limit at start).""",
    )

    late_address_networks = List(
        Unicode(),
        config=True,
        help="""The networks a starting server's job may report its notebook's address in
        (the late-address endpoint, POST <relay>/hubs/<hub>/servers/<server>/outpost/address):
        e.g. ["10.20.0.0/16"] for a cluster's compute nodes, ["127.0.0.1"] when notebooks run
        on the Outpost's own host.

        The report is written by the notebook's user, and the hub's tunnel forwards that
        hub's users to the address it names: list only networks where notebooks run, not
        ones with the site's other services. A host name is resolved once, at the report;
        every address it resolves to must be in one of these networks. Empty (default):
        every report is refused (403).
        """,
    )
    late_address_ports = Tuple(
        Integer(min=1, max=65535),
        Integer(min=1, max=65535),
        default_value=(1024, 65535),
        config=True,
        help="""The lowest and highest port a reported late address may have. By default no
        privileged port (below 1024: the host's system services). The Outpost's own
        listening ports (gRPC, relay, SSH forwarder, metrics, health, reverse forwards) are
        refused on any host.""",
    )
    late_address_grace = Float(
        10.0,
        min=0.0,
        max=3600.0,
        config=True,
        help="""Seconds a hosted Spawner's start() that is still running when its job reports a
        late address has to return. A start() that waits for self.port (as batchspawner's does)
        returns at its next check, since the report sets the Spawner's ip and port. After
        the grace start() is cancelled and the server is ready at the reported address
        all the same: its Spawner's poll() and stop() then work from what start() set up
        before it waited (the state the Outpost stored while it ran).""",
    )

    @validate("late_address_networks")
    def _check_late_address_networks(self, proposal):
        try:
            parse_networks(proposal.value)
        except ValueError as e:
            raise TraitError(f"HubAPIRelay.late_address_networks: {e}") from None
        return [value.strip() for value in proposal.value]

    @validate("late_address_ports")
    def _check_late_address_ports(self, proposal):
        low, high = proposal.value
        if low > high:
            raise TraitError(f"HubAPIRelay.late_address_ports: ({low}, {high}) is empty; give (lowest, highest)")
        return proposal.value

    @validate("url")
    def _check_url(self, proposal):
        value = proposal.value.strip()
        if value:
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query:
                raise TraitError(f"HubAPIRelay.url must be an http(s) URL with a host, not {value!r}")
        return value.rstrip("/")

    @validate("hub_urls")
    def _check_hub_urls(self, proposal):
        try:
            return {hub: check_hub_url(hub, value) for hub, value in proposal.value.items()}
        except ValueError as e:
            raise TraitError(str(e)) from None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._server: _CappedHTTPServer | None = None
        self._clients: dict[str, SimpleAsyncHTTPClient] = {}
        self._lookup: Lookup = lambda hub, server_name: None
        self._reverse_urls: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        self._warned_no_route: set[str] = set()
        self._refused_connections = 0
        self._refusal_logged_at: float | None = None
        self.bound_port: int | None = None
        #: the Outpost's own listening ports (late addresses may not name them); set by the app
        self.own_ports: Callable[[], set[int]] = lambda: set()

    @property
    def open_connections(self) -> int:
        """Connections to the relay open now (0 when it is not running)."""
        return self._server.open_connections if self._server is not None else 0

    def upstream_for(self, hub: str) -> str | None:
        """The origin the relay passes ``hub``'s requests to (the site's choice), or None."""
        return self.hub_urls.get(hub) or self._reverse_urls.get(hub)

    @property
    def base_url(self) -> str:
        """Where notebooks reach the relay (the configured url, or derived once bound)."""
        if self.url:
            return self.url
        if self.bound_port is None:
            raise RuntimeError("the hub API relay has not started")
        host = socket.getfqdn() if self.ip in _WILDCARD else self.ip
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.bound_port}"

    # --- the notebook's env -------------------------------------------------------------

    def notebook_env(self, hub: str, server_name: str, env: dict[str, str]) -> dict[str, str]:
        """What the hosted Spawner's get_env() returns when the relay is on."""
        record = self._lookup(hub, server_name)
        original = ""
        if record is not None:
            original = record.spec.env.get("JUPYTERHUB_API_URL", "")
        original = original or env.get("JUPYTERHUB_API_URL", "")
        if not original:
            return env
        if self.upstream_for(hub) is None:
            self._warn_no_route(hub)
        prefix = relay_prefix(self.base_url, hub, server_name)
        relayed = relayed_env(env, original, prefix)
        if self.late_address_networks:
            relayed[late.ENV_KEY] = prefix + late.ADDRESS_PATH
        return relayed

    def _warn_no_route(self, hub: str) -> None:
        if hub in self._warned_no_route:
            return
        self._warned_no_route.add(hub)
        log.warning(
            "Hub API relay: no upstream for hub %r (neither c.HubAPIRelay.hub_urls[%r] nor exactly "
            "one c.SSHForwarder.reverse_listen address): its notebooks' hub API requests get 502",
            hub,
            hub,
        )

    def attach(self, spawner, hub: str, server_name: str) -> None:
        """Make a hosted Spawner's get_env() point its notebook at this relay."""
        spawner._outpost_env_filter = partial(self.notebook_env, hub, server_name)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, lookup: Lookup, reverse_listen: Mapping[str, Sequence[str]] | None = None) -> None:
        """Listen; ``lookup(hub, server_name)`` answers the server's manager Record (or None);
        ``reverse_listen`` is the SSH forwarder's (hub -> "host:port" list): a hub's one
        address there is its upstream unless ``hub_urls`` names one."""
        self._lookup = lookup
        self._reverse_urls = {}
        for hub, addresses in (reverse_listen or {}).items():
            url = reverse_forward_url(addresses)
            if url is not None:
                self._reverse_urls[hub] = url
            elif addresses and hub not in self.hub_urls:
                log.warning(
                    "Hub API relay: %r has %d reverse_listen addresses, so no upstream; "
                    "set c.HubAPIRelay.hub_urls[%r]",
                    hub,
                    len(addresses),
                    hub,
                )
        app = web.Application(
            [(r"/.*", RelayHandler, {"relay": self})],
            log_function=_access_log,
            xsrf_cookies=False,
        )
        server = _CappedHTTPServer(
            app,
            max_body_size=self.max_body_bytes,
            xheaders=False,
            idle_connection_timeout=self.idle_connection_timeout,
            body_timeout=self.body_timeout,
        )
        server.max_connections = self.max_connections
        server.on_refused = self._connection_refused
        try:
            sockets = netutil.bind_sockets(self.port, address=self.ip or None)
        except OSError as e:
            raise RelayConfigError(f"hub API relay cannot listen on {self.ip}:{self.port} ({e})") from None
        server.add_sockets(sockets)
        self._server = server
        self.bound_port = sockets[0].getsockname()[1]
        for hub in sorted(set(self.hub_urls) | set(self._reverse_urls)):
            log.info("Hub API relay: %s's API is reached at %s", hub, self.upstream_for(hub))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()

    def _connection_refused(self, address) -> None:
        """A connection past max_connections was closed; log it at most once a minute."""
        self._refused_connections += 1
        now = time.monotonic()
        if self._refusal_logged_at is not None and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        self._refusal_logged_at = now
        log.warning(
            "Hub API relay: %d open connections, the cap (c.HubAPIRelay.max_connections); "
            "closed %d new connection(s) at accept (the latest from %s); next report in a minute at most",
            self.max_connections,
            self._refused_connections,
            address[0] if address else "?",
        )
        self._refused_connections = 0

    def _client_for(self, hub: str) -> SimpleAsyncHTTPClient:
        client = self._clients.get(hub)
        if client is None:
            client = SimpleAsyncHTTPClient(
                force_instance=True, max_clients=self.max_requests_per_hub, max_body_size=self.max_body_bytes
            )
            self._clients[hub] = client
        return client

    # --- requests ------------------------------------------------------------------------

    def resolve(self, path: str):
        """Take /hubs/<hub>/servers/<server><rest> apart: (hub, server_name, record, rest,
        the hub's API path), or raise an HTTPError. ``rest`` is under the API path."""
        parts = path.split("/", 6)
        if len(parts) < 6 or parts[0] or parts[1] != "hubs" or parts[3] != "servers":
            raise web.HTTPError(404, "not a relay path: /hubs/<hub>/servers/<server>/...")
        hub, server_name = unquote(parts[2]), unquote(parts[4])
        rest = "/" + "/".join(parts[5:])
        decoded = unquote(rest)
        if "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/")):
            raise web.HTTPError(400, "dot segments and backslashes are not allowed")
        record = self._lookup(hub, server_name)
        if record is not None and rest == late.ADDRESS_PATH:
            return hub, server_name, record, rest, None
        original = record.spec.env.get("JUPYTERHUB_API_URL", "") if record is not None else ""
        if not original:
            raise web.HTTPError(404, "no such server")
        api_path = api_path_of(original)
        if api_path is None:
            raise web.HTTPError(
                404, "nothing is relayed for this server: its JUPYTERHUB_API_URL does not end in /hub/api"
            )
        if rest != api_path and not rest.startswith(api_path + "/"):
            raise web.HTTPError(404, f"only the hub API ({api_path}/...) is relayed")
        return hub, server_name, record, rest, api_path

    def set_from_callback(self, hub: str, server_name: str, record, token: str, body: bytes) -> dict:
        """Check and apply one batchspawner callback; answer an HTTPError if refused."""
        if not same_token(token, record.spec.env.get("JUPYTERHUB_API_TOKEN", "")):
            log.warning(
                "Refused a batchspawner callback for %s/%s: not that server's token", hub, server_name
            )
            raise web.HTTPError(403, "not this server's token")
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        values = {}
        for key in sorted(CALLBACK_KEYS & data.keys()):
            value = data[key]
            if key == "port":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                    raise web.HTTPError(400, "port must be an integer from 1 to 65535")
            values[key] = value
        ignored = sorted(str(k)[:64] for k in data.keys() - CALLBACK_KEYS)
        spawner = record.spawner
        if spawner is None or record.state != pb.SERVER_STATE_STARTING:
            log.warning(
                "Refused a batchspawner callback for %s/%s: the server is not starting", hub, server_name
            )
            raise web.HTTPError(409, "this server is not starting")
        for key, value in values.items():
            setattr(spawner, key, value)
        log.info(
            "%s/%s: the notebook reported %s%s",
            hub,
            server_name,
            ", ".join(f"{k}={v}" for k, v in values.items()) or "nothing",
            f" (ignored keys: {', '.join(ignored)})" if ignored else "",
        )
        return CALLBACK_ANSWER

    async def report_address(self, hub: str, server_name: str, record, token: str, body: bytes, remote_ip: str) -> dict:
        """Check and apply one late-address report (late.py); an HTTPError if refused."""
        try:
            if not same_token(token, record.spec.env.get("JUPYTERHUB_API_TOKEN", "")):
                raise late.ReportRefused(403, "not this server's token (Authorization: token $JUPYTERHUB_API_TOKEN)")
            run = record.run
            if run is None or record.state != pb.SERVER_STATE_STARTING or record.spawner is None:
                raise late.ReportRefused(409, "this server is not starting")
            report = late.parse_report(body, remote_ip)
            ips = await late.resolve(report.host, report.port)
            ip = late.check_allowed(
                ips,
                report.port,
                networks=late.parse_networks(self.late_address_networks),
                ports=tuple(self.late_address_ports),
                own_ports=self.own_ports() | ({self.bound_port} if self.bound_port else set()),
            )
            if record.run is not run:  # stopped or restarted while the name resolved
                raise late.ReportRefused(409, "this server is not starting")
            run.report_address(str(ip), report.port, self.late_address_grace)
        except late.ReportRefused as e:
            log.warning("Refused a late address for %s/%s: %s", hub, server_name, e)
            raise web.HTTPError(e.status, str(e)) from None
        named = "" if report.host == str(ip) else f" (named {report.host[:64]!r})"
        log.info("%s/%s: the job reported its address %s:%d%s", hub, server_name, ip, report.port, named)
        return {"host": str(ip), "port": report.port}

    async def forward(self, handler: RelayHandler, hub: str, target: str) -> None:
        """Pass the handler's request on to ``hub``'s upstream at ``target`` (path and query)."""
        origin = self.upstream_for(hub)
        if origin is None:
            self._warn_no_route(hub)
            raise web.HTTPError(
                502,
                f"this Outpost has no route to hub {hub!r}'s API; the site's admin sets it "
                f"with c.HubAPIRelay.hub_urls",
            )
        if self._in_flight.get(hub, 0) >= self.max_requests_per_hub:
            raise RelayRefusal(
                503,
                f"hub {hub!r} has {self.max_requests_per_hub} requests in flight through this relay, "
                f"its cap (c.HubAPIRelay.max_requests_per_hub); retry in {RETRY_AFTER} seconds",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        self._in_flight[hub] = self._in_flight.get(hub, 0) + 1
        try:
            await self._fetch(handler, hub, origin + target)
        finally:
            self._in_flight[hub] -= 1
            if not self._in_flight[hub]:
                del self._in_flight[hub]

    async def _fetch(self, handler: RelayHandler, hub: str, upstream: str) -> None:
        request = handler.request
        headers = httputil.HTTPHeaders()
        for name, value in request.headers.get_all():
            if name.lower() not in _SKIP_REQUEST_HEADERS:
                headers.add(name, value)
        body = handler.body
        method = request.method
        outgoing = HTTPRequest(
            upstream,
            method=method,
            headers=headers,
            body=body if (body or method in ("POST", "PUT", "PATCH")) else None,
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,
            connect_timeout=self.upstream_timeout,
            request_timeout=self.upstream_timeout,
        )
        try:
            response = await self._client_for(hub).fetch(outgoing, raise_error=False)
        except HTTPTimeoutError:
            status, reason = 504, "the hub did not answer in time"
        except (HTTPClientError, httputil.HTTPInputError):
            # also what an answer larger than max_body_bytes becomes (the client hangs up)
            status, reason = (
                502,
                f"the hub closed the connection or answered more than {self.max_body_bytes} bytes",
            )
        except OSError as e:
            status, reason = 502, f"cannot reach the hub ({type(e).__name__})"
        else:
            status, reason = response.code, ""
        if reason:
            log.warning("%s %s for %s/%s: %s", method, request.path, handler.hub, handler.server_name, reason)
            raise web.HTTPError(status, reason)
        handler.set_status(response.code, response.reason)
        for name in ("Content-Type", "Server", "Date"):
            handler.clear_header(name)
        for name, value in response.headers.get_all():
            if name.lower() not in _SKIP_RESPONSE_HEADERS:
                handler.add_header(name, value)
        if response.body and method != "HEAD" and response.code not in (204, 304):
            handler.write(response.body)
        await handler.finish()


class RelayRefusal(web.HTTPError):
    """An HTTPError whose answer carries headers (Retry-After)."""

    def __init__(self, status_code: int, message: str, *, headers: dict[str, str]):
        super().__init__(status_code, message)
        self.headers = headers


class _CappedHTTPServer(HTTPServer):
    """Tornado's HTTPServer that closes a new connection at accept when ``max_connections``
    are open (and tells ``on_refused``)."""

    max_connections = 1000
    open_connections = 0
    on_refused: Callable[[Any], None] = staticmethod(lambda address: None)

    def handle_stream(self, stream, address) -> None:
        if self.open_connections >= self.max_connections:
            stream.close()
            self.on_refused(address)
            return
        self.open_connections += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)


@web.stream_request_body
class RelayHandler(web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, relay: HubAPIRelay) -> None:
        self.relay = relay
        self.hub = self.server_name = ""
        #: outpost_relay_request_duration_seconds' route: callback, api, or none (refused
        #: before the path named a server)
        self.route = "none"

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        length = self.request.headers.get("Content-Length")
        limit = self.relay.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise web.HTTPError(413, f"the body may have at most {limit} bytes")
        self.request.connection.set_max_body_size(limit)
        self.hub, self.server_name, self.record, self.rest, self.api_path = self.relay.resolve(self.request.path)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.relay.max_body_bytes:  # unreachable: the connection limits it
            raise web.HTTPError(413)
        self._chunks.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def check_xsrf_cookie(self) -> None:
        pass  # an API relay; the hub does its own checks

    def log_exception(self, typ, value, tb) -> None:
        # tornado's own lines name request.uri (its query string may carry a token)
        where = f"{self.request.method} {self.request.path}"
        if isinstance(value, web.HTTPError):
            log.debug("%d %s: %s", value.status_code, where, value.log_message or "")
        else:
            log.error("Relaying %s failed", where, exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs) -> None:
        # a short JSON message like the hub's API; never the exception's traceback
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message
        if isinstance(exc, RelayRefusal):
            for name, value in exc.headers.items():
                self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    async def _handle(self) -> None:
        method = self.request.method
        if self.api_path is None:  # the late-address endpoint (late.py)
            self.route = "address"
            if method != "POST":
                raise web.HTTPError(405, f"{late.ADDRESS_PATH} takes POST only")
            answer = await self.relay.report_address(
                self.hub, self.server_name, self.record, token_from(self.request.headers), self.body,
                self.request.remote_ip,
            )  # fmt: skip
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(answer))
            return
        if method == "POST" and self.rest.rstrip("/") == f"{self.api_path}/{CALLBACK_PATH}":
            self.route = "callback"
            answer = self.relay.set_from_callback(
                self.hub, self.server_name, self.record, token_from(self.request.headers), self.body
            )
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(answer))
            return
        self.route = "api"
        # jupyterhub-singleuser's first call, before it uses its token: GET <api_url> (the
        # hub's version, which the hub serves to anyone; singleuser/extension.py
        # check_hub_version); it exits if that fails
        version_check = method in ("GET", "HEAD") and self.rest.rstrip("/") == self.api_path
        if not version_check and not has_token(self.request):
            raise web.HTTPError(
                401,
                "a hub API request needs a token (Authorization: token <token>); "
                "the relay passes nothing on without one",
            )
        target = self.rest
        if self.request.query:
            target += "?" + self.request.query
        await self.relay.forward(self, self.hub, target)

    get = head = post = put = patch = delete = options = _handle


def _access_log(handler: web.RequestHandler) -> None:
    """Tornado's access log without the query string (it may carry a token), and the
    request's metric when metrics are served (hub and route only once the path named a
    server: never a label a notebook makes up)."""
    status = handler.get_status()
    if metrics.enabled:
        metrics.RELAY_REQUEST_DURATION.labels(
            getattr(handler, "hub", ""), getattr(handler, "route", "none"), str(status)
        ).observe(handler.request.request_time())
    level = logging.DEBUG if status < 400 else logging.INFO
    log.log(
        level,
        "%d %s %s (%s) %.2fms",
        status,
        handler.request.method,
        handler.request.path,
        handler.request.remote_ip,
        1000.0 * handler.request.request_time(),
    )
