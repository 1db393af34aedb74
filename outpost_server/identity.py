"""Who is calling: the hub identity of a connection, for each auth mode of the Outpost.

Pure functions: :func:`auth_mode` turns the configuration (TLS, client CA, tokens) into
one resolver and a description for the log; the resolvers read a call's credentials
(client certificate, bearer token) and name its hub, or raise Unauthenticated (a revoked
client certificate: CertificateRevoked). :func:`unauthenticated_refusal` says why a
configuration without credentials must not be served. The interceptor (interceptors.py)
calls the resolver once per call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Collection, Iterable, Mapping

import grpc

from outpost_client.errors import CertificateRevoked, Unauthenticated

HubResolver = Callable[[grpc.aio.ServicerContext], "str | None"]

log = logging.getLogger("outpost.auth")


class AuthConfigError(Exception):
    """The configuration names no way to authenticate hubs, or a contradictory one (a
    one-line message for the operator)."""


def unauthenticated_refusal(
    *, ip: str, tls: bool, hub_tokens: Mapping[str, str], allow_unauthenticated: bool, default_hub: str
) -> str | None:
    """Why the Outpost must not start with this configuration, or None.

    Plaintext without hub_tokens makes every connection ``default_hub``: on loopback that
    is every local user and every notebook a LocalProcessSpawner runs on the host. It is
    served only when ``allow_unauthenticated`` says so explicitly.
    """
    if tls or hub_tokens or allow_unauthenticated:
        return None
    return (
        f"refusing to serve gRPC without credentials on {ip}: every local user and every "
        f"notebook on this host could act as hub {default_hub!r}; set up mTLS (tls_cert, "
        "tls_key, tls_client_ca; `jupyterhub-outpost generate-certs`) or hub_tokens, or opt in "
        "with --allow-unauthenticated (c.Outpost.allow_unauthenticated = True) where nobody "
        "else can reach the port"
    )


def plaintext_resolver(default_hub: str) -> HubResolver:
    """Every connection is the configured default hub (plaintext on loopback)."""

    def resolve(context) -> str | None:
        return default_hub

    return resolve


# auth_context keys (grpc core): the subject's CN, and the certificate's DNS SANs only
# (x509_subject_alternative_name mixes DNS, IP, URI and email entries; peer_identity_key()
# switches from the CN to the SANs as soon as a certificate has any).
IDENTITY_KEYS = {"cn": ("x509_common_name", "common name (CN)"), "san": ("peer_dns", "DNS subjectAltName")}


def certificate_resolver(
    identity_from: str = "cn",
    identity_map: Mapping[str, str] | None = None,
    allowed_hubs: Collection[str] = (),
) -> HubResolver:
    """The hub is named by the client certificate (mTLS; the handshake already checked it).

    The name is the certificate's CN or first DNS SAN, mapped through ``identity_map``;
    when ``allowed_hubs`` is not empty, only the hubs it lists are let in.
    """
    key, what = IDENTITY_KEYS[identity_from]
    identity_map = dict(identity_map or {})
    allowed = frozenset(allowed_hubs)

    def resolve(context) -> str | None:
        names = context.auth_context().get(key)
        if not names:
            raise Unauthenticated(f"Your client certificate has no {what}, which names your hub on this Outpost.")
        name = names[0].decode()
        hub = identity_map.get(name, name)
        if allowed and hub not in allowed:
            shown = repr(hub) if hub == name else f"{hub!r} (certificate {name!r})"
            raise Unauthenticated(f"Hub {shown} is not allowed on this Outpost (c.Outpost.allowed_hubs).")
        return hub

    return resolve


# --- revoked client certificates ------------------------------------------------------------

FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")

# auth_context key (grpc core): the peer's certificate, PEM
PEM_CERT_KEY = "x509_pem_cert"


def normalize_fingerprint(value: str) -> str:
    """A SHA-256 certificate fingerprint as 64 lower-case hex digits.

    Takes what `openssl x509 -fingerprint -sha256` and `jupyterhub-outpost fingerprint`
    print ("SHA256:AB:CD:..." or "sha256 Fingerprint=AB:CD:..."), or the bare hex digits;
    ValueError (naming the value) otherwise.
    """
    text = value.strip()
    head, sep, tail = text.rpartition("=") if "=" in text else ("", "", text)
    text = tail.strip()
    if text[:7].lower() == "sha256:":
        text = text[7:]
    digits = text.replace(":", "").lower()
    if not FINGERPRINT.match(digits) or (sep and "sha256" not in head.lower()):
        raise ValueError(
            f"{value.strip()[:100]!r} is not a SHA-256 certificate fingerprint (64 hex digits, "
            "colons optional; `jupyterhub-outpost fingerprint CERT.pem` prints one)"
        )
    return digits


def der_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint (64 lower-case hex digits) of a certificate in DER."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes | str) -> str:
    """The SHA-256 fingerprint of the first certificate in a PEM text."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    end = text.find("-----END CERTIFICATE-----")
    if end < 0:
        raise ValueError("no PEM certificate")
    return der_fingerprint(ssl.PEM_cert_to_DER_cert(text[: end + len("-----END CERTIFICATE-----")]))


