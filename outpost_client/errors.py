"""Typed errors of the Outpost contract, shared by the client and the server.

Every error the Outpost sends is a gRPC status with one ``google.rpc.ErrorInfo`` detail.
:func:`from_rpc_error` turns a failed call back into one of the exceptions below, so hub
code can ``except ServerNotFound`` instead of comparing status codes.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "outpost.jupyterhub.org"

# The ErrorInfo reasons the Outpost sends: each is listed in the proto's header comment
# and has one class below (its ``reason``); tests/test_errors.py fails on any drift.
INVALID_FIELD = "INVALID_FIELD"
SERVER_NOT_FOUND = "SERVER_NOT_FOUND"
START_NOT_FOUND = "START_NOT_FOUND"
SERVER_ALREADY_STARTED = "SERVER_ALREADY_STARTED"
OVERRIDE_NOT_ALLOWED = "OVERRIDE_NOT_ALLOWED"
ENV_NOT_ALLOWED = "ENV_NOT_ALLOWED"
USER_OPTION_NOT_ALLOWED = "USER_OPTION_NOT_ALLOWED"
AUTH_STATE_NOT_ALLOWED = "AUTH_STATE_NOT_ALLOWED"
USER_NOT_ALLOWED = "USER_NOT_ALLOWED"
SPAWNER_ERROR = "SPAWNER_ERROR"
INTERNAL_ERROR = "INTERNAL_ERROR"
PERSISTENCE_UNAVAILABLE = "PERSISTENCE_UNAVAILABLE"
SHUTTING_DOWN = "SHUTTING_DOWN"
TOO_MANY_STARTS = "TOO_MANY_STARTS"
TOO_MANY_SERVERS = "TOO_MANY_SERVERS"
UNAUTHENTICATED_HUB = "UNAUTHENTICATED_HUB"
CERTIFICATE_REVOKED = "CERTIFICATE_REVOKED"
UNKNOWN_FLAVOR = "UNKNOWN_FLAVOR"
FLAVOR_NOT_ALLOWED = "FLAVOR_NOT_ALLOWED"
FLAVOR_LIMIT_REACHED = "FLAVOR_LIMIT_REACHED"


class OutpostError(Exception):
    """An error of the Outpost contract: status code, message for a person, ErrorInfo.

    On the server, raising one of these (or a subclass) anywhere below the servicer is the
    one way to answer with a status other than OK; the message is shown to the caller as
    it is, so it must make sense to a person and never contain a traceback.

    ``reason`` is the ErrorInfo reason: a class's own for what the Outpost raises, the
    one received for a decoded error, and "" for a status without ErrorInfo (made by
    gRPC itself: an unreachable Outpost, a deadline, an oversized message).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"


# --- by status code: what a status without ErrorInfo decodes to ------------------------


