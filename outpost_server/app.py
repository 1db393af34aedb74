"""The `jupyterhub-outpost` application: configuration, start-up and shutdown.

Reads like JupyterHub's own: a traitlets Application with `outpost_config.py`,
`--generate-config`, `init_*` steps in order and teardown in reverse.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import resource
import signal
import sys
from functools import partial

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from jupyterhub.spawner import LocalProcessSpawner
from traitlets import (
    Bool,
    TraitError,
    Unicode,
    default,
)
from tornado.log import LogFormatter
from traitlets.config import Application

from outpost_client.client import is_local_address
from outpost_client.v1 import outpost_pb2, outpost_pb2_grpc

from . import __version__
from .accounts import AccountsConfigError
from .crypto import ENV_VAR as CRYPT_KEY_ENV
from .crypto import Crypt, CryptConfigError
from .forwarder import ForwarderConfigError, SSHForwarder, split_host_port
from .identity import (
    AuthConfigError,
    RevokedCertificates,
    auth_mode,
    hash_token,
    pem_fingerprint,
    show_fingerprint,
    unauthenticated_refusal,
)
from .interceptors import OutpostInterceptor
from .migrations import DatabaseSchemaError, SchemaOutdated
from .manager import LifecycleManager, ManagerSettings, StartPolicies
from .flavors import FlavorConfigError, FlavorSet
from .metrics import MetricsServer
from .options import (
    ConnectionOptions,
    FlavorOptions,
    HostingOptions,
    MetricsOptions,
    OutputTailOptions,
    StorageOptions,
)
from .policy import auth_state_policy, env_policy, override_policy, user_options_policy
from .relay import HubAPIRelay, RelayConfigError
from .servicer import OutpostServicer
from .spawners import SpawnerFactory
from .store import Store
from .tls import TLSConfigError

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
    "allow-unauthenticated": (
        {"Outpost": {"allow_unauthenticated": True}},
        "Serve callers without credentials as the default hub (only where nobody else can reach the port).",
    ),
    "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log at DEBUG level."),
}


class MetricsConfigError(ValueError):
    """The metrics endpoint cannot listen (a one-line message for the operator)."""


def one_line_exit(error: Exception) -> SystemExit:
    """How a configuration error ends start-up: one line on stderr, exit status 1."""
    return SystemExit(f"jupyterhub-outpost: {error}")


class Outpost(
    ConnectionOptions, StorageOptions, HostingOptions, FlavorOptions, MetricsOptions, OutputTailOptions, Application
):
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
    jupyterhub-outpost --port 50051 --spawner-class simple --allow-unauthenticated   # a laptop: no credentials
    jupyterhub-outpost -f /etc/outpost/outpost_config.py
    jupyterhub-outpost upgrade-db -f /etc/outpost/outpost_config.py
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
        "upgrade-db": (
            "outpost_server.app.UpgradeDB",
            "Upgrade the Outpost's database to this version's schema (a SQLite file is backed up first).",
        ),
        "fingerprint": (
            "outpost_server.app.Fingerprint",
            "Print the SHA-256 fingerprint of certificates (PEM files), for c.Outpost.revoked_certificates.",
        ),
    }
    raise_config_file_errors = True
    _log_formatter_cls = LogFormatter
    forwarder: SSHForwarder | None = None
    relay: HubAPIRelay | None = None
    store: Store | None = None
    manager: LifecycleManager | None = None
    server: grpc.aio.Server | None = None
    health_server: grpc.aio.Server | None = None
    health_bound_port: int | None = None
    health: health.aio.HealthServicer | None = None
    metrics_server: MetricsServer | None = None

    config_file = Unicode(
        "outpost_config.py", config=True, help="The config file to load (Python, like jupyterhub_config.py)."
    )
    generate_config = Bool(False, config=True, help="Write a default config file and exit.")

    @default("log_level")
    def _log_level_default(self):
        return logging.INFO

    @default("log_format")
    def _log_format_default(self):
        return "%(color)s[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s]%(end_color)s %(message)s"

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
        self.check_accounts()
        self.make_relay()  # a bad c.HubAPIRelay value stops start-up here (TraitError)
        self.check_crypt()
        self.check_authentication()
        self.check_flavors()

    def init_logging(self):
        self.log.propagate = False
        for name in ("outpost", "traitlets"):
            logger = logging.getLogger(name)
            logger.setLevel(self.log_level)
            logger.handlers = self.log.handlers
            logger.propagate = False
        logging.getLogger().setLevel(self.log_level)

    def check_tls(self):
        """Fail before anything starts if the TLS files are unusable."""
        if not self.tls_enabled:
            return
        try:
            self.load_tls()
        except TLSConfigError as e:
            raise one_line_exit(e) from None

    def check_network(self):
        if not is_local_address(self.ip) and not self.allow_plaintext and not self.tls_enabled:
            raise SystemExit(
                f"jupyterhub-outpost: refusing to serve plaintext gRPC on {self.ip}: "
                "use a loopback address, or --allow-plaintext behind a trusted network"
            )
        if self.hub_tokens and not self.tls_enabled and not is_local_address(self.ip):
            self.log.warning(
                "Serving hub_tokens over plaintext on %s (allow_plaintext): the tokens travel "
                "unencrypted; set tls_cert and tls_key",
                self.ip,
            )

    def check_authentication(self):
        """Fail before anything starts if nothing would authenticate hubs (plaintext
        without hub_tokens needs allow_unauthenticated), or the revocation list is unusable."""
        try:
            self.auth_resolver()
        except AuthConfigError as e:
            raise one_line_exit(e) from None

    def auth_resolver(self):
        """The hub resolver of the configured auth mode and its description
        (AuthConfigError with a one-line message)."""
        refusal = unauthenticated_refusal(
            ip=self.ip,
            tls=self.tls_enabled,
            hub_tokens=self.hub_tokens,
            allow_unauthenticated=self.allow_unauthenticated,
            default_hub=self.default_hub,
        )
        if refusal:
            raise AuthConfigError(refusal)
        return auth_mode(
            tls=self.tls_enabled,
            client_ca=bool(self.tls_client_ca),
            hub_tokens=self.hub_tokens,
            identity_from=self.hub_identity_from,
            identity_map=self.hub_identity_map,
            allowed_hubs=self.allowed_hubs,
            default_hub=self.default_hub,
            revoked=RevokedCertificates(self.revoked_certificates, self.revoked_certificates_file),
        )

    crypt: Crypt | None = None
    flavor_config: FlavorSet | None = None

    def check_flavors(self):
        """Fail before anything starts if a flavor is malformed (one line naming it)."""
        try:
            self.flavor_config = self.flavor_set()
        except FlavorConfigError as e:
            raise one_line_exit(e) from None

    def reload_flavors(self) -> bool:
        """Read the flavors again (SIGHUP): new starts are admitted under them, running
        servers keep theirs. A bad file is logged and the flavors before it kept."""
        try:
            flavors = self.flavor_set()
        except FlavorConfigError as e:
            before = len(self.flavor_config) if self.flavor_config is not None else 0
            self.log.error("Flavors not reloaded, keeping the %d before: %s", before, e)
            return False
        self.flavor_config = flavors
        if self.manager is not None:
            self.manager.flavors = flavors
        self.log.info("Flavors reloaded: %s", ", ".join(flavors.by_name) or "none")
        return True

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

    def check_accounts(self):
        """Fail before anything starts if no user_mapping is set and several hubs can call."""
        try:
            self.make_account_policy()
        except AccountsConfigError as e:
            raise one_line_exit(e) from None

    def make_account_policy(self):
        forwarder = self.forwarder if self.forwarder is not None else SSHForwarder(parent=self)
        return self.account_policy(forwarder_hubs=forwarder.authorized_keys if forwarder.enabled else ())

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
        policies = StartPolicies(
            overrides=override_policy(self.allow_override),
            env=env_policy(self.allow_env),
            user_options=user_options_policy(self.allow_user_options),
            accounts=self.make_account_policy(),
            auth_state=auth_state_policy(self.allow_auth_state, tls=self.tls_enabled),
        )
        if self.allow_auth_state is not False and not self.tls_enabled:
            self.log.warning(
                "c.Outpost.allow_auth_state is set, but this Outpost serves plaintext: it refuses "
                "every auth_state (the user's credentials travel only over TLS)"
            )
        if self.flavor_config is None:  # not checked by initialize() (an Outpost made in-process)
            self.flavor_config = self.flavor_set()
        self.manager = LifecycleManager(
            self.store, spawners, ManagerSettings.from_traits(self), policies, flavors=self.flavor_config,
            tails=self.output_tails(self.state_dir),
        )

    async def init_relay(self):
        # before the servers are restored: a start the manager restores or accepts may
        # wait for its notebook's callback; stopped after the manager, so pending starts
        # still get it
        relay = self.make_relay()
        if relay is None:
            return
        records = self.manager.records
        # a hub's upstream defaults to its reverse forward (init_forwarder runs later)
        forwarder = self.forwarder if self.forwarder is not None else SSHForwarder(parent=self)
        relay.own_ports = partial(self.own_ports, forwarder)  # asked at each report: ports bound later count
        await relay.start(
            lambda hub, server_name: records.get((hub, server_name)),
            reverse_listen=forwarder.reverse_listen if forwarder.enabled else {},
        )
        self.log.info(
            "Hub API relay listening on %s:%d; notebooks reach it at %s", relay.ip, relay.bound_port, relay.base_url
        )

    def own_ports(self, forwarder: SSHForwarder) -> set[int]:
        """Every port this Outpost listens on (as bound, or as configured before it is):
        a notebook's reported late address may not name one of them (relay.py)."""
        ports = {getattr(self, "bound_port", None) or self.port, self.health_bound_port or self.health_port}
        if self.metrics_server is not None:
            ports.add(self.metrics_server.bound_port)
        forwarder = self.forwarder or forwarder  # the one that runs, once it does
        if forwarder.enabled:
            ports.add(forwarder.bound_port or forwarder.port)
            for addresses in forwarder.reverse_listen.values():
                ports.update(split_host_port(address)[1] for address in addresses)
        return {port for port in ports if port}

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
        resolver, mode = self.auth_resolver()  # an Outpost made in-process is checked here
        self.server = grpc.aio.server(
            interceptors=[OutpostInterceptor(resolver)],
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        outpost_pb2_grpc.add_OutpostServiceServicer_to_server(
            OutpostServicer(
                self.manager, max_struct_depth=self.max_struct_depth, max_auth_state_bytes=self.max_auth_state_bytes
            ),
            self.server,
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
        if self.health_port is not None:
            await self.init_health_port()
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

    async def init_health_port(self):
        """The plaintext health-only port (health_port): the same health servicer, no
        interceptor, no other service, few streams per connection (Watch)."""
        self.health_server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 4)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        ip = self.health_ip
        address = f"{ip}:{self.health_port}" if ":" not in ip else f"[{ip}]:{self.health_port}"
        self.health_bound_port = self.health_server.add_insecure_port(address)
        await self.health_server.start()
        self.log.info("Health service (only) in plaintext on %s:%d", ip, self.health_bound_port)

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

    async def init_metrics(self):
        """The Prometheus endpoint, if metrics_port is set. First: a port in use stops
        start-up before anything serves; the gauges read the other parts when scraped,
        and skip those not there yet."""
        if not self.metrics_port:
            return
        server = MetricsServer(self, self.metrics_ip, self.metrics_port)
        try:
            await server.start()
        except OSError as e:
            raise MetricsConfigError(
                f"the metrics endpoint cannot listen on {self.metrics_ip}:{self.metrics_port} ({e.strerror or e}); "
                "change c.Outpost.metrics_port or metrics_ip, or set metrics_port = 0"
            ) from None
        self.metrics_server = server
        self.log.info("Prometheus metrics at http://%s:%d/metrics", self.metrics_ip, server.bound_port)

    async def setup(self):
        """Every start-up step, in order: metrics endpoint, database, lifecycle manager,
        hub API relay, restored servers, gRPC server, SSH forwarder.

        What start() runs before it waits for a signal, and what an in-process Outpost
        (tests, benchmarks) runs instead of start(). A step that fails tears down the
        steps before it (cleanup()) and raises: RelayConfigError, TLSConfigError,
        ForwarderConfigError, AuthConfigError, AccountsConfigError and MetricsConfigError
        carry a one-line message for the operator.
        """
        raise_open_files_limit(self.log)
        try:
            await self.init_metrics()
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
            result = self.subapp.start()
            if inspect.isawaitable(result):  # upgrade-db
                await result
            return
        if self.generate_config:
            self.write_config_file()
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # flavors_file again on SIGHUP (what systemd's ExecReload sends), never the default
        # action (exit), also during start-up
        loop.add_signal_handler(signal.SIGHUP, self.reload_flavors)
        try:
            await self.setup()
        except (
            RelayConfigError, TLSConfigError, ForwarderConfigError, AuthConfigError, AccountsConfigError,
            FlavorConfigError, DatabaseSchemaError, MetricsConfigError,
        ) as e:  # fmt: skip
            if isinstance(e, SchemaOutdated):  # name the config file in the command
                e = SchemaOutdated(e.current, e.head, self.config_file)
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
        health_server, self.health_server = self.health_server, None
        if health_server is not None:
            await health_server.stop(0)
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
        metrics_server, self.metrics_server = self.metrics_server, None
        if metrics_server is not None:
            await metrics_server.stop()

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
        forget_secret_env()
        asyncio.run(app.start())


def raise_open_files_limit(log: logging.Logger) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; answer (soft before, soft now).

    Notebooks' connections to the hub API relay, SSH channels and gRPC connections all
    share the process's file descriptors; a distribution's default soft limit (often
    1024) would let a few hundred idle relay connections starve gRPC of sockets. The
    relay caps its own connections (HubAPIRelay.max_connections) well below this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # no hard limit: a million is plenty (some systems refuse an infinite soft limit)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("Could not raise the open-files limit from %d to %d (%s)", soft, target, e)
        return soft, soft
    log.info("Raised the open-files limit (RLIMIT_NOFILE) from %d to %d", soft, target)
    return soft, target


#: secrets the Outpost may read from its environment
SECRET_ENV = (CRYPT_KEY_ENV,)


def forget_secret_env() -> None:
    """Remove the secrets the Outpost has read (the database key) from its environment.

    Everything the process starts inherits its environment unless told otherwise:
    batchspawner runs squeue and scancel as the notebook's user with it, and a hosted
    Spawner's own commands may too. Called once the configuration is read (the key is in
    the application's crypt by then); a restart reads it again from the service's own
    environment (systemd, the container).
    """
    for name in SECRET_ENV:
        os.environ.pop(name, None)


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


class UpgradeDB(Application):
    """The `upgrade-db` subcommand: the database of the Outpost's config to this version's
    schema (migrations/)."""

    name = "jupyterhub-outpost upgrade-db"
    version = __version__
    description = """Upgrade the Outpost's database (c.Outpost.db_url of its config file) to
    the schema of this version; an Outpost refuses to start on an older one. Stop every
    Outpost using the database first. A SQLite file is backed up first, next to it
    (outpost.sqlite.YYYY-mm-dd-HHMMSS); back up a PostgreSQL database yourself. A
    database at this schema already is left as it is."""
    examples = """
    jupyterhub-outpost upgrade-db -f /etc/outpost/outpost_config.py
    jupyterhub-outpost upgrade-db --db-url postgresql://outpost@db.example.org/outpost
    """
    aliases = {
        "f": "Outpost.config_file",
        "config": "Outpost.config_file",
        "db-url": "Outpost.db_url",
        "log-level": "Application.log_level",
    }
    flags = {}

    async def start(self):
        from .migrations import upgrade_database

        outpost = Outpost(parent=self)
        outpost.load_config_file(outpost.config_file)
        if self.cli_config:  # command-line options win over the config file
            outpost.update_config(self.cli_config)
        try:
            await upgrade_database(outpost.db_url)
        except (DatabaseSchemaError, LookupError) as e:
            raise SystemExit(f"{self.name}: {e}") from None


class Fingerprint(Application):
    """The `fingerprint` subcommand: certificates in (PEM files), fingerprints out."""

    name = "jupyterhub-outpost fingerprint"
    version = __version__
    description = """Print the SHA-256 fingerprint of each certificate given (PEM files), as
    c.Outpost.revoked_certificates takes it, with its subject and expiry. To revoke a hub's
    certificate, add its fingerprint to revoked_certificates (restart) or to
    revoked_certificates_file (no restart)."""
    examples = """
    jupyterhub-outpost fingerprint certs/hub-a/hub-a.crt
    jupyterhub-outpost fingerprint certs/hub-a/hub-a.crt >> /etc/outpost/revoked
    """
    aliases = {}
    flags = {}

    def start(self):
        from cryptography import x509

        if not self.extra_args:
            raise SystemExit(f"{self.name}: give one or more certificate files (PEM)")
        for path in self.extra_args:
            try:
                with open(path, "rb") as f:
                    pem = f.read()
                fingerprint = pem_fingerprint(pem)
                cert = x509.load_pem_x509_certificate(pem)
            except OSError as e:
                raise SystemExit(f"{self.name}: cannot read {path}: {e.strerror}") from None
            except ValueError:
                raise SystemExit(f"{self.name}: {path} holds no PEM certificate") from None
            expires = cert.not_valid_after_utc.strftime("%Y-%m-%d")
            print(f"{show_fingerprint(fingerprint)}  # {path}: {cert.subject.rfc4514_string()}, expires {expires}")


main = Outpost.launch_instance


if __name__ == "__main__":
    main()