def show_fingerprint(digits: str) -> str:
    """The spelling people compare with openssl's output: SHA256:AB:CD:..."""
    upper = digits.upper()
    return "SHA256:" + ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def read_fingerprints(path: str) -> frozenset[str]:
    """The fingerprints of a revocation file (one a line; # starts a comment, as in what
    `jupyterhub-outpost fingerprint` prints); OSError, or ValueError naming the line."""
    found = set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                found.add(normalize_fingerprint(line))
            except ValueError as e:
                raise ValueError(f"{path} line {number}: {e}") from None
    return frozenset(found)


class RevokedCertificates:
    """The revoked fingerprints: a fixed list and/or a file that is read again whenever
    its modification time or size changes (checked at every call, one stat)."""

    def __init__(self, fingerprints: Iterable[str] = (), path: str = ""):
        self.fixed = frozenset(normalize_fingerprint(f) for f in fingerprints)
        self.path = path
        self._from_file: frozenset[str] = frozenset()
        self._stamp: tuple[int, int] | None = None
        if path:
            try:
                self._stamp = self._stat()
                self._from_file = read_fingerprints(path)
            except OSError as e:
                raise AuthConfigError(f"cannot read revoked_certificates_file {path}: {e.strerror}") from None
            except ValueError as e:
                raise AuthConfigError(f"revoked_certificates_file {e}") from None

    def __bool__(self) -> bool:
        return bool(self.fixed or self.path)

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> frozenset[str]:
        """Every revoked fingerprint now (the file re-read if it changed). A file that
        cannot be read or parsed any more keeps the last list (logged once per change)."""
        if not self.path:
            return self.fixed
        try:
            stamp: tuple[int, int] | None = self._stat()
        except OSError as e:
            stamp, error = None, f"cannot read it ({e.strerror})"
        if stamp != self._stamp:
            self._stamp = stamp
            if stamp is not None:
                try:
                    self._from_file = read_fingerprints(self.path)
                except OSError as e:
                    error = f"cannot read it ({e.strerror})"
                except ValueError as e:
                    error = str(e)
                else:
                    error = ""
                    log.warning("revoked_certificates_file %s read: %d fingerprints", self.path, len(self._from_file))
            if error:
                log.error("revoked_certificates_file %s: %s; keeping the previous list", self.path, error)
        return self.fixed | self._from_file


REVOKED_LOG_INTERVAL = 60.0  # seconds between two log lines about the same revoked certificate


def revoking(resolver: HubResolver, revoked: RevokedCertificates) -> HubResolver:
    """``resolver``, but a call whose client certificate is revoked is refused first
    (UNAUTHENTICATED, reason CERTIFICATE_REVOKED) and logged (once a minute per
    certificate: a revoked hub's poller calls often)."""
    last_logged: dict[str, float] = {}

    def resolve(context) -> str | None:
        pems = context.auth_context().get(PEM_CERT_KEY)
        if not pems:  # fail closed: a certificate that cannot be checked is not let in
            raise Unauthenticated(
                "The Outpost cannot read your client certificate to check it against its revocation list."
            )
        fingerprint = pem_fingerprint(pems[0])
        if fingerprint in revoked.current():
            now = time.monotonic()
            if now - last_logged.get(fingerprint, -REVOKED_LOG_INTERVAL) >= REVOKED_LOG_INTERVAL:
                last_logged[fingerprint] = now
                names = context.auth_context().get("x509_common_name") or [b"?"]
                log.warning(
                    "refused a call with the revoked client certificate %s (CN %r, peer %s)",
                    show_fingerprint(fingerprint), names[0].decode(errors="replace"), context.peer(),
                )
            raise CertificateRevoked(
                f"Your client certificate ({show_fingerprint(fingerprint)}) is revoked on this "
                "Outpost (c.Outpost.revoked_certificates): ask the site for a new one."
            )
        return resolver(context)

    return resolve