class InvalidArgument(OutpostError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = INVALID_FIELD

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class NotFound(OutpostError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(OutpostError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(OutpostError):
    code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(OutpostError):
    """INTERNAL: the Outpost (or gRPC) failed; see SpawnerError and OutpostBug."""

    code = grpc.StatusCode.INTERNAL

    @property
    def error_class(self) -> str:
        """The class name of the exception behind it (metadata "error_class"), if any."""
        return self.metadata.get("error_class", "")


class Unavailable(OutpostError):
    """UNAVAILABLE: the Outpost, or its database, cannot answer now; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(OutpostError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = UNAUTHENTICATED_HUB


class ResourceExhausted(OutpostError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(OutpostError):
    """The call's deadline passed (the Outpost may still finish what it was doing)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# --- by reason -----------------------------------------------------------------------------


class ServerNotFound(NotFound):
    reason = SERVER_NOT_FOUND


class StartNotFound(NotFound):
    reason = START_NOT_FOUND


class ServerAlreadyStarted(FailedPrecondition):
    reason = SERVER_ALREADY_STARTED


class OverrideNotAllowed(PermissionDenied):
    reason = OVERRIDE_NOT_ALLOWED


class EnvNotAllowed(PermissionDenied):
    """The hub sent env keys the site does not allow it (c.Outpost.allow_env); metadata
    "keys" names them."""

    reason = ENV_NOT_ALLOWED


class UserOptionNotAllowed(PermissionDenied):
    """The hub sent user_options keys the site does not allow it
    (c.Outpost.allow_user_options); metadata "keys" names them."""

    reason = USER_OPTION_NOT_ALLOWED


class AuthStateNotAllowed(PermissionDenied):
    """The hub sent auth_state the site does not accept from it (c.Outpost.allow_auth_state,
    or an Outpost serving plaintext); metadata "keys" names the refused top-level keys."""

    reason = AUTH_STATE_NOT_ALLOWED


class UserNotAllowed(PermissionDenied):
    """The site does not run this hub user's servers: its mapping gives the user no local
    account, or the account is root, a system account or one allow_users does not allow
    (c.Outpost.user_mapping, c.Outpost.allow_users). The message says which, for the
    spawn page; metadata "user_name" is the hub's user, "account" the local account."""

    reason = USER_NOT_ALLOWED


class SpawnerError(InternalError):
    """The hosted Spawner raised; metadata "error_class" names its exception."""

    reason = SPAWNER_ERROR


class OutpostBug(InternalError):
    """The Outpost itself raised where it should not (a bug: its log has the traceback)."""

    reason = INTERNAL_ERROR


class PersistenceUnavailable(Unavailable):
    reason = PERSISTENCE_UNAVAILABLE


class ShuttingDown(Unavailable):
    reason = SHUTTING_DOWN


class TooManyStarts(ResourceExhausted):
    reason = TOO_MANY_STARTS


class TooManyServers(ResourceExhausted):
    """The hub already holds as many servers on the Outpost as the site allows it
    (c.Outpost.max_servers_per_hub), stopped and failed ones included; metadata "limit".

    Its message is the sentence the user reads on the spawn page: it says to stop a
    server no longer needed (or to ask the hub's administrators) before starting another.
    """

    reason = TOO_MANY_SERVERS


class CertificateRevoked(Unauthenticated):
    """The hub's client certificate is revoked at the Outpost
    (c.Outpost.revoked_certificates): the hub needs a new one."""

    reason = CERTIFICATE_REVOKED


class UnknownFlavor(InvalidArgument):
    """Start named a flavor the Outpost does not have; metadata "flavor" names it."""

    reason = UNKNOWN_FLAVOR


class FlavorNotAllowed(PermissionDenied):
    """The flavor exists, but not for this hub or this user (its hubs, users, groups or
    admin rule); metadata "flavor". The message says so, for the spawn page."""

    reason = FLAVOR_NOT_ALLOWED


class FlavorLimitReached(ResourceExhausted):
    """The flavor is full for this start: metadata "flavor", "limit" (total, hub, user, or
    user_total: the site's cap on one user's servers across flavors), "max" and "in_use".
    The message is the sentence the user reads on the spawn page."""

    reason = FLAVOR_LIMIT_REACHED


#: every reason the Outpost sends -> the class it raises and the client decodes
BY_REASON: dict[str, type[OutpostError]] = {
    cls.reason: cls
    for cls in (
        InvalidArgument,
        ServerNotFound,
        StartNotFound,
        ServerAlreadyStarted,
        OverrideNotAllowed,
        EnvNotAllowed,
        UserOptionNotAllowed,
        AuthStateNotAllowed,
        UserNotAllowed,
        SpawnerError,
        OutpostBug,
        PersistenceUnavailable,
        ShuttingDown,
        TooManyStarts,
        TooManyServers,
        Unauthenticated,
        CertificateRevoked,
        UnknownFlavor,
        FlavorNotAllowed,
        FlavorLimitReached,
    )
}

_BY_CODE: dict[grpc.StatusCode, type[OutpostError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        PermissionDenied,
        InternalError,
        Unavailable,
        Unauthenticated,
        ResourceExhausted,
        DeadlineExceeded,
    )
}

_DETAILS_KEY = "grpc-status-details-bin"


def to_status_proto(error: OutpostError) -> status_pb2.Status:
    """The google.rpc.Status (with one ErrorInfo) that carries ``error`` over the wire."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason or error.code.name, domain=DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(info)
    return status


def from_rpc_error(err: grpc.RpcError) -> OutpostError:
    """Decode a failed call into a typed :class:`OutpostError`.

    The ErrorInfo reason picks the class; without one (errors made by gRPC itself, such as
    an unreachable Outpost or an oversized message), or with a reason this client does
    not know or that came with another status code, the status code does. The error's
    ``reason`` is the one received ("" without ErrorInfo).
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = err.details() if callable(getattr(err, "details", None)) else str(err)
    reason = ""
    metadata: dict[str, str] = {}
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    metadata = dict(info.metadata)
    cls = BY_REASON.get(reason) if reason else None
    if cls is None or cls.code != code:
        cls = _BY_CODE.get(code, OutpostError)
    error = cls(message or code.name, code=code, reason=reason, metadata=metadata)
    error.__cause__ = err
    return error
