"""The options of the `jupyterhub-outpost` application, by concern.

Each group is a traits mixin of :class:`outpost_server.app.Outpost` (plain ``HasTraits``,
not a Configurable): every option is still ``c.Outpost.<name>``, and ``--generate-config``
and docs/config-reference.md list them under ``Outpost``. What follows from the options
alone (the TLS files, the database keys) is worked out here too; the application
decides when.
"""

from __future__ import annotations

import os

import grpc
from jupyterhub.spawner import LocalProcessSpawner, Spawner
from jupyterhub.traitlets import EntryPointType
from traitlets import (
    Any,
    Bool,
    CaselessStrEnum,
    Dict,
    Enum,
    Float,
    HasTraits,
    Integer,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)

from .accounts import AccountPolicy, check_mapping, configured_hubs, default_mapping, read_login_defs
from .crypto import ENV_VAR as CRYPT_KEY_ENV
from .crypto import Crypt, CryptConfigError, key_file_warning, parse_keys, read_key_file
from .flavors import FlavorConfigError, FlavorSet
from .hosting import DEFAULT_SITE_ENV_KEYS
from .identity import TOKEN_HASH, normalize_fingerprint
from .policy import check_policy
from .tls import TLSConfigError, load_server_tls


class ConnectionOptions(HasTraits):
    """Where the gRPC server listens, and how a connection names its hub (mTLS, tokens,
    plaintext loopback)."""

    ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the gRPC server listens on.

        Plaintext is served only on a loopback address unless allow_plaintext is set;
        with mTLS (tls_cert, tls_key, tls_client_ca), or TLS with hub_tokens, any address
        is fine. Plaintext without hub_tokens also needs allow_unauthenticated.
        """,
    )
    port = Integer(50051, min=0, max=65535, config=True, help="The port the gRPC server listens on (0: any free port).")
    health_port = Integer(
        None,
        allow_none=True,
        min=0,
        max=65535,
        config=True,
        help="""A second, plaintext port that serves only the gRPC health service
        (grpc.health.v1.Health), for probes that cannot present TLS or a client
        certificate: Kubernetes' native gRPC probes, a container's health check.

        None (default): no such port; the health service is on the main port only. It
        answers nothing but SERVING / NOT_SERVING for "" and
        jupyterhub.outpost.v1.OutpostService (no reflection, no Outpost RPCs), on
        health_ip. 0 picks any free port.""",
    )
    health_ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the health port (health_port) listens on. A Kubernetes probe
        comes from the node, so a pod sets 0.0.0.0; on a host, keep loopback.""",
    )
    allow_plaintext = Bool(
        False,
        config=True,
        help="""Serve plaintext gRPC on a non-loopback address.

        Without it, the Outpost refuses to start with plaintext on any other address, with
        a one-line reason. Without TLS anyone who can reach the port can start servers as
        the default hub; only set this behind a network you trust.
        """,
    )
    allow_unauthenticated = Bool(
        False,
        config=True,
        help="""Serve callers that present no credentials at all (plaintext gRPC without
        hub_tokens): every connection is then default_hub.

        Off by default, and the Outpost refuses to start without credentials, with a
        one-line reason: even on a loopback address every local user, and every notebook a
        LocalProcessSpawner runs on this host, can reach the port and would be the default
        hub (start, poll and stop its servers). Set it only where nobody else can open a
        connection to the port (tests, a single-user laptop); off loopback it also needs
        allow_plaintext. Otherwise use mTLS (tls_cert, tls_key, tls_client_ca) or
        hub_tokens, which work over loopback plaintext without this option.
        """,
    )
    default_hub = Unicode(
        "default",
        config=True,
        help="""The hub identity of plaintext connections.

        A server is identified by (hub, server_name); with mTLS the hub identity comes
        from the client certificate, with hub_tokens from the token, and on plaintext
        connections without hub_tokens (allow_unauthenticated) it is this name. The
        identity always comes from the connection, never from a request.
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
    revoked_certificates = List(
        Unicode(),
        config=True,
        help="""SHA-256 fingerprints of hub client certificates that are revoked (mTLS): a
        call over a connection with one of them gets UNAUTHENTICATED (reason
        CERTIFICATE_REVOKED) and is logged, while every other hub is served as before. This
        revokes one hub (a stolen key) without a new CA for everyone.

        A fingerprint is the SHA-256 of the certificate (DER), as `jupyterhub-outpost
        fingerprint CERT.pem` or `openssl x509 -noout -fingerprint -sha256 -in CERT.pem`
        prints it: 64 hex digits, with or without colons and a "SHA256:" prefix, in either
        case. Anything else stops the Outpost at start-up with a one-line reason, as does a
        list with no client certificates to check (no tls_client_ca). gRPC's Python server
        takes no CRL, hence fingerprints. See also revoked_certificates_file.""",
    )
    revoked_certificates_file = Unicode(
        "",
        config=True,
        help="""A file of revoked client certificate fingerprints (as in revoked_certificates),
        one a line; # starts a comment (`jupyterhub-outpost fingerprint CERT >> FILE` adds
        one). Read at start-up
        (it must exist then) and again whenever it changes, so a revocation added to the
        file takes effect from the next call, without a restart. A file that becomes
        unreadable or malformed keeps the last list it had, and that is logged.""",
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

    @validate("revoked_certificates")
    def _check_revoked_certificates(self, proposal):
        try:
            return [normalize_fingerprint(value) for value in proposal.value]
        except ValueError as e:
            raise TraitError(f"revoked_certificates: {e}") from None

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


class MetricsOptions(HasTraits):
    """Prometheus metrics on an HTTP port of their own (metrics.py); off by default."""

    metrics_port = Integer(
        0,
        min=0,
        max=65535,
        config=True,
        help="""The port of the Prometheus metrics endpoint (GET /metrics, plain HTTP); 0: no
        metrics (the default: no port is opened and nothing is recorded).

        The metrics name hubs (the site's own configuration), count servers by hub and
        state, and time RPCs, starts, database writes, SSH forwards and relay requests;
        they never name users or servers. Anyone who can reach the port reads them: keep
        metrics_ip on loopback, or let only the scraper reach it (a NetworkPolicy, a
        firewall). See docs/deploy.md, "Metrics".
        """,
    )
    metrics_ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""The address the metrics endpoint listens on (with metrics_port).

        Loopback by default: every local user of this host can read it there, nobody
        else. In a container scraped from its pod address use "0.0.0.0" (or "::") and
        let only the scraper reach the port.
        """,
    )


