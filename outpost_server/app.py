"""The `jupyterhub-outpost` application: configuration, start-up and shutdown.

Reads like JupyterHub's own: a traitlets Application with `outpost_config.py`,
`--generate-config`, `init_*` steps in order and teardown in reverse.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from jupyterhub.spawner import LocalProcessSpawner, Spawner
from jupyterhub.traitlets import EntryPointType
from traitlets import (
    Any,
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Integer,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)
from tornado.log import LogFormatter
from traitlets.config import Application

from outpost_client.v1 import outpost_pb2, outpost_pb2_grpc

from . import __version__
from .crypto import ENV_VAR as CRYPT_KEY_ENV
from .crypto import Crypt, CryptConfigError, key_file_warning, parse_keys, read_key_file
from .forwarder import ForwarderConfigError, SSHForwarder
from .hosting import DEFAULT_SITE_ENV_KEYS
from .identity import TOKEN_HASH, auth_mode, hash_token
from .interceptors import OutpostInterceptor
from .manager import LifecycleManager, ManagerSettings
from .policy import OverridePolicy, check_policy
from .relay import HubAPIRelay, RelayConfigError
from .servicer import OutpostServicer
from .spawners import SpawnerFactory
from .store import Store
from .tls import TLSConfigError, load_server_tls

SERVICE_NAME = outpost_pb2.DESCRIPTOR.services_by_name["OutpostService"].full_name

aliases = {
    "ip": "Outpost.ip",
    "port": "Outpost.port",
    "db-url": "Outpost.db_url",
    "spawner-class": "Outpost.spawner_class",
    "tls-cert": "Outpost.tls_cert",
    "tls-key": "Outpost.tls_key",
    "tls-client-ca": "Outpost.tls_client_ca",
    "log-level": "Application.log_level",
    "config": "Outpost.config_file",
    "f": "Outpost.config_file",
}

flags = {
    "generate-config": (
        {"Outpost": {"generate_config": True}},
        "Write a default config file (outpost_config.py) and exit.",
    ),
    "allow-plaintext": (
        {"Outpost": {"allow_plaintext": True}},
        "Serve plaintext on a non-loopback address (only behind a trusted network).",
    ),
    "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log at DEBUG level."),
}


def one_line_exit(error: Exception) -> SystemExit:
    """How a configuration error ends start-up: one line on stderr, exit status 1."""
    return SystemExit(f"jupyterhub-outpost: {error}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Outpost(Application):
    """Host a JupyterHub Spawner for remote hubs, over gRPC."""

    name = "jupyterhub-outpost"
    version = __version__
    description = """Start, poll and stop JupyterHub single-user servers for remote hubs.

    The Outpost runs on (or next to) a system a JupyterHub cannot reach directly and
    hosts that system's Spawner. Configure it like jupyterhub_config.py, in
    outpost_config.py: c.Outpost.spawner_class and the Spawner's own options.
    """
    examples = """
    jupyterhub-outpost --generate-config
    jupyterhub-outpost --port 50051 --spawner-class simple
    jupyterhub-outpost -f /etc/outpost/outpost_config.py
    jupyterhub-outpost generate-certs --out certs --host outpost.example.org --hub hub1
    jupyterhub-outpost --tls-cert certs/outpost-server/outpost-server.crt \\
        --tls-key certs/outpost-server/outpost-server.key --tls-client-ca certs/outpost-ca/outpost-ca.crt
    """
    aliases = aliases
    flags = flags
    subcommands = {
        "generate-certs": (
            "outpost_server.certs.GenerateCerts",
            "Create a CA, the Outpost's server certificate and one client certificate per hub (mTLS).",
        ),
        "hash-token": (
            "outpost_server.app.HashToken",
            "Read a hub's bearer token from stdin and print its hash for c.Outpost.hub_tokens.",
        ),
    }
    raise_config_file_errors = True
    _log_formatter_cls = LogFormatter
    forwarder: SSHForwarder | None = None
    relay: HubAPIRelay | None = None
    store: Store | None = None
    manager: LifecycleManager | None = None
    server: grpc.aio.Server | None = None
    health: health.aio.HealthServicer | None = None

    config_file = Unicode(
        "outpost_config.py", config=True, help="The config file to load (Python, like jupyterhub_config.py)."
    )
    generate_config = Bool(False, config=True, help="Write a default config file and exit.")

    ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the gRPC server listens on.

        Plaintext is served only on a loopback address unless allow_plaintext is set;
        with mTLS (tls_cert, tls_key, tls_client_ca), or TLS with hub_tokens, any address
        is fine.
        """,
    )
    port = Integer(50051, min=0, max=65535, config=True, help="The port the gRPC server listens on (0: any free port).")
    allow_plaintext = Bool(
        False,
        config=True,
        help="""Serve plaintext gRPC on a non-loopback address.

        Without it, the Outpost refuses to start with plaintext on any other address, with
        a one-line reason. Without TLS anyone who can reach the port can start servers as
        the default hub; only set this behind a network you trust.
        """,
    )
    default_hub = Unicode(
        "default",
        config=True,
        help="""The hub identity of plaintext connections.

        A server is identified by (hub, server_name); with mTLS the hub identity comes
        from the client certificate, with hub_tokens from the token, and on plaintext
        connections without hub_tokens it is this name. The identity always comes from the
        connection, never from a request.
        """,
    )

    tls_cert = Unicode(
        "",
        config=True,
        help="""The Outpost's TLS certificate (PEM file; the chain may follow it).

        Setting tls_cert, tls_key and tls_client_ca turns on mTLS: every client must
        present a certificate signed by tls_client_ca, and that certificate names its hub
        (see hub_identity_from). `jupyterhub-outpost generate-certs` creates all three.
        With hub_tokens, tls_cert and tls_key alone serve TLS without client certificates.
        The certificate's subjectAltNames must include the name or address hubs use in
        c.OutpostSpawner.outpost_address.
        """,
    )
    tls_key = Unicode(
        "",
        config=True,
        help="""The private key of tls_cert (PEM file, unencrypted; keep it mode 0600).
        A key readable by group or others is served, with a warning in the log.""",
    )
    tls_client_ca = Unicode(
        "",
        config=True,
        help="""The CA certificate(s) (PEM file, several may be concatenated) a hub's client
        certificate must be signed by. A client without a certificate, or with an unknown,
        expired or not yet valid one, is refused by the TLS handshake (the client sees
        UNAVAILABLE).

        Set tls_cert, tls_key and tls_client_ca together (with hub_tokens, tls_client_ca
        may be left out): one missing stops the Outpost at start-up with a one-line
        reason, as does an unreadable file or a key that does not belong to the
        certificate.""",
    )
    hub_identity_from = CaselessStrEnum(
        ["cn", "san"],
        default_value="cn",
        config=True,
        help="""Which name of a hub's client certificate is its hub identity (with mTLS):
        "cn", the subject's common name, or "san", its first DNS subjectAltName. A
        certificate without that name gets UNAUTHENTICATED.""",
    )
    hub_identity_map = Dict(
        value_trait=Unicode(),
        key_trait=Unicode(),
        config=True,
        help="""Certificate name -> hub name, for certificates whose CN (or SAN) is not the
        hub name to use, e.g. {"jupyterhub.example.org": "main"}. Names not in the map are
        the hub name as they are. A hub's servers are keyed by this name: changing it hides
        them from that hub.""",
    )
    allowed_hubs = List(
        Unicode(),
        config=True,
        help="""The hub names (after hub_identity_map) that may use this Outpost with mTLS.
        Empty (default): any hub whose certificate is signed by tls_client_ca. Others get
        UNAUTHENTICATED (reason UNAUTHENTICATED_HUB), with a message naming the hub.""",
    )
    hub_tokens = Dict(
        value_trait=Unicode(),
        key_trait=Unicode(),
        config=True,
        help="""Bearer tokens instead of (or on top of) client certificates, for sites without
        a PKI: hub name -> the SHA-256 hash of that hub's token, "sha256:<64 hex digits>".

        When set, every call must carry `authorization: Bearer <token>` metadata
        (c.OutpostSpawner.outpost_token) with one of these tokens, and the token names the
        hub; a missing, malformed or unknown token gets UNAUTHENTICATED (reason
        UNAUTHENTICATED_HUB). The token is never logged or echoed, and hashes are
        compared in constant time. With mTLS as well, the call needs both, and they must
        name the same hub. Tokens need TLS: tls_cert and tls_key (tls_client_ca is then
        optional), unless the Outpost listens on loopback or allow_plaintext is set (then
        a warning is logged). Over plaintext, default_hub is not used.

        A value that is not a hash, or the same token for two hubs, stops the Outpost at
        start-up with a one-line reason.

        Only hashes are stored. Make a random token and its hash with
            python -c "import secrets; print(secrets.token_urlsafe(32))" > hub-a.token
            jupyterhub-outpost hash-token < hub-a.token
        An unsalted SHA-256 is fine here because tokens are long random strings, not
        passwords (hash-token refuses tokens shorter than 32 characters).
        """,
    )

    db_url = Unicode(
        "sqlite:///outpost.sqlite",
        config=True,
        help="""The database URL (SQLAlchemy): sqlite:///path/file.sqlite (default, relative
        to the working directory), sqlite:////absolute/path/file.sqlite, or
        postgresql://user@host:5432/dbname. The asyncio drivers (aiosqlite, asyncpg) are
        picked for you.""",
    )

    db_timeout = Float(
        10.0,
        min=0.01,
        config=True,
        help="""Seconds a PostgreSQL connection attempt, one statement, or the wait for a
        pooled connection may take. Then the write fails and the RPC answers UNAVAILABLE
        (PERSISTENCE_UNAVAILABLE): a database host that stops answering must not hang
        Starts and Stops until TCP gives up. Poll, BatchPoll, ListServers and Events never
        wait for the database.""",
    )

    crypt_keys = List(
        Unicode(),
        config=True,
        help="""Fernet keys (32 url-safe base64-encoded bytes each) that encrypt each server's
        env (it holds the notebook's JUPYTERHUB_API_TOKEN) and Spawner state in the
        database. The first key encrypts, all of them decrypt: to rotate, put a new key
        first and keep the old ones until the Outpost has restarted once with them (each
        start-up rewrites older rows under the first key).

        Default: the OUTPOST_CRYPT_KEY environment variable (keys separated by ";", like
        JUPYTERHUB_CRYPT_KEY). Required: without a key, or with one that is not a Fernet
        key, the Outpost stops at start-up with a one-line reason (the key is never
        printed). Make one with
            python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"

        Encrypted values are stored in their JSON columns as {"fernet": "<token>"};
        progress events, user names, options and addresses are not encrypted.
        """,
    )

    @default("crypt_keys")
    def _crypt_keys_default(self):
        return parse_keys(os.environ.get(CRYPT_KEY_ENV, ""))

    crypt_key_file = Unicode(
        "",
        config=True,
        help="""A file with the crypt keys (one per line or ";"-separated, first key first;
        lines starting with # are ignored), used instead of crypt_keys and OUTPOST_CRYPT_KEY;
        setting both this and crypt_keys is an error. Keep it mode 0600: a file readable
        by group or others is used, with a warning.""",
    )

    spawner_class = EntryPointType(
        default_value=LocalProcessSpawner,
        klass=Spawner,
        entry_point_group="jupyterhub.spawners",
        config=True,
        help="""The JupyterHub Spawner class the Outpost hosts.

        A name registered under the jupyterhub.spawners entry point ("simple",
        "localprocess", "kubespawner", ...) or an import string
        ("batchspawner.SlurmSpawner"). Configure it exactly as in jupyterhub_config.py,
        e.g. c.LocalProcessSpawner.cmd = [...]. An unknown name stops the Outpost at
        start-up with one line naming it.
        """,
    )

    site_env_keys = List(
        Unicode(),
        default_value=list(DEFAULT_SITE_ENV_KEYS),
        config=True,
        help="""Environment keys the site keeps when the hub also sends them.

        The notebook's environment is the hosted Spawner's get_env() with the hub's env laid
        over it, except for these keys and the keys of the Spawner's own `environment`
        config: those keep the site's value.
        """,
    )

    allow_override = Any(
        False,
        config=True,
        help="""Which config_overrides a hub may send with Start (applied to that start only).

        False (default): none; a Start with overrides fails with PERMISSION_DENIED
        (reason OVERRIDE_NOT_ALLOWED), and the hub's user sees why. True: any
        configurable trait of the Spawner. A list of trait names: only those. A dict:
        hub name -> one of these (hubs it does not name may override nothing). A
        callable (hub, overrides) -> one of these, sync or async (raising refuses, with
        its message as the reason). An unknown trait or a value of the wrong type is
        INVALID_ARGUMENT.
        """,
    )

    start_message = Unicode(
        "",
        config=True,
        help="""A first progress message of every start, shown on the user's spawn page
        before the Spawner's own, e.g. "HPC Outpost: starting your server with
        {spawner_class}". {spawner_class} and {user} are filled in. Empty: none.""",
    )

    certs_dir = Unicode(
        "",
        config=True,
        help="""Where the Outpost writes the internal_ssl certificates hubs send with Start
        (a private directory, mode 0700; one subdirectory per start, removed at stop or
        failed start).
        Empty: <tmp>/jupyterhub-outpost-certs-<uid>. The certificates never go to the
        database.""",
    )

    poll_interval = Float(
        30.0,
        min=0.01,
        config=True,
        help="""Seconds between two polls of every running Spawner by the lifecycle manager.
        The Poll RPC answers from what the last poll saw.""",
    )
    poll_timeout = Float(
        60.0,
        min=0.01,
        config=True,
        help="""Seconds one Spawner's poll() may take before the server shows UNKNOWN (not
        stopped); a raising poll() makes it UNKNOWN at once.

        A poll() is never cancelled (batchspawner would read a cancelled squeue as "job
        gone"): it goes on, its answer still counts, and that server is not polled again
        until it answers. A round of polls never waits for a slow one.
        """,
    )
    poll_concurrency = Integer(32, min=1, config=True, help="How many Spawner polls run at the same time.")
    max_concurrent_starts_per_hub = Integer(
        32,
        min=0,
        config=True,
        help="""How many servers of one hub may be starting at the same time (0: no limit).

        A Start beyond it is answered at once with RESOURCE_EXHAUSTED (reason
        TOO_MANY_STARTS, metadata limit) and leaves nothing behind: nothing is started or
        stored. A slot frees when a start becomes RUNNING, fails or is stopped; the hub's
        user may then try again.
        Retrying a start already accepted (same start_id) is never refused. The limit
        is per hub, so one hub flooding Starts does not keep the others from starting.
        """,
    )
    max_events_per_server = Integer(
        200,
        min=1,
        config=True,
        help="Progress events kept per server (oldest dropped first; the terminal event is always kept).",
    )
    max_message_bytes = Integer(
        4 * 1024 * 1024,
        min=64 * 1024,
        config=True,
        help="""The largest request the Outpost accepts, in bytes; larger ones get
        RESOURCE_EXHAUSTED and nothing else is affected.""",
    )
    max_struct_depth = Integer(
        16,
        min=1,
        config=True,
        help="""How deeply user_options and config_overrides may nest; deeper gets
        INVALID_ARGUMENT. Protobuf itself refuses more than 100 levels of message nesting;
        the Outpost answers that with INVALID_ARGUMENT (field request) too.""",
    )
    shutdown_grace = Float(
        10.0,
        min=0,
        config=True,
        help="""Seconds in-flight RPCs and pending starts get on SIGTERM or SIGINT.

        Running notebooks are never stopped by a shutdown; their state is persisted.
        """,
    )

    @default("log_level")
    def _log_level_default(self):
        return logging.INFO

    @default("log_format")
    def _log_format_default(self):
        return "%(color)s[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s]%(end_color)s %(message)s"

    @validate("hub_tokens")
    def _check_hub_tokens(self, proposal):
        # never put a value in the message: it may be a raw token pasted by mistake
        seen: dict[str, str] = {}
        for hub, value in proposal.value.items():
            if not hub:
                raise TraitError("hub_tokens: a hub name must not be empty")
            value = value.strip().lower()
            if not TOKEN_HASH.match(value):
                raise TraitError(
                    f"hub_tokens[{hub!r}] is not a token hash (\"sha256:<64 hex digits>\"); store "
                    "the hash, never the token: `jupyterhub-outpost hash-token < token-file` prints it"
                )
            if value in seen:
                raise TraitError(f"hub_tokens: hubs {seen[value]!r} and {hub!r} have the same token")
            seen[value] = hub
        return {hub: value for value, hub in seen.items()}

    @validate("allow_override")
    def _check_allow_override(self, proposal):
        try:
            return check_policy(proposal.value)
        except ValueError as e:
            raise TraitError(str(e)) from None

    @property
    def classes(self):
        spawner = self.spawner_class if isinstance(self.spawner_class, type) else LocalProcessSpawner
        return [Outpost, SSHForwarder, HubAPIRelay, spawner]

    # --- start-up -------------------------------------------------------------------

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.generate_config or self.subapp is not None:
            return
        self.load_config_file(self.config_file)
        # command-line options win over the config file
        if self.cli_config:
            self.update_config(self.cli_config)
        self.init_logging()
        self.check_tls()
        self.check_network()
        self.check_forwarder()
        self.make_relay()  # a bad c.HubAPIRelay value stops start-up here (TraitError)
        self.check_crypt()

    def init_logging(self):
        self.log.propagate = False
        for name in ("outpost", "traitlets"):
            logger = logging.getLogger(name)
            logger.setLevel(self.log_level)
            logger.handlers = self.log.handlers
            logger.propagate = False
        logging.getLogger().setLevel(self.log_level)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_client_ca)

    def load_tls(self):
        """The server's TLS files, checked (TLSConfigError with a one-line message)."""
        missing = [name for name in ("tls_cert", "tls_key", "tls_client_ca") if not getattr(self, name)]
        if self.hub_tokens and "tls_client_ca" in missing:
            # TLS without client certificates: hubs authenticate with bearer tokens
            missing.remove("tls_client_ca")
            if missing:
                raise TLSConfigError(
                    f"TLS needs tls_cert and tls_key (and tls_client_ca for mTLS); {', '.join(missing)} not set"
                )
        if missing:
            hint = " (TLS without client certificates needs hub_tokens)" if missing == ["tls_client_ca"] else ""
            raise TLSConfigError(
                f"mTLS needs tls_cert, tls_key and tls_client_ca; {', '.join(missing)} not set{hint}"
            )
        # without tls_client_ca (token mode) tls_cert stands in for it, so that load_server_tls's
        # checks run unchanged; server_credentials() then asks for no client certificate
        return load_server_tls(self.tls_cert, self.tls_key, self.tls_client_ca or self.tls_cert)

    def server_credentials(self, tls) -> grpc.ServerCredentials:
        if self.tls_client_ca:
            return tls.credentials()  # mTLS: the handshake requires a client certificate
        return grpc.ssl_server_credentials([(tls.key, tls.cert)])

    def check_tls(self):
        """Fail before anything starts if the TLS files are unusable."""
        if not self.tls_enabled:
            return
        try:
            self.load_tls()
        except TLSConfigError as e:
            raise one_line_exit(e) from None

    def check_network(self):
        if not _is_loopback(self.ip) and not self.allow_plaintext and not self.tls_enabled:
            raise SystemExit(
                f"jupyterhub-outpost: refusing to serve plaintext gRPC on {self.ip}: "
                "use a loopback address, or --allow-plaintext behind a trusted network"
            )
        if self.hub_tokens and not self.tls_enabled and not _is_loopback(self.ip):
            self.log.warning(
                "Serving hub_tokens over plaintext on %s (allow_plaintext): the tokens travel "
                "unencrypted; set tls_cert and tls_key",
                self.ip,
            )

    crypt: Crypt | None = None

    def make_crypt(self) -> Crypt:
        """The database's keys, checked (CryptConfigError with a one-line message)."""
        if self.crypt_key_file:
            if "crypt_keys" in self.config.Outpost:
                raise CryptConfigError("set c.Outpost.crypt_keys or c.Outpost.crypt_key_file, not both")
            path = self.crypt_key_file
            crypt = Crypt(read_key_file(path), source=f"crypt_key_file {path}")
            warning = key_file_warning(path)
            if warning:
                self.log.warning(warning)
            return crypt
        configured = "crypt_keys" in self.config.Outpost
        return Crypt(self.crypt_keys, source="c.Outpost.crypt_keys" if configured else CRYPT_KEY_ENV)

    def check_crypt(self):
        """Fail before anything starts without a usable key for the database."""
        try:
            self.crypt = self.make_crypt()
        except CryptConfigError as e:
            raise one_line_exit(e) from None

    def check_forwarder(self):
        """Fail before anything starts if the SSH forwarder's keys are unusable."""
        forwarder = SSHForwarder(parent=self)
        if not forwarder.enabled:
            return
        try:
            forwarder.load_keys()
        except ForwarderConfigError as e:
            raise one_line_exit(e) from None
        self.forwarder = forwarder

    async def init_store(self):
        if self.crypt is None:  # not checked by initialize() (an Outpost made in-process)
            self.crypt = self.make_crypt()
        self.store = Store(
            self.db_url,
            max_events_per_server=self.max_events_per_server,
            crypt=self.crypt,
            timeout=self.db_timeout,
        )
        await self.store.open()

    def make_relay(self) -> HubAPIRelay | None:
        """The hub API relay if it is enabled (made once)."""
        if self.relay is None:
            relay = HubAPIRelay(parent=self)
            if not relay.enabled:
                return None
            self.relay = relay
        return self.relay

    async def init_manager(self):
        relay = self.make_relay()
        spawners = SpawnerFactory(
            self.spawner_class,
            self.config,
            site_env_keys=frozenset(self.site_env_keys),
            on_created=None if relay is None else (lambda rec, spawner: relay.attach(spawner, rec.hub, rec.name)),
        )
        self.manager = LifecycleManager(
            self.store, spawners, ManagerSettings.from_traits(self), OverridePolicy(self.allow_override)
        )

    async def init_relay(self):
        # before the servers are restored: a start the manager restores or accepts may
        # wait for its notebook's callback; stopped after the manager, so pending starts
        # still get it
        relay = self.make_relay()
        if relay is None:
            return
        records = self.manager.records
        await relay.start(lambda hub, server_name: records.get((hub, server_name)))
        self.log.info(
            "Hub API relay listening on %s:%d; notebooks reach it at %s", relay.ip, relay.bound_port, relay.base_url
        )

    async def init_servers(self):
        """Restore every server from the database, then poll them on the manager's schedule."""
        restored = await self.manager.restore()
        if restored:
            self.log.info("Restored %d servers from the database", restored)
        self.manager.start_polling()

    async def init_server(self):
        if self.tls_enabled:
            tls = self.load_tls()
            for warning in tls.warnings:
                self.log.warning(warning)
        resolver, mode = auth_mode(
            tls=self.tls_enabled,
            client_ca=bool(self.tls_client_ca),
            hub_tokens=self.hub_tokens,
            identity_from=self.hub_identity_from,
            identity_map=self.hub_identity_map,
            allowed_hubs=self.allowed_hubs,
            default_hub=self.default_hub,
        )
        self.server = grpc.aio.server(
            interceptors=[OutpostInterceptor(resolver)],
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        outpost_pb2_grpc.add_OutpostServiceServicer_to_server(
            OutpostServicer(self.manager, max_struct_depth=self.max_struct_depth), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{self.ip}:{self.port}" if ":" not in self.ip else f"[{self.ip}]:{self.port}"
        if self.tls_enabled:
            self.bound_port = self.server.add_secure_port(address, self.server_credentials(tls))
        else:
            self.bound_port = self.server.add_insecure_port(address)
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        # a line tests and scripts can wait for
        self.log.info(
            "Outpost %s serving %s on %s:%d (%s) with %s",
            __version__,
            SERVICE_NAME,
            self.ip,
            self.bound_port,
            mode,
            self.spawner_class.__name__,
        )

    async def init_forwarder(self):
        # SSH is authenticated (by key), so the plaintext-on-loopback rule does not apply
        forwarder = self.forwarder if self.forwarder is not None else SSHForwarder(parent=self)
        if not forwarder.enabled:
            return
        self.forwarder = forwarder
        await forwarder.start(self.manager.forward_targets)
        self.log.info(
            "SSH forwarder listening on %s:%d (host key fingerprint %s)",
            forwarder.ip,
            forwarder.bound_port,
            forwarder.host_key.get_fingerprint(),
        )

    async def setup(self):
        """Every start-up step, in order: database, lifecycle manager, hub API relay,
        restored servers, gRPC server, SSH forwarder.

        What start() runs before it waits for a signal, and what an in-process Outpost
        (tests, benchmarks) runs instead of start(). A step that fails tears down the
        steps before it (cleanup()) and raises: RelayConfigError, TLSConfigError and
        ForwarderConfigError carry a one-line message for the operator.
        """
        try:
            await self.init_store()
            await self.init_manager()
            await self.init_relay()
            await self.init_servers()
            await self.init_server()  # TLS files may have changed since check_tls
            await self.init_forwarder()
        except BaseException:
            await self.cleanup()
            raise

    async def start(self):
        if self.subapp is not None:
            return self.subapp.start()
        if self.generate_config:
            self.write_config_file()
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.setup()
        except (RelayConfigError, TLSConfigError, ForwarderConfigError) as e:
            raise one_line_exit(e) from None
        try:
            await stop.wait()
            self.log.info("Shutting down: health NOT_SERVING, finishing in-flight RPCs")
        finally:
            await self.cleanup()
        self.log.info("Outpost stopped; running notebooks keep running")

    async def cleanup(self):
        """Teardown in reverse order of setup() (any step may not have run; safe twice)."""
        health, self.health = self.health, None
        if health is not None:
            for service in ("", SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.forwarder is not None:
            await self.forwarder.stop()
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.shutdown_grace)
        manager, self.manager = self.manager, None
        if manager is not None:
            await manager.shutdown(self.shutdown_grace)
        if self.relay is not None:
            await self.relay.stop()
        store, self.store = self.store, None
        if store is not None:
            await store.close()

    def write_config_file(self):
        path = self.config_file
        if os.path.exists(path):
            print(f"{path} exists; not overwriting it", file=sys.stderr)
            self.exit(1)
        with open(path, "w") as f:
            f.write(self.generate_config_file())
        os.chmod(path, 0o600)
        print(f"Wrote default config file to {path}")

    @classmethod
    def launch_instance(cls, argv=None, **kwargs):
        app = cls.instance(**kwargs)
        try:
            app.initialize(argv)
        except TraitError as e:
            print(f"jupyterhub-outpost: configuration error: {e}", file=sys.stderr)
            sys.exit(1)
        asyncio.run(app.start())


class HashToken(Application):
    """The `hash-token` subcommand: a hub's bearer token in (stdin), its hash out."""

    name = "jupyterhub-outpost hash-token"
    version = __version__
    description = """Read a hub's bearer token from stdin (its first line) and print the hash
    to put in c.Outpost.hub_tokens. The token itself goes to that hub only
    (c.OutpostSpawner.outpost_token); the Outpost keeps only the hash."""
    examples = """
    python -c "import secrets; print(secrets.token_urlsafe(32))" > hub-a.token
    jupyterhub-outpost hash-token < hub-a.token
    """
    aliases = {}
    flags = {}
    min_length = 32

    def start(self):
        token = sys.stdin.readline().strip()
        if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
            raise SystemExit(f"{self.name}: a token is printable ASCII without spaces (it is sent as gRPC metadata)")
        if len(token) < self.min_length:
            raise SystemExit(
                f"{self.name}: give a random token of at least {self.min_length} characters on stdin, "
                'e.g. from python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        print(hash_token(token))


main = Outpost.launch_instance


if __name__ == "__main__":
    main()
