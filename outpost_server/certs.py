"""`jupyterhub-outpost generate-certs`: the files for mTLS between hubs and one Outpost.

A CA (made with certipy, JupyterHub's own certificate helper), the Outpost's server
certificate with a subjectAltName per --host, and one client certificate per --hub whose
CN is the hub's name (the hub identity the Outpost sees). Keys are created mode 0600.
The server and hub certificates are valid --days (365 by default), the CA --ca-days
(3650), so that new certificates can be issued from the same CA when they expire.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from traitlets import Integer, List, Unicode
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


DEFAULT_DAYS = 365  # the server's and the hubs' certificates
DEFAULT_CA_DAYS = 3650  # the CA's: it outlives the certificates it signs


def generate_certs(
    out: str, hosts: list[str], hubs: list[str], days: int = DEFAULT_DAYS, ca_days: int = DEFAULT_CA_DAYS
) -> GeneratedCerts:
    """Create the CA, the Outpost's certificate and one client certificate per hub in out;
    the certificates are valid ``days`` from now, the CA ``ca_days``."""
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
    if not 1 <= days <= ca_days:
        raise CertsError(f"--days {days}: give 1 to --ca-days ({ca_days}); a certificate cannot outlive its CA")
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "certipy.json")):
        raise CertsError(f"{out} already holds certificates (certipy.json); choose a new --out directory")

    names = [alt_name(host) for host in hosts]
    # private from the first byte: certipy writes each key, then chmods it; with the usual
    # umask the key would be readable by everyone in between
    old_umask = os.umask(0o077)
    try:
        return _generate(Certipy(store_dir=out), out, names, hubs, days, ca_days)
    finally:
        os.umask(old_umask)


def _generate(certipy, out: str, names: list[str], hubs: list[str], days: int, ca_days: int) -> GeneratedCerts:
    def pair(record) -> Pair:
        return Pair(record["files"]["cert"], record["files"]["key"])

    # certipy counts lifetimes in "years" of 365 days (a float works)
    years, ca_years = days / 365, ca_days / 365
    result = GeneratedCerts(
        out=out,
        ca=pair(certipy.create_ca(CA_NAME, years=ca_years)),
        server=pair(certipy.create_signed_pair(SERVER_NAME, CA_NAME, alt_names=names, years=years)),
        server_names=names,
    )
    for hub in hubs:
        result.hubs[hub] = pair(certipy.create_signed_pair(hub, CA_NAME, years=years))
    return result


def expiry(cert_file: str) -> str:
    """When the certificate in cert_file expires (UTC date)."""
    from cryptography import x509

    with open(cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.strftime("%Y-%m-%d")


def summary(certs: GeneratedCerts, host: str, port: int = 50051) -> str:
    """What was written, and the config lines for the Outpost and for each hub."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        f"Wrote a CA, the Outpost's certificate and {len(certs.hubs)} hub certificate(s) to {certs.out}",
        "(keys are mode 0600; the CA key signs new certificates: keep it off the Outpost and the hubs)",
        "",
        f"  CA certificate       {certs.ca.cert}  (expires {expiry(certs.ca.cert)})",
        f"  CA key               {certs.ca.key}",
        f"  Outpost certificate  {certs.server.cert}  ({', '.join(certs.server_names)}; "
        f"expires {expiry(certs.server.cert)})",
        f"  Outpost key          {certs.server.key}",
    ]
    for hub, files in certs.hubs.items():
        lines += [
            f"  hub {hub!r} certificate  {files.cert}  (expires {expiry(files.cert)})",
            f"  hub {hub!r} key          {files.key}",
        ]
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
    jupyterhub-outpost generate-certs --out certs --host outpost.example.org --hub main --days 90
    """
    aliases = {
        "out": "GenerateCerts.out",
        "host": "GenerateCerts.hosts",
        "hub": "GenerateCerts.hubs",
        "days": "GenerateCerts.days",
        "ca-days": "GenerateCerts.ca_days",
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
    days = Integer(
        DEFAULT_DAYS,
        min=1,
        max=18250,
        config=True,
        help="""How many days the Outpost's and the hubs' certificates are valid (--days). A
        stolen hub key is good until then unless its certificate is revoked
        (c.Outpost.revoked_certificates); issue new ones from the same CA before they expire.""",
    )
    ca_days = Integer(
        DEFAULT_CA_DAYS,
        min=1,
        max=18250,
        config=True,
        help="How many days the CA certificate is valid (--ca-days); at least --days.",
    )
    years = Integer(
        0,
        min=0,
        max=50,
        config=True,
        help="Deprecated (before: default 5): the certificates' lifetime in years of 365 days; use --days.",
    )

    def start(self):
        if not self.out:
            raise SystemExit(f"{self.name}: --out DIR is required")
        days = self.years * 365 if self.years else self.days
        ca_days = max(self.ca_days, days) if self.years else self.ca_days
        try:
            certs = generate_certs(self.out, self.hosts, self.hubs, days=days, ca_days=ca_days)
        except (CertsError, OSError) as e:
            raise SystemExit(f"{self.name}: {e}") from None
        print(summary(certs, self.hosts[0].strip("[]")))