class StorageOptions(HasTraits):
    """The database, and the keys that encrypt its secret columns."""

    db_url = Unicode(
        "sqlite:///outpost.sqlite",
        config=True,
        help="""The database URL (SQLAlchemy): sqlite:///path/file.sqlite (default, relative
        to the working directory), sqlite:////absolute/path/file.sqlite, or
        postgresql://user@host:5432/dbname. The asyncio drivers (aiosqlite, asyncpg) are
        picked for you.""",
    )

    state_dir = Unicode(
        "",
        config=True,
        help="""The Outpost's own directory for files it keeps outside the database: by
        default the internal_ssl certificates go to its subdirectory internal-ssl
        (certs_dir). Keep it a directory only the Outpost's user may write to (not /tmp).

        Empty (default): the working directory the Outpost starts in (where the default
        SQLite database, outpost.sqlite, is too).""",
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

    def make_crypt(self) -> Crypt:
        """The database's keys, checked (CryptConfigError with a one-line message).

        Reads which of the options the site set from the application's config, and
        warns in its log about a key file others can read."""
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


class HostingOptions(HasTraits):
    """The hosted Spawner, what a hub may change of it, and the lifecycle's limits."""

    spawner_class = EntryPointType(
        default_value=LocalProcessSpawner,
        klass=Spawner,
        entry_point_group="jupyterhub.spawners",
        config=True,
        help="""The JupyterHub Spawner class the Outpost hosts.

        A name registered under the jupyterhub.spawners entry point ("simple",
        "localprocess", ...) or an import string ("batchspawner.SlurmSpawner",
        "kubespawner.KubeSpawner": KubeSpawner registers no entry-point name). Configure it exactly as in jupyterhub_config.py,
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

    allow_env = Any(
        False,
        config=True,
        help="""Which env keys a hub may send with Start, besides those every hub may send.

        Every hub may send what JupyterHub sets for a notebook: the JUPYTERHUB_* keys and
        JPY_API_TOKEN, MEM_LIMIT, MEM_GUARANTEE, CPU_LIMIT, CPU_GUARANTEE. Any other key
        reaches the site's commands (batchspawner runs sbatch with the notebook's env:
        LD_PRELOAD, SBATCH_PARTITION, SLURM_CONF, PYTHONPATH...), so it is refused unless
        allowed here: the Start fails with PERMISSION_DENIED (reason ENV_NOT_ALLOWED,
        naming the keys) and the hub's user sees why; nothing is dropped silently.

        False (default): no other key. True: any key (the behaviour before this option;
        only for hubs the site trusts with its commands). A list of keys: those. A dict:
        hub name -> one of these. A callable (hub, env) -> one of these, sync or async
        (raising refuses, with its message as the reason).
        """,
    )

    allow_user_options = Any(
        False,
        config=True,
        help="""Which user_options keys a hub may send with Start.

        Spawners read user_options to decide what runs: batchspawner merges them into
        the batch script's variables ({"partition": "gpu"}, {"cmd": ...}). False
        (default): none; a Start with user_options fails with PERMISSION_DENIED (reason
        USER_OPTION_NOT_ALLOWED, naming the keys). True: any key. A list of keys: those.
        A dict: hub name -> one of these. A callable (hub, user_options) -> one of
        these, sync or async (raising refuses, with its message as the reason).
        """,
    )

    allow_auth_state = Any(
        False,
        config=True,
        help="""Which hubs may send their user's auth_state with Start (by its top-level
        keys), for Spawners that act for the user at the site (they read
        `await self.user.get_auth_state()`; the Spawner's auth_state_hook gets it too).

        auth_state holds the user's credentials (OAuth tokens, ...): the site opts in.
        False (default): none; a Start that carries auth_state fails with
        PERMISSION_DENIED (reason AUTH_STATE_NOT_ALLOWED, naming the keys), and the hub's
        user sees why; nothing is dropped silently. True: any key. A list of keys: those.
        A dict: hub name -> one of these. A callable (hub, auth_state) -> one of these,
        sync or async (raising refuses, with its message as the reason).

        It travels only over TLS: an Outpost that serves plaintext refuses every
        auth_state, whatever this says. What it accepts is stored encrypted (like env),
        never logged (the hosted Spawner's log has its strings redacted), and deleted
        when the server stops.
        """,
    )
    max_auth_state_bytes = Integer(
        64 * 1024,
        min=0,
        config=True,
        help="""The largest auth_state a Start may carry, in bytes (serialized); larger
        gets INVALID_ARGUMENT (field auth_state).""",
    )

    user_mapping = Any(
        None,
        allow_none=True,
        config=True,
        help="""Which local account a hub's user runs as: what the hosted Spawner sees as
        self.user.name (LocalProcessSpawner's passwd lookup, batchspawner's
        `sudo -u {username}`, KubeSpawner's pod names). URLs and JUPYTERHUB_USER keep the
        hub's user name.

        A template with {hub} and {name}, e.g. "{hub}-{name}" (hub "a"'s alice runs as
        a-alice). A dict: hub name -> a template, or hub name -> {hub user: local account}
        (hubs and users it does not name get no account). A callable (hub, name) -> the
        local account, sync or async (None or raising refuses, with its message as the
        reason).

        A user the mapping gives no account, or whose account is not a plain user name
        (letters, digits, "._-", at most 32 characters), root, a system account (see
        account_uid_min) or not allowed by allow_users, cannot start: PERMISSION_DENIED
        (reason USER_NOT_ALLOWED), and nothing is started or stored. The account is
        stored with the server: a changed mapping applies to new starts only.

        Not set (default): "{name}" when only one hub can use this Outpost. When several
        can (hub_tokens, hub_identity_map, allowed_hubs, SSHForwarder.authorized_keys;
        mTLS without hub_tokens or allowed_hubs counts as any number), the Outpost
        refuses to start until this is set: "{hub}-{name}" keeps the hubs' users apart,
        "{name}" lets two hubs' alice share one account, deliberately.
        """,
    )

    allow_users = Any(
        True,
        config=True,
        help="""Which local accounts (after user_mapping) a hub's users may run as, on top
        of the rule that root and system accounts never may.

        True (default): any other account. A list of account names: those. A dict: hub
        name -> one of these (hubs it does not name: none). A callable (hub, account) ->
        True, False or a list, sync or async (raising refuses, with its message as the
        reason), e.g. membership of a Unix group. A refused account is PERMISSION_DENIED
        (reason USER_NOT_ALLOWED).
        """,
    )

    account_uid_min = Integer(
        min=1,
        max=2**32 - 2,
        config=True,
        help="""Existing accounts with a smaller uid are system accounts: no hub's user runs
        as one (PERMISSION_DENIED, reason USER_NOT_ALLOWED). root (uid 0) never.
        Default: UID_MIN of /etc/login.defs, else 1000. The passwd lookup runs in a
        thread (LDAP, sssd) and its answer is kept for a minute per account.""",
    )

    @default("account_uid_min")
    def _account_uid_min_default(self):
        return read_login_defs()[0]

    account_uid_max = Integer(
        min=1,
        max=2**32 - 2,
        config=True,
        help="""Existing accounts with a larger uid (nobody, 65534) are system accounts too.
        Default: UID_MAX of /etc/login.defs, else 60000.""",
    )

    @default("account_uid_max")
    def _account_uid_max_default(self):
        return read_login_defs()[1]

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
        failed start). The Outpost creates it, or refuses to write certificates into one
        that is not a directory of its own user with mode 0700 (a symlink included): the
        start fails with a message naming it. The certificates never go to the database.

        Empty (default): the directory internal-ssl in state_dir. (Before, the default was
        <tmp>/jupyterhub-outpost-certs-<uid>: a name any local user could take first.)""",
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

        What happens to a Start beyond it is start_admission's: "queue" (default) accepts
        it and it waits for a free slot, its user reading "N users ahead of you" on the
        spawn page; "refuse" answers it at once with RESOURCE_EXHAUSTED (reason
        TOO_MANY_STARTS, metadata limit), leaving nothing behind. A slot frees when a start's
        Spawner.start() has returned (the readiness_check after it holds none), fails or is
        stopped. Retrying a start already accepted (same start_id) is never refused. The
        limit is per hub, so one hub flooding Starts does not keep the others from starting.
        """,
    )
    start_admission = Enum(
        ["queue", "refuse"],
        "queue",
        config=True,
        help="""What a Start beyond max_concurrent_starts_per_hub gets.

        "queue": it is accepted (the server is STARTING, stored) and waits for a free slot;
        its Events say how many of the hub's users are ahead ("3 users ahead of you,
        waiting for a free slot: ..."), updated as the queue moves, and it proceeds when a
        slot frees, first come first served per hub. Bounded by start_queue_limit (then
        refused as with "refuse") and start_queue_timeout (then it fails with a message).
        A Stop takes it out of the queue. A queued start does not survive a restart of
        the Outpost: it fails with a message (shutdown) or as a start the restart
        interrupted (crash); the user starts again.

        "refuse": answered at once with RESOURCE_EXHAUSTED (reason TOO_MANY_STARTS); the
        hub's user reads the refusal and may try again (the behaviour before 0.1.0).""",
    )
    flavor_admission = Enum(
        ["refuse", "queue"],
        "refuse",
        config=True,
        help="""What a Start beyond a flavor's max_per_hub or max_total gets (see
        flavors.md): "refuse" (default: RESOURCE_EXHAUSTED, reason FLAVOR_LIMIT_REACHED)
        or "queue": it waits, as with start_admission, until a server of that flavor
        stops (bounded by start_queue_limit and start_queue_timeout; starts of other
        flavors pass it), with slots that several hubs wait for handed out to the hubs in
        turn. A user's own limits (a flavor's max_per_user, the site's
        max_servers_per_user) are always refused: only the user can free them. Refuse is
        the default because a flavor's slot frees only when a running server stops,
        which may take hours; the spawn form already shows a full flavor.""",
    )
    start_queue_limit = Integer(
        200,
        min=1,
        config=True,
        help="""How many starts of one hub may wait for a free slot (start_admission or
        flavor_admission "queue"). A Start beyond it is refused with RESOURCE_EXHAUSTED
        (reason TOO_MANY_STARTS, metadata limit and queue_limit).""",
    )
    start_queue_timeout = Float(
        300.0,
        min=0.01,
        config=True,
        help="""Seconds a start may wait for a free slot. Then it fails (a FAILED event: "No
        slot freed within N seconds ..."), as a start that was refused, and the user may
        try again. The hub's own c.Spawner.start_timeout should be at least this plus
        the time a start takes, or the hub gives up first.""",
    )
    readiness_check = Bool(
        True,
        config=True,
        help="""READY only once the notebook answers at the site.

        After the Spawner's start() returned its address, the Outpost GETs the notebook's
        <JUPYTERHUB_SERVICE_PREFIX>api from the site, with a short timeout and a back-off
        from 50 ms up to readiness_max_interval, until any answer below 500 (what
        JupyterHub itself counts as up), and sends READY only then: the hub's own check
        through the tunnel then succeeds at once instead of backing off. With
        internal_ssl it speaks TLS with the notebook's certificate files (without
        verifying the notebook's). A notebook whose Spawner's poll() reports it exited
        meanwhile fails the start. The start counts against max_concurrent_starts_per_hub
        until READY.

        Switch it off (False) where the Outpost cannot reach its notebooks' addresses
        (a firewall between it and the batch nodes) or its Spawner starts something that
        does not serve HTTP: READY is then sent as soon as start() returns.""",
    )
    readiness_timeout = Float(
        0.0,
        min=0.0,
        config=True,
        help="""Seconds the readiness check waits for the notebook to answer; 0 (the
        default): the hosted Spawner's own http_timeout (c.Spawner.http_timeout, 30 s
        unless the site sets it), the time JupyterHub gives a started server to answer.
        Then READY is sent anyway (with a WARNING in the log) and the hub's own check (its
        c.Spawner.http_timeout) decides, as without the check. Under a burst notebooks
        start slowly: a bound shorter than their start-up hands the wait back to the hub's
        backoff, through the tunnel.""",
    )
    readiness_max_interval = Float(
        0.5,
        min=0.01,
        config=True,
        help="""The longest pause, in seconds, between two checks of a notebook that does not
        answer yet (they begin 50 ms apart and grow by half each time).""",
    )
    max_servers_per_hub = Integer(
        1000,
        min=0,
        config=True,
        help="""How many servers one hub may hold on this Outpost, in any state (0: no limit).

        Every server counts until the hub stops it or it expires (see
        failed_server_retention, exited_server_retention): starting, running, unknown,
        and stopped or failed ones the hub has not stopped yet. A Start of a new
        server_name beyond it is answered at once with RESOURCE_EXHAUSTED (reason
        TOO_MANY_SERVERS, metadata limit) and leaves nothing behind; the hub's user reads
        that a server must be stopped first. Retrying an accepted start (same start_id)
        and starting again a server_name the hub already holds are never refused by it.
        The limit is per hub: a hub that floods Starts keeps no other hub from starting.
        max_servers_by_hub sets other limits for named hubs.
        """,
    )
    max_servers_by_hub = Dict(
        value_trait=Integer(min=0),
        key_trait=Unicode(),
        config=True,
        help="""Hub name -> its own max_servers_per_hub (0: no limit for that hub), e.g.
        {"main": 5000, "guests": 50}. Hubs it does not name get max_servers_per_hub.""",
    )
    failed_server_retention = Float(
        86400.0,
        min=0,
        config=True,
        help="""Seconds a failed start (state STOPPED with a failure_message) is kept when its
        hub does not stop it (0: until the hub stops it).

        A failed start keeps its record, events and encrypted env (with the notebook's API
        token) so the hub can read why it failed; a hub normally stops it at once. Past
        this time a sweep deletes it from memory and the database (with its events), as a
        Stop would, and a Poll of it answers NOT_FOUND, which a hub reads as "stopped".
        The sweep runs every min(60, retention / 4) seconds and deletes at most 500
        servers a round; each deletion is logged.
        """,
    )
    exited_server_retention = Float(
        86400.0,
        min=0,
        config=True,
        help="""Seconds a server that exited on its own (poll() returned an exit code: state
        STOPPED, exit_code set) is kept when its hub does not stop it (0: until the hub
        stops it).

        A hub stops such a server on its next poll; one that does not (a hub that is down,
        or misbehaves) would keep its record and encrypted env for ever. Past this time the
        sweep stops it as the hub's Stop would (the Spawner's stop() and post_stop_hook
        run, then its row and events are deleted).
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
        min=4096,
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

    cleanup_timeout = Float(
        60.0,
        min=0.01,
        max=3600.0,
        config=True,
        help="""Seconds a clean-up ``stop(now=True)`` of a Spawner may take before the
        Outpost gives up on it (a WARNING in the log; what it should have stopped may still
        run at the site).

        Clean-ups are the stops of failed starts and of starts a restart interrupted. The
        latter run in the background after a restart, so a hung ``scancel`` never keeps
        the Outpost from serving; the FAILED event of a start waits for its clean-up at
        most this long. A Stop a hub asks for is not bounded by this.
        """,
    )

    @validate("user_mapping")
    def _check_user_mapping(self, proposal):
        try:
            return check_mapping(proposal.value)
        except ValueError as e:
            raise TraitError(str(e)) from None

    def account_policy(self, forwarder_hubs=()) -> AccountPolicy:
        """user_mapping (or its default) and allow_users, enforced. AccountsConfigError
        (one line) when user_mapping is not set and several hubs can use this Outpost."""
        mapping = self.user_mapping
        if mapping is None:
            mapping = default_mapping(
                configured_hubs(
                    tls=self.tls_enabled,
                    client_ca=bool(self.tls_client_ca),
                    hub_tokens=self.hub_tokens,
                    identity_map=self.hub_identity_map,
                    allowed_hubs=self.allowed_hubs,
                    default_hub=self.default_hub,
                    forwarder_hubs=forwarder_hubs,
                )
            )
        return AccountPolicy(
            mapping, self.allow_users, uid_min=self.account_uid_min, uid_max=self.account_uid_max
        )

    @validate("allow_override", "allow_env", "allow_user_options", "allow_auth_state", "allow_users")
    def _check_policy(self, proposal):
        try:
            return check_policy(proposal.value, proposal.trait.name)
        except ValueError as e:
            raise TraitError(str(e)) from None


class FlavorOptions(HasTraits):
    """Flavors: what each hub and user may run, how many, for how long (flavors.py)."""

    flavors = Dict(
        key_trait=Unicode(),
        config=True,
        help="""The site's flavors: flavor name -> its fields (a dict), e.g.
            {"small": {"display_name": "Small: 2 CPU, 4 GB", "config": {"cpu_limit": 2,
             "mem_limit": "4G"}, "max_per_user": 2, "max_runtime": 8 * 3600,
             "default": True},
             "gpu": {"config": {...}, "max_total": 4, "hubs": ["main"],
             "groups": ["gpu-users"]}}

        A Start names a flavor (or gets the default) and the Outpost admits it only if the
        hub and user may use it and no limit is reached, in one step with taking the
        server's place (however many Starts arrive at once, and across restarts). Fields,
        all optional:
        display_name, description (what a spawn form shows); config (Spawner options the
        site sets for every start of the flavor, applied after the hub's
        config_overrides, so a hub cannot change them); max_total, max_per_hub,
        max_per_user (active servers of the flavor: in total, of one hub, of one hub's
        user; 0 or absent: none); max_runtime (seconds a server may run from its start:
        then the Outpost stops it, also across restarts, and its hub's next poll reads
        why; 0: no limit);
        hubs (hub names or globs that may offer it; absent: every hub); users (user
        names or globs), users_regex (a regular expression a user name must match
        entirely), groups (hub groups): when any of these three is set, a user must
        match one; admin_only (only the hub's admins); weight (ListFlavors orders by
        weight, smaller first, then name); default (the flavor a Start without one gets;
        at most one).

        A Start of a flavor the Outpost does not have, or does not offer the hub, is
        INVALID_ARGUMENT (reason UNKNOWN_FLAVOR); of one of the hub's flavors the user may
        not use PERMISSION_DENIED (FLAVOR_NOT_ALLOWED); beyond a limit RESOURCE_EXHAUSTED (FLAVOR_LIMIT_REACHED,
        metadata limit, max, in_use), each with a sentence for the spawn page. An
        Outpost without flavors (default) starts servers without one, as before.
        A malformed flavor stops the Outpost at start-up with one line naming the
        flavor and field. See also flavors_file and max_servers_per_user.
        """,
    )
    flavors_file = Unicode(
        "",
        config=True,
        help="""A YAML file with the flavors, in the shape of c.Outpost.flavors (a mapping of
        flavor name -> its fields), used instead of c.Outpost.flavors (setting both is an
        error).

        Read at start-up, and again on SIGHUP: new starts are admitted under the new
        flavors, running servers keep the flavor they were admitted under (its
        configuration and runtime are stored with them) and count towards its limits
        while its name stays. A file that cannot be read or is malformed stops the
        Outpost at start-up; on SIGHUP it is logged and the flavors before it are kept.""",
    )
    max_servers_per_user = Integer(
        0,
        min=0,
        max=2**31 - 1,
        config=True,
        help="""The site's cap on one hub user's active servers (starting, running,
        stopping, unknown) across all flavors (0: no cap). A Start beyond it is
        RESOURCE_EXHAUSTED (reason FLAVOR_LIMIT_REACHED, metadata limit "user_total").
        Users are counted per hub, by the hub's user name.""",
    )

    def flavor_set(self) -> FlavorSet:
        """The configured flavors, read and checked (FlavorConfigError, one line)."""
        spawner_class = self.spawner_class if isinstance(self.spawner_class, type) else None
        config = self.flavors
        if self.flavors_file:
            if config:
                raise FlavorConfigError("set c.Outpost.flavors or c.Outpost.flavors_file, not both")
            config = read_flavors_file(self.flavors_file)
            try:
                return FlavorSet.parse(
                    config, max_servers_per_user=self.max_servers_per_user, spawner_class=spawner_class
                )
            except FlavorConfigError as e:
                raise FlavorConfigError(f"flavors_file {self.flavors_file}: {e}") from None
        return FlavorSet.parse(config, max_servers_per_user=self.max_servers_per_user, spawner_class=spawner_class)


def read_flavors_file(path: str) -> dict:
    """The flavors in a YAML file (FlavorConfigError, one line, if unreadable or malformed)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise FlavorConfigError(f"flavors_file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise FlavorConfigError(f"flavors_file {path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlavorConfigError(f"flavors_file {path}: a mapping of flavor name -> its fields, not {type(data).__name__}")
    return data


class OutputTailOptions(HasTraits):
    """The notebook's last words: the end of its output for a failed start or an exited
    server (outpost_server/output_tail.py)."""

    output_tail_lines = Integer(
        50,
        min=0,
        max=10000,
        config=True,
        help="""How many of the last lines of a notebook's output the Outpost returns when
        its start fails (with the FAILED event) or it exits (with Poll's STOPPED status);
        the hub shows them to the user and logs them. 0: none (nothing is captured).

        The values of the server's secret env keys (the notebook's API token, ...) are
        replaced by [secret], as in the Outpost's log. Where the tail comes from: the
        Spawner's outpost_output_tail hook, a batchspawner job's output file, or what the
        Outpost captured of a local process (output_tail_capture); see docs/operations.md.
        """,
    )
    output_tail_bytes = Integer(
        8192,
        min=0,
        max=262144,
        config=True,
        help="""The most bytes (UTF-8) of a notebook's output tail, whatever output_tail_lines
        allows. Also bounds the captured output of a local process on disk: at most this
        many bytes per server (two files in state_dir/output-tail), however much the
        notebook writes. 0: no tail.""",
    )
    output_tail_capture = Bool(
        True,
        config=True,
        help="""Capture the stdout and stderr of notebooks that run as local processes
        (LocalProcessSpawner and its subclasses, when the site's popen_kwargs do not send
        them elsewhere): a small helper process per notebook keeps the end of it in the
        private directory output-tail of state_dir (mode 0700, files 0600; removed when the
        hub stops the server) and passes it on to the Outpost's own stderr, where it went
        before (as under JupyterHub). The helper outlives a restart of the Outpost, as the
        notebook does. False: the notebooks write to the Outpost's stdout and stderr
        directly, and have no tail.""",
    )
    output_tail_timeout = Float(
        10.0,
        min=0.1,
        max=300.0,
        config=True,
        help="""Seconds the Outpost waits for a notebook's output tail (a Spawner's hook, a
        batch job's output file on a slow shared file system). After it the FAILED event or
        STOPPED status goes on without a tail, and a WARNING is logged.""",
    )

    def output_tails(self, state_dir: str):
        """The lifecycle manager's OutputTails, from these options."""
        from .output_tail import CAPTURE_SUBDIR, OutputTails

        return OutputTails(
            max_lines=self.output_tail_lines,
            max_bytes=self.output_tail_bytes,
            capture=self.output_tail_capture,
            directory=os.path.join(os.path.abspath(state_dir or os.getcwd()), CAPTURE_SUBDIR),
            timeout=self.output_tail_timeout,
        )
