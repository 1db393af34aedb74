"""Who is calling: the hub identity of a connection, for each auth mode of the Outpost.

Pure functions: :func:`auth_mode` turns the configuration (TLS, client CA, tokens) into
one resolver and a description for the log; the resolvers read a call's credentials
(client certificate, bearer token) and name its hub, or raise Unauthenticated. The
interceptor (interceptors.py) calls the resolver once per call.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Mapping

import grpc

from outpost_client.errors import Unauthenticated

HubResolver = Callable[[grpc.aio.ServicerContext], "str | None"]


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
) -> tuple[HubResolver, str]:
    """The resolver of the configured auth mode, and its description for the log.

    - mTLS (``tls`` and ``client_ca``): the client certificate names the hub;
    - TLS without a client CA: only with ``hub_tokens`` (the token names the hub);
    - plaintext: every connection is ``default_hub`` (loopback, or allow_plaintext);
    - ``hub_tokens`` on top of any of these: the token names the hub, and with mTLS the
      certificate must name the same one.
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
    return resolver, mode