# bearer tokens (c.Outpost.hub_tokens): stored as "sha256:<hex>" of the token. An unsalted
# SHA-256 is enough for what it protects against (a leaked config file) because the tokens
# are high-entropy random strings (`jupyterhub-outpost hash-token` refuses short ones), not
# passwords: there is nothing to guess a dictionary for.
TOKEN_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The "sha256:<hex>" hash of a bearer token, as c.Outpost.hub_tokens stores it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def bearer_token(context) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata, if any."""
    values = [value for key, value in (context.invocation_metadata() or ()) if key == "authorization"]
    if len(values) != 1:
        if values:
            raise Unauthenticated("Send one authorization metadata entry (Bearer <token>), not several.")
        return None
    value = values[0].decode("ascii", "replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("The authorization metadata must be 'Bearer <token>'.")
    return token.strip()


def token_resolver(hub_tokens: Mapping[str, str], certificate: HubResolver | None = None) -> HubResolver:
    """The hub is named by the call's bearer token (``authorization: Bearer <token>``).

    ``hub_tokens`` maps hub names to "sha256:<hex>" token hashes. The token is hashed and
    compared with every configured hash with :func:`hmac.compare_digest` (no early exit), so
    the time taken does not depend on which hash, or how much of one, matched. With mTLS too
    (``certificate``: the certificate resolver) the call must carry both, and they must name
    the same hub. The token itself is never logged nor put in an error message.
    """
    entries = [(hub, bytes.fromhex(value.split(":", 1)[1])) for hub, value in hub_tokens.items()]

    def resolve(context) -> str | None:
        token = bearer_token(context)
        if token is None:
            raise Unauthenticated(
                "This Outpost needs a bearer token: send 'authorization: Bearer <token>' metadata "
                "(c.OutpostSpawner.outpost_token)."
            )
        digest = hashlib.sha256(token.encode()).digest()
        hub = None
        for name, expected in entries:
            if hmac.compare_digest(digest, expected):
                hub = name
        if hub is None:
            raise Unauthenticated("The bearer token is not valid on this Outpost (c.Outpost.hub_tokens).")
        if certificate is not None:
            named = certificate(context)
            if named != hub:
                raise Unauthenticated(
                    f"The client certificate names hub {named!r}, the bearer token another hub: "
                    "with mTLS and hub_tokens both must name the same hub."
                )
        return hub

    return resolve


def auth_mode(
    *,
    tls: bool,
    client_ca: bool,
    hub_tokens: Mapping[str, str],
    identity_from: str = "cn",
    identity_map: Mapping[str, str] | None = None,
    allowed_hubs: Collection[str] = (),
    default_hub: str = "default",
    revoked: RevokedCertificates | None = None,
) -> tuple[HubResolver, str]:
    """The resolver of the configured auth mode, and its description for the log.

    - mTLS (``tls`` and ``client_ca``): the client certificate names the hub;
    - TLS without a client CA: only with ``hub_tokens`` (the token names the hub);
    - plaintext: every connection is ``default_hub`` (loopback, or allow_plaintext);
    - ``hub_tokens`` on top of any of these: the token names the hub, and with mTLS the
      certificate must name the same one;
    - ``revoked`` (with mTLS only): a revoked client certificate is refused before anything
      else is looked at.
    """
    identity = identity_from.lower()
    if tls and client_ca:
        resolver: HubResolver | None = certificate_resolver(identity, identity_map, allowed_hubs)
        mode = f"mTLS, identity from {identity.upper()}"
    elif tls:
        if not hub_tokens:
            raise ValueError("TLS without a client CA needs hub_tokens: nothing would name the hub")
        resolver, mode = None, "TLS"
    else:
        resolver, mode = plaintext_resolver(default_hub), f"plaintext, hub {default_hub!r}"
    if hub_tokens:
        certificate = resolver if tls and client_ca else None
        resolver = token_resolver(hub_tokens, certificate)
        mode = f"{mode.split(',')[0]}, bearer tokens of {len(hub_tokens)} hubs"
        if certificate is not None:
            mode += f" and identity from {identity.upper()}"
    assert resolver is not None
    if revoked:
        if not (tls and client_ca):
            raise AuthConfigError(
                "revoked_certificates lists client certificates, but this Outpost asks hubs for "
                "none (mTLS needs tls_client_ca)"
            )
        resolver = revoking(resolver, revoked)
        mode += ", revocation list"
    return resolver, mode
