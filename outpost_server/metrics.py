"""Prometheus metrics of the Outpost, served on a port of their own (off by default).

Named the way JupyterHub names its own (jupyterhub/metrics.py): a namespace prefix
(``outpost_``), ``_seconds`` histograms, ``_total`` counters. What the Outpost counts as it
happens is a module-level metric here, recorded by a small hook where it happens:

- ``outpost_rpc_duration_seconds{method,code}``: every OutpostService RPC, by method and
  gRPC status code (interceptors.py);
- ``outpost_server_start_duration_seconds{hub,status}``: a start from accepted to ready
  (``status="success"``), to its FAILED event (``failure``) or to a Stop that cancelled it
  (``cancelled``); ``outpost_server_start_failures_total{hub,error_class}`` (starts.py);
- ``outpost_db_write_duration_seconds{status}``: a caller's database write, queue and group
  commit included; ``outpost_db_commit_duration_seconds``: each transaction;
  ``outpost_db_write_failures_total{error_class}`` (store.py);
- ``outpost_ssh_connections_total{hub}``, ``outpost_ssh_channels_total{hub}``,
  ``outpost_ssh_refusals_total{reason}`` (forwarder.py);
- ``outpost_relay_request_duration_seconds{hub,route,code}`` (relay.py).

What the Outpost *is* at a moment is read at scrape time by :class:`OutpostCollector`,
never kept up to date on the hot path: ``outpost_servers{hub,state}``,
``outpost_ssh_open_connections{hub}``, ``outpost_ssh_open_channels{hub}``,
``outpost_relay_open_connections``.

Labels stay bounded: hubs are the site's configuration (certificates its CA signed,
``hub_tokens``, ``authorized_keys``), methods and codes are the service's and gRPC's,
error classes are the code's; never a user name, a server name or anything else a hub or a
notebook chooses. A relay request is labelled with its hub only once the path named a
server of that hub (an unknown path is ``hub=""``).

Nothing is recorded while no Outpost of the process serves metrics (:func:`enable`): the
hooks cost one attribute read then.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import netutil, web

from . import convert

log = logging.getLogger("outpost.metrics")

NAMESPACE = "outpost"

#: seconds: RPCs answer from memory in well under a millisecond, Starts wait for a commit
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
#: seconds: a start can take from milliseconds (a local process) to hours (a batch queue);
#: JupyterHub's spawn buckets, with shorter ones at the low end
START_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

RPC_DURATION = Histogram(
    "rpc_duration_seconds",
    "OutpostService RPCs by method and gRPC status code (streams: until the stream ends)",
    ["method", "code"],
    namespace=NAMESPACE,
    buckets=RPC_BUCKETS,
)
SERVER_START_DURATION = Histogram(
    "server_start_duration_seconds",
    "Starts from accepted to ready (status=success), failed (failure) or stopped (cancelled)",
    ["hub", "status"],
    namespace=NAMESPACE,
    buckets=START_BUCKETS,
)
SERVER_START_FAILURES = Counter(
    "server_start_failures",
    "Failed starts by the class of the exception that failed them",
    ["hub", "error_class"],
    namespace=NAMESPACE,
)
DB_WRITE_DURATION = Histogram(
    "db_write_duration_seconds",
    "Database writes as their callers wait for them (queue and group commit), by status (ok, error)",
    ["status"],
    namespace=NAMESPACE,
    buckets=DB_BUCKETS,
)
DB_COMMIT_DURATION = Histogram(
    "db_commit_duration_seconds",
    "Database transactions (one group commit of the writes queued since the last)",
    namespace=NAMESPACE,
    buckets=DB_BUCKETS,
)
DB_WRITE_FAILURES = Counter(
    "db_write_failures",
    "Database writes that failed (their callers got UNAVAILABLE), by the database error's class",
    ["error_class"],
    namespace=NAMESPACE,
)
SSH_CONNECTIONS = Counter(
    "ssh_connections",
    "SSH connections of hubs to the embedded forwarder, authenticated and admitted",
    ["hub"],
    namespace=NAMESPACE,
)
SSH_CHANNELS = Counter(
    "ssh_channels",
    "Forwards (direct-tcpip channels) to notebooks the SSH forwarder opened",
    ["hub"],
    namespace=NAMESPACE,
)
SSH_REFUSALS = Counter(
    "ssh_refusals",
    "What the SSH forwarder refused, by reason (unknown_key, connection_cap, destination, "
    "channel_cap, reverse_listen, other)",
    ["reason"],
    namespace=NAMESPACE,
)
RELAY_REQUEST_DURATION = Histogram(
    "relay_request_duration_seconds",
    "Requests to the hub API relay by hub, route (callback, address, api, none) and HTTP status code",
    ["hub", "route", "code"],
    namespace=NAMESPACE,
    buckets=RPC_BUCKETS,
)

#: the children of the hot paths, looked up once
DB_WRITE_OK = DB_WRITE_DURATION.labels("ok")
DB_WRITE_ERROR = DB_WRITE_DURATION.labels("error")

#: Outposts of this process that serve metrics (tests run several in one process)
_serving = 0
#: read by every hook: record nothing while no Outpost serves metrics
enabled = False


def enable() -> None:
    global _serving, enabled
    _serving += 1
    enabled = True


def disable() -> None:
    global _serving, enabled
    _serving = max(0, _serving - 1)
    enabled = _serving > 0


_rpc_children: dict[tuple[str, str], object] = {}


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """One RPC ended (the interceptor's hook; the labelled child is looked up once)."""
    child = _rpc_children.get((method, code))
    if child is None:
        child = _rpc_children[(method, code)] = RPC_DURATION.labels(method, code)
    child.observe(seconds)


STATE_LABELS = convert.STATE_NAMES


class OutpostCollector:
    """The gauges of one Outpost, read from its records, forwarder and relay when scraped.

    Counting the records costs one pass over them per scrape (a few milliseconds for
    tens of thousands of servers), nothing between scrapes."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        servers = GaugeMetricFamily(
            f"{NAMESPACE}_servers", "Servers the Outpost knows, by hub and state", labels=["hub", "state"]
        )
        manager = self.app.manager
        if manager is not None:
            counts: dict[str, dict[str, int]] = {}
            for rec in list(manager.records._all.values()):
                by_state = counts.get(rec.hub)
                if by_state is None:
                    by_state = counts[rec.hub] = dict.fromkeys(STATE_LABELS.values(), 0)
                state = STATE_LABELS.get(rec.state, "unknown")
                by_state[state] += 1
            for hub, by_state in sorted(counts.items()):
                for state, count in by_state.items():
                    servers.add_metric([hub, state], count)
        yield servers
        forwarder = self.app.forwarder
        if forwarder is not None and forwarder.enabled:
            connections = GaugeMetricFamily(
                f"{NAMESPACE}_ssh_open_connections",
                "Authenticated SSH connections of each hub to the forwarder",
                labels=["hub"],
            )
            channels = GaugeMetricFamily(
                f"{NAMESPACE}_ssh_open_channels", "Open forwards of each hub through the forwarder", labels=["hub"]
            )
            for hub in sorted(forwarder.authorized_keys):
                connections.add_metric([hub], len(forwarder._hub_connections.get(hub, ())))
                channels.add_metric([hub], forwarder._channels.get(hub, 0))
            yield connections
            yield channels
        relay = self.app.relay
        if relay is not None and relay._server is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_relay_open_connections",
                "Open connections to the hub API relay (c.HubAPIRelay.max_connections caps them)",
                value=relay.open_connections,
            )


class _ProcessCollector:
    """The process-wide metrics (the counters above, and prometheus_client's process and
    Python collectors) inside an Outpost's own registry."""

    def collect(self):
        yield from REGISTRY.collect()


class MetricsHandler(web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD")

    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.registry))

    def head(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish()


def _quiet_log(handler: web.RequestHandler) -> None:
    if handler.get_status() >= 400:
        log.debug("%d %s %s", handler.get_status(), handler.request.method, handler.request.path)


class MetricsServer:
    """``GET /metrics`` of one Outpost on ip:port, in the Outpost's event loop (so the
    collector reads the records between two steps of the loop, never during one)."""

    #: connections beyond this are closed at accept: a scraper needs one or two
    max_connections = 32

    def __init__(self, app, ip: str, port: int):
        self.ip = ip
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProcessCollector())
        self.registry.register(OutpostCollector(app))
        self._server = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        from .relay import _CappedHTTPServer  # its cap on open connections, reused

        application = web.Application(
            [(r"/metrics", MetricsHandler, {"registry": self.registry})], log_function=_quiet_log
        )
        server = _CappedHTTPServer(application, xheaders=False, idle_connection_timeout=60, body_timeout=10)
        server.max_connections = self.max_connections
        sockets = netutil.bind_sockets(self.port, address=self.ip or None)
        server.add_sockets(sockets)
        self._server = server
        self.bound_port = sockets[0].getsockname()[1]
        enable()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        disable()
        server.stop()
        await server.close_all_connections()
