"""How the hub reaches each Outpost: :class:`OutpostConfig`, whose fields are the options.

Each field of OutpostConfig is one option of an Outpost, declared once with :func:`option`:
its name is the key in an ``OutpostSpawner.outposts`` entry, and it names the
OutpostSpawner trait (type, default, help) that sets it for the Outpost named "default"
(``outpost_address`` for ``address``, ``ssh_host`` for ``ssh_host``, ...). From that one
table come:

- :class:`DefaultOutpostTraits`, the traits OutpostSpawner inherits;
- :data:`TRAIT_NAMES`, the traits whose change drops OutpostSpawner's cached configs;
- :func:`default_config`, the "default" OutpostConfig made from a spawner's traits;
- :func:`outposts_help`, the help of ``OutpostSpawner.outposts``, which lists the keys.

Adding an option is one field here (and its row in docs/hub.md). Nothing here does I/O;
what the hub holds open to an Outpost is :mod:`outpost_client.registry`'s.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlparse

from traitlets import Bool, HasTraits, Integer, TraitType, Unicode
from traitlets.traitlets import MetaHasTraits

from .client import TLSConfig

if TYPE_CHECKING:
    from .tunnel import SSHTarget


def option(trait_name: str, trait: TraitType, *, required: bool = False, secret: bool = False) -> Any:
    """A field of OutpostConfig that OutpostSpawner's trait ``trait_name`` sets for the
    default Outpost.

    The field's default is the trait's, unless ``required`` (an ``outposts`` entry must
    give it; the trait still has its default). ``secret`` keeps the value out of ``repr``,
    and so out of logs.
    """
    metadata = {"trait_name": trait_name, "trait": trait.tag(config=True)}
    if required:
        return field(repr=not secret, metadata=metadata)
    return field(default=trait.default_value, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class OutpostConfig:
    """How to reach one Outpost (the default one, or one entry of OutpostSpawner.outposts).

    Equal configs are the same Outpost to the hub: they share one client, poller and
    tunnel (:mod:`outpost_client.registry`).
    """

    address: str = option(
        "outpost_address",
        Unicode("127.0.0.1:50051", help="host:port of the Outpost's gRPC service (the default Outpost)."),
        required=True,
    )
    ca: str | None = option(
        "outpost_ca",
        Unicode(
            None,
            allow_none=True,
            help="CA (PEM file) that signed the Outpost's TLS certificate. None: plaintext (loopback only).",
        ),
    )
    cert: str | None = option(
        "outpost_cert", Unicode(None, allow_none=True, help="This hub's client certificate (PEM file) for mTLS.")
    )
    key: str | None = option(
        "outpost_key", Unicode(None, allow_none=True, help="This hub's client key (PEM file) for mTLS.")
    )
    ssh_host: str = option(
        "ssh_host",
        Unicode(
            "",
            help="""SSH server the hub tunnels through to reach notebooks (the Outpost's embedded
        forwarder or a site OpenSSH). Empty: no tunnel, the hub connects to the notebook's
        address as the Outpost reports it.""",
        ),
    )
    ssh_port: int = option("ssh_port", Integer(2222, min=1, max=65535, help="Port of the SSH server."))
    ssh_user: str = option("ssh_user", Unicode("outpost", help="SSH user name."))
    ssh_key: str | None = option(
        "ssh_key", Unicode(None, allow_none=True, help="Private key file the hub authenticates with.")
    )
    ssh_known_hosts: str | None = option(
        "ssh_known_hosts",
        Unicode(
            None,
            allow_none=True,
            help="""known_hosts file with the SSH server's host key, e.g. a line "[host]:port
        <key>" with the key the Outpost's forwarder writes to <host_key_file>.pub. Required
        with ssh_host: without it, or with a file that does not exist, no tunnel is opened
        (and the start fails) unless ssh_insecure_no_host_key_check is set.""",
        ),
    )
    ssh_insecure_no_host_key_check: bool = option(
        "ssh_insecure_no_host_key_check",
        Bool(
            False,
            help="""Open the tunnel without ssh_known_hosts, accepting whatever host key the SSH
        server shows (a warning is logged). Anyone who can intercept the connection then sees
        and changes the traffic to notebooks: only for tests and throw-away setups. With
        ssh_known_hosts set, the key is checked anyway.""",
        ),
    )
    ssh_fast_path: bool = option(
        "ssh_fast_path",
        Bool(
            True,
            help="""Decrypt the tunnel's AES-GCM channel data with the hub's own receive fast
        path (outpost_client/ssh_fastpath.py: about 40 % less hub CPU per byte downloaded;
        it reaches into asyncssh internals and runs only with the asyncssh versions it was
        checked against). False: asyncssh's own receive path. OUTPOST_TUNNEL_FAST_PATH=0 in
        the hub's environment turns it off for every Outpost.""",
        ),
    )
    hub_api_forward: bool = option(
        "hub_api_forward",
        Bool(
            False,
            help="""Open a reverse forward so notebooks reach the hub API through the tunnel, for
        sites that cannot open connections to the hub. The notebook's JUPYTERHUB_API_URL
        (and the URLs derived from it) then point at the site-side end of that forward.""",
        ),
    )
    hub_api_site_host: str = option(
        "hub_api_site_host", Unicode("127.0.0.1", help="Site-side listen address of the reverse forward.")
    )
    hub_api_site_port: int = option(
        "hub_api_site_port",
        Integer(
            0,
            min=0,
            max=65535,
            help="Site-side listen port of the reverse forward (must be allowed for this hub at the SSH server).",
        ),
    )
    send_auth_state: bool = option(
        "send_auth_state",
        Bool(
            False,
            help="""Send the user's auth_state (`await user.get_auth_state()`, after
        auth_state_filter) with each start, for a site Spawner that acts for the user (it
        reads `await self.user.get_auth_state()`). Needs the hub's enable_auth_state, TLS
        to the Outpost (outpost_ca: over plaintext nothing is sent and a warning is logged
        once) and the site's c.Outpost.allow_auth_state for this hub. The Outpost stores it
        encrypted and deletes it when the server stops.""",
        ),
    )
    token: str | None = option(
        "outpost_token",
        Unicode(
            None,
            allow_none=True,
            help="""This hub's bearer token for an Outpost with c.Outpost.hub_tokens (instead of,
        or with, a client certificate): sent as `authorization: Bearer <token>` with every
        call, never logged. Use TLS (outpost_ca) unless the Outpost is on loopback. Keep it
        out of the config file, e.g. open("/srv/jupyterhub/outpost.token").read().strip().""",
        ),
        secret=True,  # never in repr or logs
    )

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> OutpostConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"OutpostSpawner.outposts[{name!r}]: unknown keys {sorted(unknown)}")
        if "address" not in data:
            raise ValueError(f"OutpostSpawner.outposts[{name!r}]: 'address' is required")
        return cls(**data)

    @property
    def tls(self) -> TLSConfig | None:
        if self.ca or self.cert:
            return TLSConfig(ca=self.ca, cert=self.cert, key=self.key)
        return None

    def ssh_target(self, hub_api_url: str) -> SSHTarget:
        """The SSH server to tunnel through, with the reverse forward to ``hub_api_url``
        (the hub's API) if ``hub_api_forward``."""
        from .tunnel import SSHTarget  # asyncssh only for hubs that tunnel

        reverse = ()
        if self.hub_api_forward:
            hub = urlparse(hub_api_url)
            hub_port = hub.port or (443 if hub.scheme == "https" else 80)
            reverse = ((self.hub_api_site_host, self.hub_api_site_port, hub.hostname or "127.0.0.1", hub_port),)
        return SSHTarget(
            host=self.ssh_host,
            port=self.ssh_port,
            username=self.ssh_user,
            client_keys=(self.ssh_key,) if self.ssh_key else (),
            known_hosts=self.ssh_known_hosts,
            insecure_no_host_key_check=self.ssh_insecure_no_host_key_check,
            reverse_forwards=reverse,
            fast_path=self.ssh_fast_path,
        )


