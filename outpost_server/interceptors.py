"""Cross-cutting concerns of every Outpost RPC, in one grpc.aio interceptor.

- the calling hub's identity, resolved once per call from the connection and kept in a
  context variable (:func:`current_hub`);
- errors: an :class:`OutpostError` raised anywhere below becomes its status with one
  ErrorInfo; any other exception becomes INTERNAL with its class name, and its traceback
  goes to the log only;
- an access log line per call (at DEBUG, with duration and status).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping

import grpc
from grpc_status import rpc_status

from google.protobuf.message import DecodeError

from outpost_client.errors import InvalidArgument, OutpostError, Unauthenticated, to_status_proto

log = logging.getLogger("outpost.rpc")

SERVICE_PREFIX = "/jupyterhub.outpost.v1.OutpostService/"

_hub: contextvars.ContextVar[str] = contextvars.ContextVar("outpost_hub")


def current_hub() -> str:
    """The identity of the hub that made the current call."""
    return _hub.get()


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


def internal_error(error: BaseException) -> OutpostError:
    return OutpostError(
        f"Internal error in the Outpost ({type(error).__name__}); its log has the details.",
        code=grpc.StatusCode.INTERNAL,
        reason="INTERNAL_ERROR",
        metadata={"error_class": type(error).__name__},
    )


class Undecodable:
    """Stands in for a request protobuf could not parse (so we can answer INVALID_ARGUMENT)."""

    def __init__(self, error: Exception):
        self.error = error


def safe_deserializer(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(e)

    return parse


def check_decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            "request: could not be decoded (malformed, or nested deeper than protobuf's "
            f"limit of 100 levels): {request.error}",
            metadata={"field": "request"},
        )


async def abort(context, error: OutpostError):
    status = rpc_status.to_status(to_status_proto(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


class OutpostInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, resolve_hub: HubResolver):
        self.resolve_hub = resolve_hub

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler  # health, reflection: no hub identity needed
        name = method[len(SERVICE_PREFIX):]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary),
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream),
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _enter(self, context) -> None:
        # each RPC runs in its own task, so the variable needs no reset
        hub = self.resolve_hub(context)
        if not hub:
            raise Unauthenticated(
                "This connection does not identify a hub: use a client certificate "
                "signed by a CA the Outpost trusts."
            )
        _hub.set(hub)

    @staticmethod
    def _error(name: str, e: BaseException) -> OutpostError:
        if isinstance(e, OutpostError):
            return e
        log.error("%s failed", name, exc_info=e)
        return internal_error(e)

    def _wrap_unary(self, name, behavior):
        async def unary(request, context):
            started = time.perf_counter()
            code = "OK"
            try:
                self._enter(context)
                check_decoded(request)
                return await behavior(request, context)
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                error = self._error(name, e)
                code = error.code.name
                await abort(context, error)
            finally:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s %.2fms", name, code, (time.perf_counter() - started) * 1e3)

        return unary

    def _wrap_stream(self, name, behavior):
        async def stream(request, context):
            started = time.perf_counter()
            code = "OK"
            try:
                self._enter(context)
                check_decoded(request)
                async for item in behavior(request, context):
                    yield item
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                error = self._error(name, e)
                code = error.code.name
                await abort(context, error)
            finally:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s %.2fms", name, code, (time.perf_counter() - started) * 1e3)

        return stream
