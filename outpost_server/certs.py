"""`jupyterhub-outpost generate-certs`: the files for mTLS between hubs and one Outpost.

A CA (made with certipy, JupyterHub's own certificate helper), the Outpost's server
certificate with a subjectAltName per --host, and one client certificate per --hub whose
CN is the hub's name (the hub identity the Outpost sees). Keys are written mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from traitlets import Integer, List, TraitError, Unicode, validate
from traitlets.config import Application

from . import __version__

CA_NAME = "outpost-ca"
SERVER_NAME = "outpost-server"
# a hub name becomes a directory and file name: keep it to a portable, unsurprising set
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class CertsError(Exception):
    """The request cannot be carried out (a one-line message)."""


@dataclass
class Pair:
    cert: str
    key: str


@dataclass
class GeneratedCerts:
    out: str
    ca: Pair
    server: Pair
    server_names: list[str]
    hubs: dict[str, Pair] = field(default_factory=dict)


def alt_name(host: str) -> str:
    """certipy's subjectAltName spelling: IP:... for an address, DNS:... for a name."""
    try:
        return f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        return f"DNS:{host}"


def generate_certs(out: str, hosts: list[str], hubs: list[str], years: int = 5) -> GeneratedCerts:
    """Create the CA, the Outpost's certificate and one client certificate per hub in out."""
    from certipy import Certipy

    if not hosts:
        raise CertsError("give at least one --host: the name or address hubs connect to")
    if not hubs:
        raise CertsError("give at least one --hub: a client certificate is made per hub")
    hosts = [host.strip("[]") for host in hosts]
    for host in hosts:
        if not host or any(c.isspace() or c == "/" for c in host):
            raise CertsError(f"--host {host!r} is not a host name or IP address")
    for hub in hubs:
        if not HUB_NAME.match(hub) or hub in (CA_NAME, SERVER_NAME):
            raise CertsError(
                f"--hub {hub!r}: use letters, digits, '.', '_', '@' or '-' (at most 64), "
                f"and not {CA_NAME!r} or {SERVER_NAME!r}"
            )
    if len(set(hubs)) != len(hubs):
        raise CertsError("each --hub may be given only once")
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "certipy.json")):
        raise CertsError(f"{out} already holds certificates (certipy.json); choose a new --out directory")

    names = [alt_name(host) for host in hosts]
    # private from the first byte: certipy writes each key, then chmods it; with the usual
    # umask the key would be readable by everyone in between
    old_umask = os.umask(0o077)
    try:
        return _generate(Certipy(store_dir=out), out, names, hubs, years)
    finally:
        os.umask(old_umask)


def _generate(certipy, out: str, names: list[str], hubs: list[str], years: int) -> GeneratedCerts:
    def pair(record) -> Pair:
        return Pair(record["files"]["cert"], record["files"]["key"])

    result = GeneratedCerts(
        out=out,
        ca=pair(certipy.create_ca(CA_NAME, years=years)),
        server=pair(certipy.create_signed_pair(SERVER_NAME, CA_NAME, alt_names=names, years=years)),
        server_names=names,
    )
    for hub in hubs:
        result.hubs[hub] = pair(certipy.create_signed_pair(hub, CA_NAME, years=years))
    return result


def summary(certs: GeneratedCerts, host: str, port: int = 50051) -> str:
    """What was written, and the config lines for the Outpost and for each hub."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        f"Wrote a CA, the Outpost's certificate and {len(certs.hubs)} hub certificate(s) to {certs.out}",
        "(keys are mode 0600; the CA key signs new certificates: keep it off the Outpost and the hubs)",
        "",
        f"  CA certificate       {certs.ca.cert}",
        f"  CA key               {certs.ca.key}",
        f"  Outpost certificate  {certs.server.cert}  ({', '.join(certs.server_names)})",
        f"  Outpost key          {certs.server.key}",
    ]
    for hub, files in certs.hubs.items():
        lines += [f"  hub {hub!r} certificate  {files.cert}", f"  hub {hub!r} key          {files.key}"]
    lines += [
        "",
        "# outpost_config.py",
        f"c.Outpost.tls_cert = {certs.server.cert!r}",
        f"c.Outpost.tls_key = {certs.server.key!r}",
        f"c.Outpost.tls_client_ca = {certs.ca.cert!r}",
        f"c.Outpost.allowed_hubs = {list(certs.hubs)!r}",
    ]
    if len(certs.hubs) > 1:  # the site chooses which account each hub's user runs as
        lines.append('c.Outpost.user_mapping = "{hub}-{name}"  # or "{name}": hubs share accounts by name')
    for hub, files in certs.hubs.items():
        lines += [
            "",
            f"# jupyterhub_config.py of hub {hub!r} (copy these three files to that hub)",
            f"c.OutpostSpawner.outpost_address = {address!r}",
            f"c.OutpostSpawner.outpost_ca = {certs.ca.cert!r}",
            f"c.OutpostSpawner.outpost_cert = {files.cert!r}",
            f"c.OutpostSpawner.outpost_key = {files.key!r}",
        ]
    return "\n".join(lines)


class GenerateCerts(Application):
    """The `generate-certs` subcommand of `jupyterhub-outpost`."""

    name = "jupyterhub-outpost generate-certs"
    version = __version__
    description = """Create the certificates for mTLS between hubs and this Outpost.

    A CA, the Outpost's server certificate (a subjectAltName per --host) and one client
    certificate per --hub, whose CN is the hub's name on this Outpost. Prints the files and
    the config lines for the Outpost and for each hub.
    """
    examples = """
    jupyterhub-outpost generate-certs --out /etc/outpost/certs --host outpost.example.org --hub main
    jupyterhub-outpost generate-certs --out certs --host 10.0.0.5 --host outpost.example.org --hub hub-a --hub hub-b
    """
    aliases = {
        "out": "GenerateCerts.out",
        "host": "GenerateCerts.hosts",
        "hub": "GenerateCerts.hubs",
        "years": "GenerateCerts.years",
    }
    flags = {}

    out = Unicode("", config=True, help="The directory to create the files in (must not hold certificates yet).")
    hosts = List(
        Unicode(),
        config=True,
        help="""The names and addresses hubs use to reach the Outpost (--host, repeatable):
        each becomes a DNS or IP subjectAltName of its certificate. localhost and
        127.0.0.1 are included only if given.""",
    )
    hubs = List(
        Unicode(),
        config=True,
        help="The hubs to make a client certificate for (--hub, repeatable); the CN is the hub's name.",
    )
    years = Integer(5, min=1, config=True, help="How many years the certificates are valid.")

    @validate("years")
    def _check_years(self, proposal):
        if not 1 <= proposal.value <= 50:
            raise TraitError(f"years must be 1 to 50, not {proposal.value}")
        return proposal.value

    def start(self):
        if not self.out:
            raise SystemExit(f"{self.name}: --out DIR is required")
        try:
            certs = generate_certs(self.out, self.hosts, self.hubs, years=self.years)
        except (CertsError, OSError) as e:
            raise SystemExit(f"{self.name}: {e}") from None
        print(summary(certs, self.hosts[0].strip("[]")))