class Option(NamedTuple):
    """One row of the table: an OutpostConfig field and the trait that sets it."""

    key: str  # the OutpostConfig field, the key in an `outposts` entry
    trait_name: str  # the OutpostSpawner trait for the default Outpost
    trait: TraitType


OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.metadata["trait_name"], f.metadata["trait"]) for f in fields(OutpostConfig)
)
TRAIT_NAMES: tuple[str, ...] = tuple(o.trait_name for o in OPTIONS)

DefaultOutpostTraits = MetaHasTraits(
    "DefaultOutpostTraits",
    (HasTraits,),
    {
        "__module__": __name__,
        "__doc__": "The default Outpost's options, as OutpostSpawner traits (one per OutpostConfig field).",
        **{o.trait_name: o.trait for o in OPTIONS},
    },
)


def default_config(spawner: HasTraits) -> OutpostConfig:
    """The Outpost named "default": the OutpostConfig of the spawner's option traits."""
    return OutpostConfig(**{o.key: getattr(spawner, o.trait_name) for o in OPTIONS})


def outposts_help() -> str:
    """The help of OutpostSpawner.outposts: it names every key an entry may have."""
    keys = ", ".join(o.key for o in OPTIONS)
    text = (
        f"Several Outposts: name -> options, with the keys {keys}. The single-Outpost options "
        '(outpost_address, ssh_host, ...) are the Outpost named "default". Which one a server '
        "uses is decided by `outpost_chooser`."
    )
    return textwrap.fill(text, width=88)
